"""export.attention: the recipe rule, the dry-run checks per backend and arch, the three exported forms of the tiny
FLUX transformer (node counts, onnxruntime parity), TensorRT-RTX builds of the native graph, and the manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dtcompile.attention.modes import RTX_PLUGIN_REASON, AttentionChoice, mode_blocker, resolve_attention
from dtcompile.core.errors import BuildError, RecipeError, UnsupportedError
from dtcompile.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-flux.yaml"


def _recipe(*sets: str):
    return load_recipe(TINY, list(sets))


# --- recipe and dry run --------------------------------------------------------------------------------------


def test_native_needs_opset_23(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {source: builtin:tiny-flux}\nexport:\n  opset: 19\n  attention: native\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert str(exc.value) == (
        f"{path}:4 export: attention 'native' exports the ONNX Attention op, which needs opset >= 23 "
        "(export.opset is 19); set export.opset: 23 or export.attention: decomposed"
    )
    with pytest.raises(RecipeError, match=r"--set export.attention: 'fused': Input should be 'auto', 'native'"):
        _recipe("export.attention=fused")
    assert _recipe().export.attention == "auto"


@pytest.mark.parametrize(
    ("mode", "backend", "arch", "dtype", "opset", "fp8", "expect"),
    [
        ("decomposed", "tensorrt-rtx", "sm_89", "float32", 19, False, None),
        ("native", "onnxruntime", "any", "float32", 23, False, None),
        ("native", "onnxruntime", "any", "float16", 19, False, "needs opset >= 23, export.opset is 19"),
        ("native", "tensorrt-rtx", "sm_89", "float16", 23, False, None),
        ("native", "tensorrt-rtx", "sm_120", "bfloat16", 23, False, None),
        ("native", "tensorrt-rtx", "sm_89", "float32", 23, False, "float16/bfloat16 only"),
        ("native", "tensorrt-rtx", "sm_75", "bfloat16", 23, False, "Turing (sm_75) has no bfloat16"),
        ("native", "tensorrt-rtx", "sm_89", "bfloat16", 23, True, None),  # fp8 MHA keeps ModelOpt's form
        ("plugin", "onnxruntime", "any", "float16", 23, False, "onnxruntime has no kernel for the dtc::Fused"),
        ("plugin", "tensorrt-rtx", "sm_89", "float16", 23, False, "no add_plugin_v3"),
        ("plugin", "tensorrt", "sm_90", "float32", 23, False, "plugin takes float16/bfloat16"),
        ("plugin", "tensorrt", "sm_90", "bfloat16", 23, True, "quant.quantize_mha asks for fp8 attention"),
    ],
)
def test_mode_blocker(mode, backend, arch, dtype, opset, fp8, expect) -> None:
    why = mode_blocker(mode, backend, arch, dtype, opset=opset, quantize_mha=fp8)
    if expect is None:
        assert why is None
    else:
        assert why is not None and expect in why


def test_resolve_auto_and_explicit() -> None:
    rtx = [("onnxruntime", "any"), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")]
    assert resolve_attention(_recipe("dtype=float16", "export.opset=23"), rtx) == AttentionChoice("auto", "native")
    auto32 = resolve_attention(_recipe("export.opset=23"), rtx)  # tiny-flux is float32
    assert auto32.mode == "decomposed" and "tensorrt-rtx sm_89" in auto32.reason
    assert resolve_attention(_recipe(), rtx).reason.endswith(
        "the ONNX Attention op needs opset >= 23, export.opset is 19"
    )
    with pytest.raises(UnsupportedError) as exc:
        resolve_attention(_recipe("export.opset=23", "export.attention=native"), rtx)
    assert str(exc.value).startswith("export.attention: 'native' cannot be used for tensorrt-rtx sm_89: tensorrt-rtx")
    with pytest.raises(UnsupportedError) as exc:
        resolve_attention(
            _recipe("dtype=float16", "export.attention=plugin", "engine.backends=[tensorrt-rtx]"), rtx[1:]
        )
    assert str(exc.value) == f"export.attention: 'plugin' cannot be used for tensorrt-rtx sm_89: {RTX_PLUGIN_REASON}"


def test_dry_run_reports_and_refuses() -> None:
    from dtcompile.stages.plan import make_plan as plan

    lines = plan(_recipe("dtype=float16", "export.opset=23")).lines()
    assert "attention: native (auto)" in lines
    with pytest.raises(UnsupportedError, match="'plugin' cannot be used for onnxruntime"):
        plan(_recipe("dtype=float16", "export.opset=23", "export.attention=plugin"))
    # datacenter TensorRT without a GPU builds nothing, so nothing refuses the plugin in the dry run
    p = plan(
        _recipe("dtype=float16", "export.attention=plugin", "engine.backends=[tensorrt]", "engine.targets=[sm_89]")
    )
    assert "attention: plugin" in p.lines() and all(t.reason for t in p.targets)


# --- export of the tiny transformer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny16():
    """The tiny FLUX transformer in fp16, its export wrapper and an opset-23 ExportSpec at 16x16 tokens."""
    import torch

    from dtcompile.core.graph import Range, Shapes
    from dtcompile.models.builtins.flux import build_tiny_flux
    from dtcompile.models.flux import FluxAdapter

    pipe = build_tiny_flux()
    module = pipe.transformer.to(torch.float16).eval()
    adapter = FluxAdapter()
    shapes = Shapes(Range(1, 1, 2), Range(32, 64, 128), Range(32, 64, 128), Range(32, 32, 32))
    pipe_config = adapter.pipe_config(pipe)
    spec = dataclasses.replace(adapter.export_spec(module, pipe_config, shapes, torch.float16), opset=23)
    return adapter.export_module(module), spec, adapter.shape_profile(module, pipe_config, shapes)


@pytest.fixture(scope="module")
def exported(tiny16, tmp_path_factory):
    """mode -> (OnnxArtifact, manifest attention entry) for the three modes."""
    from dtcompile.attention.router import export_attention
    from dtcompile.export.onnx import export_onnx

    wrapper, spec, _ = tiny16
    out = {}
    for mode in ("native", "decomposed", "plugin"):
        with export_attention(mode) as trace:
            art = export_onnx(wrapper, spec, tmp_path_factory.mktemp(mode), name="transformer")
        out[mode] = (art, trace.check_graph(art.op_types))
    return out


def test_one_node_per_attention_layer(exported) -> None:
    n_layers = 4  # tiny-flux: 2 double + 2 single blocks, one attention each
    native, decomposed, plugin = (exported[m][1] for m in ("native", "decomposed", "plugin"))
    assert native["nodes"] == {"Attention": n_layers, "FusedAttention": 0, "Softmax": 0}
    assert native["calls"] == {"native": n_layers}
    assert decomposed["nodes"] == {"Attention": 0, "FusedAttention": 0, "Softmax": n_layers}
    assert plugin["nodes"] == {"Attention": 0, "FusedAttention": n_layers, "Softmax": 0}


def test_native_onnx_is_opset23_attention(exported) -> None:
    import onnx

    model = onnx.load(str(exported["native"][0].path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 23
    nodes = [n for n in model.graph.node if n.op_type == "Attention"]
    assert all(n.domain == "" and len(n.input) == 3 for n in nodes)
    assert all(a.name != "softmax_precision" for n in nodes for a in n.attribute)  # TensorRT refuses it


def test_native_matches_decomposed_in_onnxruntime(exported, tiny16) -> None:
    import torch

    from dtcompile.backends.onnxruntime import OrtRunner
    from dtcompile.core.metrics import rel_l2

    wrapper, spec, _ = tiny16
    feed = dict(spec.example_inputs)
    native = OrtRunner(exported["native"][0].path, optimization="basic")(feed)["latent"]
    decomposed = OrtRunner(exported["decomposed"][0].path, optimization="basic")(feed)["latent"]
    assert native.dtype == torch.float16
    assert rel_l2(native, decomposed) <= 1e-3
    with torch.no_grad():
        ref = wrapper(*feed.values())
    assert rel_l2(native, ref) <= 2e-3
    # other shapes than the example: batch 2, 128x128 pixels (1024 tokens), dynamic axes kept
    gen = torch.Generator().manual_seed(1)
    big = {k: v for k, v in feed.items()}
    big["hidden_states"] = torch.randn(2, 1024, 16, generator=gen).half()
    for k in ("encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        big[k] = torch.cat([feed[k], feed[k]])
    from dtcompile.models.flux import latent_image_ids

    big["img_ids"] = latent_image_ids(128, 128, 2)
    a = OrtRunner(exported["native"][0].path, optimization="basic")(big)["latent"]
    b = OrtRunner(exported["decomposed"][0].path, optimization="basic")(big)["latent"]
    assert a.shape == (2, 1024, 16) and rel_l2(a, b) <= 1e-3


@pytest.mark.parametrize("arch", ["sm_89", "sm_120"])
def test_native_builds_with_tensorrt_rtx(exported, tiny16, tmp_path, arch) -> None:
    pytest.importorskip("tensorrt_rtx")
    from dtcompile.backends.tensorrt import engine_from_onnx

    info = engine_from_onnx(exported["native"][0].path, tiny16[2], arch, "tensorrt-rtx", tmp_path / "t.engine")
    assert info.size > 0 and info.plugins == ()
    assert info.to_manifest(tmp_path)["plugins"] == []


def test_plugin_graph_refused_by_rtx_before_parsing(exported, tiny16, tmp_path) -> None:
    """RTX's parser would abort the process on a Python plugin: the build refuses first, naming what is lacking."""
    pytest.importorskip("tensorrt_rtx")
    from dtcompile.attention.plugin import graph_plugin_ops
    from dtcompile.backends.tensorrt import engine_from_onnx

    path = exported["plugin"][0].path
    assert graph_plugin_ops(path) == ["dtc::FusedAttention"]
    with pytest.raises(UnsupportedError) as exc:
        engine_from_onnx(path, tiny16[2], "sm_89", "tensorrt-rtx", tmp_path / "t.engine")
    assert str(exc.value) == f"{path} needs the dtc::FusedAttention plugin: {RTX_PLUGIN_REASON}"
    assert not (tmp_path / "t.engine").exists()


