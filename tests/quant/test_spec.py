"""The ``quant:`` schema, the format registry and its arch rules, and ModelOpt configs (no torch needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.quant import FORMATS, check_targets, get_format, quantizer_pattern
from dtcompile.quant.accuracy import HELDOUT_PROMPTS
from dtcompile.quant.calibration import BUILTIN_PROMPTS_FILE, load_prompts
from dtcompile.recipe.quant import FORMAT_NAMES, CalibSpec, Fp8Spec, Int8Spec, SvdquantSpec, parse_quant_spec

FLUX_EXCLUDE = ("*x_embedder*", "*context_embedder*", "*time_text_embed*", "*norm_out*", "proj_out")


def messages(data: dict) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        parse_quant_spec(data)
    return [e["msg"] for e in exc.value.errors()]


# --- schema -------------------------------------------------------------------------------------------------


def test_defaults_live_in_the_schema() -> None:
    fp8 = parse_quant_spec({"format": "fp8"})
    assert isinstance(fp8, Fp8Spec)
    assert fp8.calib == CalibSpec(prompts="builtin", size=128, batch=2, steps=30, seed=0, percentile=1.0)
    assert fp8.quantize_mha is False and fp8.exclude is None
    int8 = parse_quant_spec({"format": "int8"})
    assert isinstance(int8, Int8Spec) and int8.alpha == 0.8
    svd = parse_quant_spec({"format": "svdquant"})
    assert isinstance(svd, SvdquantSpec) and svd.rank == 32
    with pytest.raises(ValidationError):
        fp8.quantize_mha = True  # frozen


def test_format_choice_errors_name_the_choices() -> None:
    assert messages({"format": "fp9"}) == [
        "Value error, unknown format 'fp9'; choose one of: fp8, int8, nvfp4, svdquant"
    ]
    assert messages({"alpha": 0.5}) == ["Value error, format is required; choose one of: fp8, int8, nvfp4, svdquant"]
    assert FORMATS.names() == list(FORMAT_NAMES)
    with pytest.raises(UnsupportedError, match=r"unknown format 'fp9'; choose one of: fp8, int8, nvfp4, svdquant"):
        get_format("fp9")


def test_fields_are_checked_per_format() -> None:
    assert any("Extra inputs" in m for m in messages({"format": "fp8", "alpha": 0.5}))  # alpha is int8's
    assert any("Extra inputs" in m for m in messages({"format": "int8", "rank": 8}))
    assert any("greater than or equal to 1" in m for m in messages({"format": "svdquant", "rank": 0}))
    assert any("less than or equal to 1" in m for m in messages({"format": "int8", "alpha": 1.5}))
    (msg,) = messages({"format": "int8", "quantize_mha": True})
    assert "set quantize_mha: false, or use format fp8" in msg


def test_calib_checks() -> None:
    (msg,) = messages({"format": "fp8", "calib": {"prompts": ["a cat"], "size": 2}})
    assert "size 2 needs at least 2 prompts but the list has 1; set calib.size to 1" in msg
    assert messages({"format": "fp8", "calib": {"prompts": []}})
    assert messages({"format": "fp8", "calib": {"percentile": 0}})
    assert messages({"format": "fp8", "calib": {"batch": 0}})
    assert any("blank" in m for m in messages({"format": "fp8", "exclude": [" "]}))
    assert any("duplicate" in m for m in messages({"format": "fp8", "exclude": ["a", "a"]}))
    assert CalibSpec(steps=30, percentile=1.0).collected_steps() == 30
    assert CalibSpec(steps=30, percentile=0.5).collected_steps() == 15
    assert CalibSpec(steps=30, percentile=0.9).collected_steps() == 27
    assert CalibSpec(steps=3, percentile=0.1).collected_steps() == 1


# --- arch rules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "backend", "arch", "ok"),
    [
        ("fp8", "tensorrt-rtx", "sm_89", True),
        ("fp8", "tensorrt-rtx", "sm_120", True),
        ("fp8", "tensorrt-rtx", "sm_86", False),
        ("fp8", "tensorrt", "sm_90", True),
        ("fp8", "onnxruntime", None, True),
        ("int8", "tensorrt-rtx", "sm_86", True),
        ("int8", "tensorrt-rtx", "sm_75", False),
        ("int8", "tensorrt", "sm_80", True),
        ("nvfp4", "tensorrt-rtx", "sm_120", True),
        ("nvfp4", "tensorrt-rtx", "sm_89", False),
        ("nvfp4", "tensorrt", "sm_100", True),
        ("nvfp4", "onnxruntime", None, False),
        ("svdquant", "tensorrt-rtx", "sm_120", True),
        ("svdquant", "tensorrt-rtx", "sm_86", False),
    ],
)
def test_supports(fmt: str, backend: str, arch: str | None, ok: bool) -> None:
    reason = get_format(fmt).supports(backend, arch)
    assert (reason is None) == ok, reason
    if not ok:
        assert fmt in reason and "\n" not in reason
        if arch:
            assert arch in reason


def test_impossible_target_fails_with_format_arch_and_fix() -> None:
    spec = parse_quant_spec({"format": "fp8"})
    check_targets(spec, [("onnxruntime", None), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")])
    with pytest.raises(UnsupportedError) as exc:
        check_targets(spec, [("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_86")])
    assert str(exc.value) == (
        "quant.format fp8 cannot target sm_86: it needs sm_89 or newer; remove sm_86 from engine.targets or "
        "use quant.format int8 for Ampere and older"
    )
    with pytest.raises(UnsupportedError, match=r"nvfp4 cannot target sm_89: it needs sm_100 or newer"):
        check_targets(parse_quant_spec({"format": "nvfp4"}), [("tensorrt-rtx", "sm_89")])
    with pytest.raises(UnsupportedError, match=r"onnxruntime cannot run the graph .*trt::TRT_FP4DynamicQuantize"):
        check_targets(parse_quant_spec({"format": "svdquant"}), [("onnxruntime", None)])


def test_svdquant_rank_is_checked_against_the_width() -> None:
    svd = get_format("svdquant")
    assert svd.check_width(parse_quant_spec({"format": "svdquant"}), 3072) is None
    assert svd.check_width(parse_quant_spec({"format": "svdquant"}), 32) == (
        "quant.rank 32 must be below the model width 32; set quant.rank to at most 31"
    )
    assert get_format("fp8").check_width(parse_quant_spec({"format": "fp8"}), 16) is None


# --- ModelOpt configs --------------------------------------------------------------------------------------------


def test_modelopt_configs() -> None:
    fp8 = get_format("fp8").modelopt_config(parse_quant_spec({"format": "fp8"}), FLUX_EXCLUDE, "bfloat16")
    entries = fp8["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}  # everything off, then opted in
    assert {
        "quantizer_name": "*weight_quantizer",
        "cfg": {"num_bits": (4, 3), "axis": None, "trt_high_precision_dtype": "BFloat16"},
    } in entries
    assert {"quantizer_name": "proj_out.*", "enable": False} in entries  # top-level proj_out only
    assert {"quantizer_name": "*x_embedder*.*", "enable": False} in entries
    assert {"parent_class": "nn.LayerNorm", "quantizer_name": "*", "enable": False} in entries
    assert not any("bmm" in e["quantizer_name"] for e in entries)
    assert fp8["algorithm"] == "max"

    mha = get_format("fp8").modelopt_config(parse_quant_spec({"format": "fp8", "quantize_mha": True}), (), "float16")
    assert any(e["quantizer_name"] == "*[qkv]_bmm_quantizer" for e in mha["quant_cfg"])

    int8 = get_format("int8").modelopt_config(parse_quant_spec({"format": "int8", "alpha": 0.5}), (), "float32")
    assert int8["algorithm"] == {"method": "smoothquant", "alpha": 0.5}
    weight = next(e for e in int8["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer")
    assert weight["cfg"]["axis"] == 0 and weight["cfg"]["num_bits"] == 8

    svd = get_format("svdquant").modelopt_config(parse_quant_spec({"format": "svdquant", "rank": 16}), (), "float32")
    assert svd["algorithm"] == {"method": "svdquant", "lowrank": 16}
    fp4 = next(e for e in svd["quant_cfg"] if e["quantizer_name"] == "*input_quantizer")["cfg"]
    assert fp4["num_bits"] == (2, 1) and fp4["block_sizes"] == {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}

    with pytest.raises(UnsupportedError, match="float32, float16 or bfloat16"):
        get_format("fp8").modelopt_config(parse_quant_spec({"format": "fp8"}), (), "int64")
    assert quantizer_pattern("transformer_blocks.0") == "transformer_blocks.0.*"


def test_import_loads_no_heavy_module() -> None:
    code = (
        "import sys, dtcompile.quant, dtcompile.recipe.quant, dtcompile.quant.calibration, dtcompile.quant.accuracy\n"
        "import dtcompile.stages.quantize\n"
        "from dtcompile.quant import FORMATS, get_format\n"
        "[get_format(n).supports('tensorrt-rtx', 'sm_89') for n in FORMATS.names()]\n"
        "heavy = ['torch', 'modelopt', 'onnx', 'onnxruntime', 'tensorrt_rtx', 'diffusers']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


# --- prompts ---------------------------------------------------------------------------------------------------


def test_shipped_prompts() -> None:
    lines = [line.strip() for line in BUILTIN_PROMPTS_FILE.read_text().splitlines()]
    prompts = [p for p in lines if p and not p.startswith("#")]
    assert len(prompts) >= 256 and len(set(prompts)) == len(prompts)
    assert not set(HELDOUT_PROMPTS) & set(prompts)  # accuracy is measured on held-out prompts
    assert load_prompts(CalibSpec()) == prompts[:128]


def test_prompt_files(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# comment\na cat\n\n  a dog  \na bird\n")
    assert load_prompts(CalibSpec(prompts="p.txt", size=2), base_dir=tmp_path) == ["a cat", "a dog"]
    with pytest.raises(
        RecipeError, match=r"size is 4 but 'p.txt' has only 3 prompts; set quant.calib.size to at most 3"
    ):
        load_prompts(CalibSpec(prompts="p.txt", size=4), base_dir=tmp_path)
    with pytest.raises(RecipeError, match=r"prompt file 'nope.txt' not found"):
        load_prompts(CalibSpec(prompts="nope.txt", size=1), base_dir=tmp_path)
    assert load_prompts(CalibSpec(prompts=["x", "y"], size=1)) == ["x"]
