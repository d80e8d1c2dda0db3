"""TensorRT backends: real TensorRT-RTX builds on the CPU from a tiny FLUX ONNX, and the error paths."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dtcompile.backends import tensorrt as trt_backend
from dtcompile.backends.tensorrt import (
    EngineInfo,
    TrtRunner,
    check_build_target,
    engine_from_onnx,
    import_trt,
)
from dtcompile.core.errors import ArtifactError, BuildError, MissingDependencyError, UnsupportedError
from dtcompile.core.graph import ShapeProfile, TensorSpec
from dtcompile.core.targets import TRT_ARCHS, gpu_arch

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install 'dtcompile[rtx]')")
NO_GPU = gpu_arch() is None


def _tiny_flux(dtype):
    """A seeded 3-block FLUX transformer wrapped to take the graph inputs positionally."""
    import torch
    from diffusers import FluxTransformer2DModel

    class Wrapper(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(
            self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        ):
            return self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return Wrapper(model.eval().to(dtype))


def _shapes(batch: int, img_tokens: int, text_len: int = 8) -> dict[str, tuple[int, ...]]:
    return {
        "hidden_states": (batch, img_tokens, 16),
        "encoder_hidden_states": (batch, text_len, 32),
        "pooled_projections": (batch, 32),
        "timestep": (batch,),
        "img_ids": (img_tokens, 3),
        "txt_ids": (text_len, 3),
        "guidance": (batch,),
    }


PROFILE = ShapeProfile(min=_shapes(1, 16), opt=_shapes(2, 64), max=_shapes(4, 256))


def _export(dtype, out_dir: Path) -> Path:
    import torch

    from dtcompile.core.graph import ExportSpec
    from dtcompile.stages.export import export_onnx

    name = str(dtype).removeprefix("torch.")
    dims = {
        "hidden_states": ("batch", "img_tokens", 16),
        "encoder_hidden_states": ("batch", 8, 32),
        "pooled_projections": ("batch", 32),
        "timestep": ("batch",),
        "img_ids": ("img_tokens", 3),
        "txt_ids": (8, 3),
        "guidance": ("batch",),
    }
    g = torch.Generator().manual_seed(0)
    example = {n: torch.rand(s, generator=g).to(dtype) for n, s in _shapes(2, 64).items()}
    spec = ExportSpec(
        inputs=[TensorSpec(n, name, d) for n, d in dims.items()],
        outputs=[TensorSpec("latent", name, ("batch", "img_tokens", 16))],
        example_inputs=example,
    )
    return export_onnx(_tiny_flux(dtype), spec, out_dir).path


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("onnx")
    return _export(__import__("torch").float32, tmp_path_factory.mktemp("onnx32"))


@pytest.fixture(scope="module")
def rtx_engines(fp32_onnx, tmp_path_factory) -> dict[str, EngineInfo]:
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx is not installed (pip install 'dtcompile[rtx]')")
    out = tmp_path_factory.mktemp("engines")
    return {
        arch: engine_from_onnx(fp32_onnx, PROFILE, arch, "tensorrt-rtx", out / arch / "transformer.engine")
        for arch in ("sm_89", "sm_120")
    }


# --- real builds -------------------------------------------------------------------------------------------


@needs_rtx
@pytest.mark.parametrize("arch", ["sm_89", "sm_120"])
def test_rtx_engine_info(rtx_engines, arch):
    import hashlib

    import tensorrt_rtx

    info = rtx_engines[arch]
    data = info.path.read_bytes()
    assert info.path.name == "transformer.engine" and len(data) == info.size > 100_000
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert not info.path.with_name("transformer.engine.tmp").exists()
    assert (info.flavour, info.arch, info.trt_version) == ("tensorrt-rtx", arch, tensorrt_rtx.__version__)
    assert info.strongly_typed and not info.refittable and info.opt_level == 3 and info.build_s > 0
    assert info.inputs[0] == TensorSpec("hidden_states", "float32", (-1, -1, 16))
    assert info.inputs[5] == TensorSpec("txt_ids", "float32", (8, 3))
    assert info.outputs == (TensorSpec("latent", "float32", (-1, -1, 16)),)
    assert info.profile == PROFILE.to_json()
    assert info.profile["hidden_states"] == {"min": [1, 16, 16], "opt": [2, 64, 16], "max": [4, 256, 16]}


@needs_rtx
def test_engine_manifest_entry(rtx_engines):
    info = rtx_engines["sm_120"]
    m = info.to_manifest(info.path.parents[1])
    assert m["file"] == "sm_120/transformer.engine"
    assert (m["backend"], m["arch"], m["sha256"], m["size"]) == ("tensorrt-rtx", "sm_120", info.sha256, info.size)
    assert m["inputs"][0] == {"name": "hidden_states", "dtype": "float32", "dims": [-1, -1, 16]}
    assert m["profile"] == PROFILE.to_json() and m["refittable"] is False and "build_s" not in m
    with pytest.raises(ArtifactError, match="is not inside the artifact folder"):
        info.to_manifest(info.path.parents[1] / "sm_89")


@needs_rtx
def test_rtx_engines_differ_per_arch_and_rebuild_identically(rtx_engines, fp32_onnx, tmp_path):
    assert rtx_engines["sm_89"].sha256 != rtx_engines["sm_120"].sha256
    again = engine_from_onnx(fp32_onnx, PROFILE, "sm_89", "tensorrt-rtx", tmp_path / "again.engine")
    assert again.sha256 == rtx_engines["sm_89"].sha256


@needs_rtx
def test_rtx_fp16_build(tmp_path):
    pytest.importorskip("diffusers")
    onnx_path = _export(__import__("torch").float16, tmp_path / "onnx16")
    info = engine_from_onnx(onnx_path, PROFILE, "sm_89", "tensorrt-rtx", tmp_path / "fp16.engine")
    assert info.size > 0 and info.inputs[0].dtype == "float16" and info.outputs[0].dtype == "float16"


@needs_rtx
def test_turing_has_no_fp32_gemm(fp32_onnx, tmp_path):
    with pytest.raises(BuildError, match=r"failed to build .* for sm_75: .*FP32 GEMM is not supported"):
        engine_from_onnx(fp32_onnx, PROFILE, "sm_75", "tensorrt-rtx", tmp_path / "e.engine")
    assert not list(tmp_path.iterdir())


# --- user errors -------------------------------------------------------------------------------------------


@needs_rtx
@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"garbage\n", "Failed to parse the ONNX model"),
        (b"this is not an onnx file\n", "the file holds no graph outputs"),
        (None, "Failed to parse the ONNX model"),  # truncated
    ],
)
def test_unparsable_onnx(fp32_onnx, tmp_path, content, what):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content if content is not None else fp32_onnx.read_bytes()[:3000])
    with pytest.raises(BuildError) as exc:
        engine_from_onnx(bad, PROFILE, "sm_89", "tensorrt-rtx", tmp_path / "e.engine")
    assert str(exc.value).startswith(f"cannot parse {bad} with tensorrt-rtx ")
    assert what in str(exc.value)
    assert not (tmp_path / "e.engine").exists()


def test_missing_onnx(tmp_path):
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx is not installed")
    with pytest.raises(ArtifactError, match="ONNX file not found: .*nope.onnx"):
        engine_from_onnx(tmp_path / "nope.onnx", PROFILE, "sm_89", "tensorrt-rtx", tmp_path / "e.engine")


def test_unknown_arch_lists_choices(tmp_path):
    with pytest.raises(UnsupportedError) as exc:
        engine_from_onnx(tmp_path / "x.onnx", PROFILE, "sm_90", "tensorrt-rtx", tmp_path / "e.engine")
    assert str(exc.value) == (
        "unknown arch 'sm_90' for tensorrt-rtx; choose one of: sm_75, sm_80, sm_86, sm_89, sm_120, sm_121"
    )


def test_unknown_flavour(tmp_path):
    msg = "unknown TensorRT flavour 'trt-llm'; choose one of: tensorrt, tensorrt-rtx"
    with pytest.raises(UnsupportedError, match=msg):
        engine_from_onnx(tmp_path / "x.onnx", PROFILE, "sm_89", "trt-llm", tmp_path / "e.engine")
    with pytest.raises(UnsupportedError, match=msg):
        import_trt("trt-llm")


@needs_rtx
def test_rtx_arch_list_matches_the_enum():
    import tensorrt_rtx

    enum = sorted(m for m in dir(tensorrt_rtx.ComputeCapability) if m.startswith("SM"))
    assert sorted("SM" + a[3:] for a in TRT_ARCHS["tensorrt-rtx"]) == enum


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when tensorrt is not installed")
def test_datacenter_tensorrt_missing(monkeypatch, tmp_path):
    with pytest.raises(MissingDependencyError) as exc:
        import_trt("tensorrt")
    assert str(exc.value) == (
        "'tensorrt' is not installed (needed by the tensorrt backend); install it with: pip install 'dtcompile[trt]'"
    )
    # with a matching GPU the missing module is what stops the build
    monkeypatch.setattr(trt_backend, "gpu_arch", lambda: "sm_89")
    with pytest.raises(MissingDependencyError, match=r"dtcompile\[trt\]"):
        engine_from_onnx(tmp_path / "x.onnx", PROFILE, "sm_89", "tensorrt", tmp_path / "e.engine")


@pytest.mark.skipif(not NO_GPU, reason="checks the message shown without a CUDA GPU")
def test_datacenter_tensorrt_needs_the_gpu(tmp_path):
    with pytest.raises(UnsupportedError) as exc:
        engine_from_onnx(tmp_path / "x.onnx", PROFILE, "sm_89", "tensorrt", tmp_path / "e.engine")
    assert str(exc.value).startswith("tensorrt (datacenter) builds only for the GPU it runs on: no CUDA device found")


def test_datacenter_tensorrt_other_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_backend, "gpu_arch", lambda: "sm_90")
    with pytest.raises(UnsupportedError) as exc:
        check_build_target("tensorrt", "sm_89")
    assert str(exc.value) == "tensorrt (datacenter) builds only for the GPU it runs on: device is sm_90, target sm_89"


@needs_rtx
def test_rtx_is_always_strongly_typed(tmp_path):
    with pytest.raises(UnsupportedError, match="tensorrt-rtx networks are always strongly typed"):
        check_build_target("tensorrt-rtx", "sm_89", strongly_typed=False)


@needs_rtx
@pytest.mark.skipif(not NO_GPU, reason="checks the refusal shown without a CUDA GPU")
def test_rtx_refit_needs_a_gpu():
    with pytest.raises(UnsupportedError, match="a refittable tensorrt-rtx engine needs a CUDA GPU at build time"):
        check_build_target("tensorrt-rtx", "sm_89", refittable=True)


@needs_rtx
def test_profile_errors(fp32_onnx, tmp_path):
    missing = ShapeProfile(
        min={k: v for k, v in PROFILE.min.items() if k != "guidance"},
        opt={k: v for k, v in PROFILE.opt.items() if k != "guidance"},
        max={k: v for k, v in PROFILE.max.items() if k != "guidance"},
    )
    with pytest.raises(BuildError, match=r"no min/opt/max for dynamic input 'guidance' \(-1,\)"):
        engine_from_onnx(fp32_onnx, missing, "sm_89", "tensorrt-rtx", tmp_path / "e.engine")
    extra = ShapeProfile(
        min={**PROFILE.min, "mask": (1,)}, opt={**PROFILE.opt, "mask": (1,)}, max={**PROFILE.max, "mask": (1,)}
    )
    with pytest.raises(BuildError, match=r"shape profile names \['mask'\], which are not inputs of"):
        engine_from_onnx(fp32_onnx, extra, "sm_89", "tensorrt-rtx", tmp_path / "e.engine")
    wrong_text = ShapeProfile(min={**PROFILE.min, "txt_ids": (9, 3)}, opt=PROFILE.opt, max=PROFILE.max)
    with pytest.raises(BuildError, match=r"input 'txt_ids' does not fit its dims \(8, 3\)"):
        engine_from_onnx(fp32_onnx, wrong_text, "sm_89", "tensorrt-rtx", tmp_path / "e.engine")
    upside_down = ShapeProfile(min=PROFILE.max, opt=PROFILE.opt, max=PROFILE.min)
    with pytest.raises(BuildError, match="is not min <= opt <= max"):
        engine_from_onnx(fp32_onnx, upside_down, "sm_89", "tensorrt-rtx", tmp_path / "e.engine")


# --- runtime -----------------------------------------------------------------------------------------------


@needs_rtx
@pytest.mark.skipif(not NO_GPU, reason="checks the refusal shown without a CUDA GPU")
def test_runner_needs_a_gpu(rtx_engines):
    with pytest.raises(ArtifactError, match="deserializing a tensorrt-rtx engine needs a CUDA GPU and none was found"):
        TrtRunner(rtx_engines["sm_89"].path, "tensorrt-rtx")


def test_runner_missing_engine(tmp_path):
    with pytest.raises(ArtifactError, match="engine file not found"):
        TrtRunner(tmp_path / "nope.engine", "tensorrt-rtx")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU to deserialize engines")
def test_runner_matches_torch_on_gpu(fp32_onnx, tmp_path):
    import torch

    arch = gpu_arch()
    flavour = "tensorrt-rtx" if arch in TRT_ARCHS["tensorrt-rtx"] and HAS_RTX else "tensorrt"
    if flavour == "tensorrt" and not HAS_TRT:
        pytest.skip(f"no TensorRT flavour installed that targets {arch}")
    info = engine_from_onnx(fp32_onnx, PROFILE, arch, flavour, tmp_path / "e.engine")
    runner = TrtRunner(info.path, flavour)
    module = _tiny_flux(torch.float32).cuda()
    g = torch.Generator().manual_seed(3)
    feed = {n: torch.rand(s, generator=g).cuda() for n, s in _shapes(3, 100).items()}
    out = runner(feed)["latent"]
    torch.cuda.synchronize()
    with torch.no_grad():
        ref = module(*feed.values())
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-2


def test_import_is_lazy():
    code = (
        "import sys, dtcompile.backends.tensorrt; "
        "print(sorted(m for m in ('torch', 'tensorrt', 'tensorrt_rtx', 'onnx', 'polygraphy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