# --- the patch point ------------------------------------------------------------------------------------------


def test_attention_defers_to_quantized_sdpa() -> None:
    """With fp8 quantize_mha, ModelOpt swaps F.scaled_dot_product_attention inside attention modules: the swap wins."""
    import torch
    import torch.nn.functional as F

    from dtcompile.attention import router as attn

    q = torch.randn(1, 2, 5, 16)
    seen = []
    original = F.scaled_dot_product_attention

    def quantized(*args, **kwargs):
        seen.append(args[0].shape)
        return original(*args, **kwargs)

    with attn.export_attention("native") as trace:
        F.scaled_dot_product_attention = quantized
        try:
            out = attn.attention(q, q, q, mode="native")
        finally:
            F.scaled_dot_product_attention = original
        attn.attention(q, q, q, mode="native")
    assert seen == [q.shape] and out.shape == q.shape
    assert trace.emitted == {"quantized": 1, "native": 1}


def test_patch_point_is_wrappable_and_restored(monkeypatch) -> None:
    """Another stage can wrap dtcompile.attention.router.attention; diffusers' dispatcher is restored on exit."""
    import torch
    from diffusers.models import attention_dispatch
    from diffusers.models.transformers import transformer_flux

    from dtcompile.attention import router as attn

    original = transformer_flux.dispatch_attention_fn
    calls = []
    inner = attn.attention

    def wrapped(q, k, v, **kw):
        calls.append(kw["mode"])
        return inner(q, k, v, **kw)

    monkeypatch.setattr(attn, "attention", wrapped)
    x = torch.randn(1, 7, 2, 16)  # diffusers' (B, S, H, D)
    with attn.export_attention("decomposed") as trace:
        assert transformer_flux.dispatch_attention_fn is not original
        out = transformer_flux.dispatch_attention_fn(x, x, x)
        transformer_flux.dispatch_attention_fn(x, x, x, attn_mask=torch.ones(1, 7, dtype=torch.bool))
    assert transformer_flux.dispatch_attention_fn is original is attention_dispatch.dispatch_attention_fn
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (x, x, x))).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6) and calls == ["decomposed"]
    assert trace.fallbacks == ["an attention mask"]
    with pytest.raises(BuildError, match="could not take that form"):
        dataclasses.replace(trace, mode="native").check_graph({"Attention": 1})


