"""`dtc refit`: LoRA swapped into a built tiny-flux artifact equals a rebuild with the LoRA fused.

Covers the weight map recorded at export, refit vs `dtc build` with the same adapters (diffusers/PEFT and kohya
files, bit-exact initializers, per-step noise and final image), `--lora none`, scale 0, A -> B -> A, in-place
atomicity, one-line errors that write nothing, the requantizing refit of fp8/int8 weights (its gap against a
rebuild is measured), and the TensorRT refit path (GPU-only part skipped here with the reason).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtcompile.cli.refit import parse_lora_arg
from dtcompile.core.digests import sha256_file
from dtcompile.core.errors import DtcError, RecipeError, UnsupportedError
from dtcompile.core.metrics import rel_l2
from dtcompile.manifest import read_manifest
from dtcompile.tools.refit import engine_blocker, refit_artifact
from dtcompile.weights.onnx_weights import OnnxWeights
from dtcompile.weights.weight_map import build_weight_map
from tests.fixtures.lora import make_kohya_flux_lora, make_peft_lora
from tests.fixtures.qdq import weight_only_qdq_artifact

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    from dtcompile.models.builtin import builtin_model_path

    path = builtin_model_path("tiny-flux") / "transformer"
    return FluxTransformer2DModel.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def loras(transformer, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "A": make_peft_lora(transformer, d / "a.safetensors", rank=4, alpha=8.0, seed=1),
        "B": make_peft_lora(
            transformer, d / "b.safetensors", rank=2, alpha=1.0, seed=2, targets=("to_q", "proj_mlp", "proj_out")
        ),
        "K": make_kohya_flux_lora(transformer, d / "k.safetensors", rank=4, alpha=2.0, seed=3),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("refit")


@pytest.fixture(scope="module")
def base(tiny_artifact, work):
    """The session's tiny-flux artifact, refit to its own base weights with its non-refittable RTX engines left out."""
    report = refit_artifact(tiny_artifact, [], out_dir=work / "base", drop_unrefittable=True)
    assert report.dropped and {d["backend"] for d in report.dropped} == {"tensorrt-rtx"}
    return report.artifact_dir