@pytest.mark.parametrize("mode", ["native", "plugin"])
def test_zero_routed_calls_is_an_error_naming_the_model(mode) -> None:
    from dtcompile.attention.router import AttentionTrace

    trace = AttentionTrace(mode)
    with pytest.raises(BuildError, match=rf"export.attention '{mode}': MyTransformer routed no attention call"):
        trace.check_graph({}, "MyTransformer")
    # a graph that may hold no attention (a cache prologue) passes: 0 nodes for 0 calls
    assert trace.check_graph({}, None)["calls"] == {}


# --- the built artifact -----------------------------------------------------------------------------------------


def test_manifest_records_attention(tiny_artifact) -> None:
    from dtcompile.manifest import read_manifest

    comp = read_manifest(tiny_artifact).to_json()["components"]["transformer"]
    att = comp["attention"]
    assert (att["requested"], att["mode"]) == ("auto", "decomposed")  # tiny-flux.yaml: float32, opset 19
    assert att["nodes"]["Softmax"] == att["calls"]["decomposed"] == 4
    assert all(e["plugins"] == [] for e in comp["engines"] if e["backend"] != "onnxruntime")


def test_export_of_a_model_with_hand_written_attention_fails_native(tmp_path) -> None:
    """A model whose attention bypasses SDPA/dispatch_attention_fn routes zero calls: native export refuses it."""
    import torch

    from dtcompile.attention.router import export_attention
    from dtcompile.core.graph import ExportSpec, TensorSpec
    from dtcompile.export.onnx import export_onnx

    class HandWritten(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x

    x = torch.randn(1, 4, 8)
    spec = ExportSpec([TensorSpec("x", "float32", (1, 4, 8))], [TensorSpec("y", "float32", (1, 4, 8))], {"x": x})
    with export_attention("native") as trace:
        art = export_onnx(HandWritten(), spec, tmp_path, name="hand")
    with pytest.raises(BuildError, match="HandWritten routed no attention call"):
        trace.check_graph(art.op_types, "HandWritten")