@pytest.fixture(scope="module")
def built(loras, work):
    """A fresh `dtc build` of tiny-flux with A (PEFT, scale 0.7) and K (kohya, scale 1) fused."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    recipe = load_recipe(
        ROOT / "recipes" / "tiny-flux.yaml",
        [
            f"output.dir={work / 'built'}",
            "engine.backends=[onnxruntime]",
            "engine.targets=[]",
            f"lora=[{{source: '{loras['A']}', scale: 0.7}}, {{source: '{loras['K']}'}}]",
        ],
    )
    return run_build(recipe).artifact_dir


def initializers(artifact: Path) -> dict[str, torch.Tensor]:
    g = OnnxWeights(artifact / read_manifest(artifact).to_json()["components"]["transformer"]["onnx"]["file"])
    return {n: g.tensor(n) for n in g.inits}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = initializers(a), initializers(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def graph_feeds() -> dict[str, torch.Tensor]:
    """Fixed transformer inputs for a 64x64 image (256 tokens) and 32 text tokens."""
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 256, 16, generator=gen),
        "encoder_hidden_states": torch.randn(1, 32, 32, generator=gen),
        "pooled_projections": torch.randn(1, 32, generator=gen),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.rand(256, 3, generator=gen) * 16,
        "txt_ids": torch.zeros(32, 3),
        "guidance": torch.tensor([3.5]),
    }


def graph_output(artifact: Path) -> torch.Tensor:
    """The artifact graph's noise prediction on ``graph_feeds()`` (onnxruntime)."""
    from dtcompile.backends.onnxruntime import OrtRunner

    onnx_file = read_manifest(artifact).to_json()["components"]["transformer"]["onnx"]["file"]
    return OrtRunner(artifact / onnx_file, optimization="basic")(graph_feeds())["latent"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- the weight map -------------------------------------------------------------------------------------------


def test_weight_map_points_at_the_exported_values(base, transformer):
    import json

    m = read_manifest(base).to_json()
    entry = m["components"]["transformer"]["weight_map"]
    wmap = json.loads((base / entry["file"]).read_text())["params"]
    params = dict(transformer.named_parameters())
    assert set(wmap) == set(params) and entry["mapped"] == len(params)
    inits = initializers(base)
    layouts = set()
    for name, e in wmap.items():
        value = inits[e["initializer"]]
        layouts.add(e["layout"])
        want = params[name].detach()
        assert torch.equal(value, want.t() if e["layout"] == "transposed" else want), name
    assert layouts == {"same", "transposed"}  # Linear weights folded into pre-transposed MatMul constants
    assert wmap["transformer_blocks.0.attn.to_q.weight"]["initializer"].startswith("onnx::MatMul")


# --- refit vs rebuild ------------------------------------------------------------------------------------------


def test_refit_matches_a_rebuild_with_the_lora_fused(base, built, loras, work):
    from dtcompile.runtime.session import run_artifact

    report = refit_artifact(base, [(str(loras["A"]), 0.7), (str(loras["K"]), 1.0)], out_dir=work / "ak")
    assert report.updated == report.touched == len(read_manifest(built).to_json()["lora"]["touched"]) > 0
    assert same_weights(report.artifact_dir, built)  # bit-exact, both formats
    m, mb = report.manifest, read_manifest(built).to_json()
    assert [(a["sha256"], a["scale"], a["format"]) for a in m["lora"]["adapters"]] == [
        (a["sha256"], a["scale"], a["format"]) for a in mb["lora"]["adapters"]
    ]
    assert len({m["key"], mb["key"], read_manifest(base).to_json()["key"]}) == 3
    assert [e["backend"] for e in m["components"]["transformer"]["engines"]] == ["onnxruntime"]
    onnx_entry = m["components"]["transformer"]["onnx"]
    assert sha256_file(report.artifact_dir / onnx_entry["file"]) == onnx_entry["sha256"]

    kw = {"steps": 3, "seed": 5, "height": 64, "width": 64, "backend": "onnxruntime", "trace": True}
    got = run_artifact(report.artifact_dir, PROMPT, **kw)
    want = run_artifact(built, PROMPT, **kw)
    for step, (g, w) in enumerate(zip(got.trace, want.trace, strict=True)):
        assert rel_l2(g, w) <= 1e-4, step
    assert psnr(np.asarray(got.image), np.asarray(want.image)) >= 40
    assert rel_l2(graph_output(report.artifact_dir), graph_output(base)) > 1e-2  # the LoRA does change the output


def test_none_and_scale_zero_restore_the_base(base, built, loras, work):
    r = refit_artifact(work / "ak", [], out_dir=work / "none")
    assert same_weights(r.artifact_dir, base) and r.manifest["key"] == read_manifest(base).to_json()["key"]
    assert r.manifest["lora"]["adapters"] == [] and r.updated == r.touched > 0
    r = refit_artifact(built, [], out_dir=work / "built-none")  # built with the LoRA: its stored base comes back
    assert same_weights(r.artifact_dir, base)
    assert torch.equal(graph_output(r.artifact_dir), graph_output(base))
    r = refit_artifact(base, [(str(loras["A"]), 0.0)], out_dir=work / "zero")
    assert same_weights(r.artifact_dir, base)


def test_switching_a_b_a_gives_exactly_a(base, loras, work):
    a = refit_artifact(base, [(str(loras["A"]), 1.0)], out_dir=work / "A").artifact_dir
    ab = refit_artifact(a, [(str(loras["B"]), 1.0)], out_dir=work / "AB").artifact_dir
    aba = refit_artifact(ab, [(str(loras["A"]), 1.0)], out_dir=work / "ABA")
    assert not same_weights(ab, a)
    assert same_weights(aba.artifact_dir, a)
    # B touched proj_mlp/proj_out, which A does not: they are pushed back to base, not left blended
    assert "single_transformer_blocks.0.proj_mlp.weight" in aba.manifest["lora"]["touched"]
    assert aba.updated == aba.touched > aba.manifest["lora"]["adapters"][0]["modules"]
    assert torch.equal(graph_output(aba.artifact_dir), graph_output(a))


def externalize(src: Path, dst: Path) -> Path:
    """A copy of an onnxruntime artifact whose graph keeps its weights in an external data file (as exports
    over 1.5 GiB do)."""
    import onnx

    from dtcompile.manifest import file_entry, write_manifest

    shutil.copytree(src, dst)
    m = read_manifest(dst).to_json()
    c = m["components"]["transformer"]
    path = dst / c["onnx"]["file"]
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    c["onnx"] = {**c["onnx"], **file_entry(dst, path), "external_data": [file_entry(dst, Path(f"{path}.data"))]}
    c["engines"] = [{**c["engines"][0], **file_entry(dst, path)}]
    write_manifest(dst, m)
    return dst


def test_external_data_graphs_get_an_overlay_and_keep_their_data_file(base, loras, work):
    ext = externalize(base, work / "ext")
    data = ext / "onnx" / "transformer.onnx.data"
    a = refit_artifact(ext, [(str(loras["A"]), 1.0)], out_dir=work / "ext-A")
    onnx_dir = a.artifact_dir / "onnx"
    assert (onnx_dir / "transformer.onnx.data").stat().st_ino == data.stat().st_ino  # linked, not copied
    overlay = onnx_dir / "transformer.onnx.refit.data"
    assert overlay.stat().st_size < data.stat().st_size / 4  # only the touched tensors
    files = [x["file"] for x in a.manifest["components"]["transformer"]["onnx"]["external_data"]]
    assert files == ["onnx/transformer.onnx.data", "onnx/transformer.onnx.refit.data"]
    assert same_weights(a.artifact_dir, work / "A")
    b = refit_artifact(a.artifact_dir, [(str(loras["B"]), 1.0)], out_dir=work / "ext-AB")
    aba = refit_artifact(b.artifact_dir, [(str(loras["A"]), 1.0)], out_dir=work / "ext-ABA")
    assert same_weights(aba.artifact_dir, work / "A")
    assert torch.equal(graph_output(aba.artifact_dir), graph_output(work / "A"))
    none = refit_artifact(aba.artifact_dir, [], out_dir=work / "ext-none", in_place=False)
    assert same_weights(none.artifact_dir, base)


# --- in place, errors -------------------------------------------------------------------------------------------


def test_in_place_is_atomic(base, loras, work, monkeypatch):
    from dtcompile.tools import refit as refit_mod

    art = work / "inplace"
    shutil.copytree(base, art)
    r = refit_artifact(art, [(str(loras["A"]), 1.0)], in_place=True)
    assert r.artifact_dir == art and same_weights(art, work / "A")
    before = (art / "manifest.json").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(refit_mod, "rewrite_onnx", boom)
    with pytest.raises(OSError, match="injected"):
        refit_artifact(art, [(str(loras["B"]), 1.0)], in_place=True)
    assert (art / "manifest.json").read_bytes() == before and same_weights(art, work / "A")
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []  # no temp folders left


@pytest.mark.parametrize(
    "case",
    ["missing", "pickle", "no module", "shape", "no destination", "unrefittable"],
)
def test_errors_name_the_problem_and_write_nothing(case, base, tiny_artifact, work, tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "x.safetensors"
    out = work / f"err-{case.replace(' ', '-')}"
    artifact, kwargs = base, {"out_dir": out}
    if case == "pickle":
        lora.write_bytes(b"\x80\x04\x95\x00\x00")
    elif case == "no module":
        save_file(
            {
                "transformer.mid_block.proj.lora_A.weight": torch.zeros(2, 8),
                "transformer.mid_block.proj.lora_B.weight": torch.zeros(8, 2),
            },
            str(lora),
        )
    elif case == "shape":
        save_file(
            {
                "transformer.proj_out.lora_A.weight": torch.zeros(2, 8),
                "transformer.proj_out.lora_B.weight": torch.zeros(8, 2),
            },
            str(lora),
        )
    elif case == "no destination":
        kwargs = {}
    elif case == "unrefittable":
        artifact = tiny_artifact
    expected = {
        "missing": (RecipeError, f"--lora: LoRA file '{lora}' does not exist"),
        "pickle": (RecipeError, "is not a safetensors file (it looks like a pickle)"),
        "no module": (RecipeError, "none of its LoRA modules match a module of the artifact's transformer"),
        "shape": (RecipeError, "shape mismatch in 'proj_out': B @ A is [8, 8]"),
        "no destination": (DtcError, "refit needs --out DIR (a new artifact) or --in-place"),
        "unrefittable": (
            UnsupportedError,
            "tensorrt-rtx sm_89 engine is not refittable (built with engine.refittable: false); rebuild with "
            "engine.refittable: true, which needs a CUDA GPU at build time",
        ),
    }[case]
    with pytest.raises(expected[0]) as e:
        refit_artifact(artifact, [(str(lora), 1.0)], **kwargs)
    assert expected[1] in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_cli(base, loras, work, tmp_path, capsys):
    from dtcompile.cli import main

    main(["refit", str(base), "--lora", f"{loras['A']}:0.5", "--out", str(work / "cli")])
    out = capsys.readouterr().out
    assert f"refit: {work / 'cli'} (key " in out and "with a.safetensors:0.5" in out and "onnxruntime:any" in out
    assert read_manifest(work / "cli").to_json()["lora"]["adapters"][0]["scale"] == 0.5
    r = subprocess.run(
        [sys.executable, "-m", "dtcompile", "refit", str(base), "--lora", "missing.safetensors:0.5", "--out", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr == "error: --lora: LoRA file 'missing.safetensors' does not exist\n"
    assert not (tmp_path / "x").exists()


def test_lora_argument_parsing():
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("dir/a.safetensors:0.25") == ("dir/a.safetensors", 0.25)
    assert parse_lora_arg("C:/x/a.safetensors:-1") == ("C:/x/a.safetensors", -1.0)
    assert parse_lora_arg("weird:name.safetensors") == ("weird:name.safetensors", 1.0)


# --- quantized artifacts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_refit_requantizes_weights(fmt, base, built, loras, transformer, work, capsys):
    """Refit of weights stored quantized (Q/DQ) vs a rebuild that quantizes the LoRA-fused weights."""
    q_base = weight_only_qdq_artifact(base, work / f"{fmt}-base", fmt)
    q_rebuild = weight_only_qdq_artifact(built, work / f"{fmt}-rebuild", fmt)
    r = refit_artifact(q_base, [(str(loras["A"]), 0.7), (str(loras["K"]), 1.0)], out_dir=work / f"{fmt}-refit")
    gap = rel_l2(graph_output(r.artifact_dir), graph_output(q_rebuild))
    quant_err = rel_l2(graph_output(q_rebuild), graph_output(built))
    with capsys.disabled():
        print(f"\n{fmt} weights: refit vs rebuild rel L2 {gap:.2e}; rebuild vs fp32 {quant_err:.2e}")
    assert 0 < gap < {"fp8": 2e-2, "int8": 5e-3}[fmt]
    assert gap < quant_err  # the requantized refit is closer to the rebuild than quantization is to fp32
    # scales were recomputed: every touched weight's scale initializer was rewritten
    assert r.updated == 2 * r.touched
    none = refit_artifact(r.artifact_dir, [], out_dir=work / f"{fmt}-none")
    assert same_weights(none.artifact_dir, q_base)
    # the structural matcher finds the quantized weights from the graph alone, as the export hook would
    import json

    derived = json.loads((q_base / "onnx" / "transformer.weights.json").read_text())["params"]
    found = build_weight_map(transformer, q_base / "onnx" / "transformer.onnx")["params"]
    for name, e in derived.items():
        if "quant" in e:
            assert {k: found[name].get(k) for k in ("initializer", "layout", "quant")} == {
                k: e[k] for k in ("initializer", "layout", "quant")
            }, name


def test_float_weight_quantized_in_the_graph_gets_a_new_scale(tmp_path):
    """W -> QuantizeLinear -> DequantizeLinear -> MatMul: the weight map notes the scale; a refit rewrites the
    float weight and recomputes its int8 scale (amax/127), and onnxruntime runs the result."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dtcompile.backends.onnxruntime import OrtRunner
    from dtcompile.stages.lora import LoraFactor, LoraWeights
    from dtcompile.tools.refit import plan_refit, rewrite_onnx

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 4, bias=False)

    torch.manual_seed(0)
    m = Tiny()
    w = m.lin.weight.detach()
    wt = w.t().contiguous().numpy()  # MatMul's B is W^T
    scale = float(np.abs(wt).max() / 127)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], name="/lin/weight_quantizer/Q"),
            helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="/lin/weight_quantizer/DQ"),
            helper.make_node("MatMul", ["x", "wd"], ["y"], name="/lin/MatMul"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(wt, "w"),
            numpy_helper.from_array(np.array(scale, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ],
    )
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(src))
    wmap = build_weight_map(m, src)
    e = wmap["params"]["lin.weight"]
    assert (e["initializer"], e["layout"]) == ("w", "transposed")
    assert e["quant"] == {"kind": "qdq", "qdtype": "int8", "scale": "s", "zero_point": "zp", "axis": None}
    a, b = torch.randn(2, 8), torch.randn(4, 2)
    lora = LoraWeights("x", "diffusers", {"lin": LoraFactor(A=a, B=b, alpha=2.0, rank=2)})
    plan = plan_refit(wmap, OnnxWeights(src), {}, [], [(lora, 1.0)])
    new_w = w + b @ a
    assert torch.equal(plan.updates["w"], new_w.t())
    torch.testing.assert_close(plan.updates["s"], new_w.abs().max() / 127)
    assert set(plan.base_store) == {"w", "s"}  # the pristine weight and its scale, for --lora none
    rewrite_onnx(src, tmp_path / "out.onnx", plan.updates)
    x = torch.randn(2, 8)
    y = OrtRunner(tmp_path / "out.onnx", optimization="basic")({"x": x})["y"]
    torch.testing.assert_close(y, x @ new_w.t(), rtol=0.05, atol=0.05)  # int8 rounding of the weight


# --- TensorRT -------------------------------------------------------------------------------------------------


def test_trt_engines_refit_only_when_refittable_on_their_gpu():
    entry = {"backend": "tensorrt-rtx", "arch": "sm_89", "refittable": True}
    assert engine_blocker({"backend": "onnxruntime", "arch": "any"}, None) is None
    assert "needs a CUDA GPU of that arch and this machine has none" in engine_blocker(entry, None)
    assert "needs a sm_89 GPU (this one is sm_120)" in engine_blocker(entry, "sm_120")
    assert engine_blocker(entry, "sm_89") is None
    assert "engine.refittable: true" in engine_blocker({**entry, "refittable": False}, "sm_89")


@pytest.mark.gpu
def test_trt_refit_matches_onnxruntime_on_gpu(base, loras, work):
    from dtcompile.backends.tensorrt import TrtRunner, engine_from_onnx
    from dtcompile.core.graph import ShapeProfile
    from tests.fixtures.gpu import FLAVOUR, GPU_ARCH

    arch, flavour = GPU_ARCH, FLAVOUR
    if arch is None:
        pytest.skip("needs a CUDA GPU: TensorRT builds REFIT engines and deserializes them for refit only on a GPU")
    if flavour is None:
        pytest.skip(f"no TensorRT flavour for {arch} is installed")
    m = read_manifest(base).to_json()
    c = m["components"]["transformer"]
    art = work / "trt"
    shutil.copytree(base, art)
    profile = ShapeProfile(**{k: {n: tuple(v[k]) for n, v in c["profile"].items()} for k in ("min", "opt", "max")})
    info = engine_from_onnx(art / c["onnx"]["file"], profile, arch, flavour, art / "e.engine", refittable=True)
    m["components"]["transformer"]["engines"].append(info.to_manifest(art))
    from dtcompile.manifest import write_manifest

    write_manifest(art, m)
    r = refit_artifact(art, [(str(loras["A"]), 1.0)], out_dir=work / "trt-A")
    assert r.refit_engines == [f"{flavour}:{arch}"]
    got = TrtRunner(r.artifact_dir / "e.engine", flavour)(graph_feeds())["latent"].cpu()
    assert rel_l2(got, graph_output(r.artifact_dir)) < 1e-2  # TF32 matmuls on the GPU
    assert rel_l2(got, graph_output(base)) > 1e-2
