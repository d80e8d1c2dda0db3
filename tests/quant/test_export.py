"""Export of quantized tiny-FLUX transformers: standard ONNX Q/DQ, onnxruntime parity with the fake-quant
model, fp8 attention in the graph, and TensorRT-RTX engines for the arches each format allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("modelopt")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dtcompile.core.errors import BuildError  # noqa: E402
from dtcompile.core.graph import Range, Shapes  # noqa: E402
from dtcompile.models.builtins.flux import TINY_FLUX_CONFIG, build_tiny_flux  # noqa: E402
from dtcompile.models.flux import FluxAdapter  # noqa: E402
from dtcompile.quant import accuracy as acc  # noqa: E402
from dtcompile.quant import calibration as cal  # noqa: E402
from dtcompile.quant import get_format  # noqa: E402
from dtcompile.quant import parity as par  # noqa: E402
from dtcompile.quant.export import QuantizedOnnx, export_quantized  # noqa: E402
from dtcompile.recipe.quant import parse_quant_spec  # noqa: E402

ADAPTER = FluxAdapter()
RUN = {"height": 32, "width": 32, "max_sequence_length": 16}
SHAPES = Shapes(batch=Range(1, 1, 2), height=Range(32, 32, 64), width=Range(32, 32, 64), text_len=Range(16, 16, 16))
# tiny-flux cut to one double and one single block: the same layer kinds, half the export and build time.
CONFIG = {
    **TINY_FLUX_CONFIG,
    "transformer": {**TINY_FLUX_CONFIG["transformer"], "num_layers": 1, "num_single_layers": 1},
}
SPECS = {
    "fp8": {"format": "fp8", "quantize_mha": True},
    "int8": {"format": "int8"},
    "nvfp4": {"format": "nvfp4"},
    "svdquant": {"format": "svdquant", "rank": 8},
}


class Built:
    """A quantized pipeline, its fake-quant trace on held-out prompts and its exported graph."""

    def __init__(self, fmt: str, root: Path, dtype: torch.dtype = torch.float32) -> None:
        self.fmt = fmt
        self.pipe = build_tiny_flux(0, CONFIG).to(dtype)
        self.pipe.set_progress_bar_config(disable=True)
        calib = {"prompts": ["a cat", "a dog on a beach"], "size": 2, "batch": 2, "steps": 2}
        spec = parse_quant_spec({**SPECS[fmt], "calib": calib})
        cal.calibrate(self.pipe, ADAPTER, spec, root / "cache", **RUN)
        self.trace = acc.trace_pipeline(self.pipe, ADAPTER, acc.HELDOUT_PROMPTS[:2], steps=2, **RUN)
        module = self.pipe.transformer
        export_spec = ADAPTER.export_spec(module, ADAPTER.pipe_config(self.pipe), SHAPES, dtype)
        self.onnx: QuantizedOnnx = export_quantized(
            ADAPTER.export_module(module), export_spec, root / fmt, quant_format=fmt, dtype=str(dtype)[6:]
        )
        self.profile = ADAPTER.shape_profile(module, ADAPTER.pipe_config(self.pipe), SHAPES)
        self.root = root

    @property
    def path(self) -> Path:
        return self.onnx.artifact.path

    def graph(self) -> Any:
        return onnx.load(str(self.path))

    def engine(self, arch: str) -> Any:
        from dtcompile.backends.tensorrt import engine_from_onnx

        return engine_from_onnx(self.path, self.profile, arch, "tensorrt-rtx", self.root / f"{self.fmt}-{arch}.engine")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[tuple[str, torch.dtype], Built] = {}

    def get(fmt: str, dtype: torch.dtype = torch.float32) -> Built:
        if (fmt, dtype) not in cache:
            cache[fmt, dtype] = Built(fmt, tmp_path_factory.mktemp(f"quant-{fmt}"), dtype)
        return cache[fmt, dtype]

    return get


def rtx() -> None:
    pytest.importorskip("tensorrt_rtx")


def assert_parity(b: Built, limit: float) -> par.ParityResult:
    result = par.parity_report(b.pipe, ADAPTER, b.trace, b.path, b.fmt)
    assert result.report is not None and result.skipped is None
    assert result.report.max_rel_err < limit, result.report.teacher_forced
    assert min(result.report.psnr_db) > 60
    return result


def test_fp8_graph_is_standard_qdq_with_fp8_attention(built: Any) -> None:
    b = built("fp8")
    graph = b.graph()
    assert {n.domain for n in graph.graph.node} == {""}
    assert [o.domain for o in graph.opset_import] == [""]
    report = b.onnx.qdq
    assert report.onnxruntime_runnable and report.opset == 19 and report.int8_qdq == 0
    # 2 attentions (1 double + 1 single block): MatMul-Softmax-MatMul with fp8 Q/DQ on Q, K, softmax and V.
    assert b.onnx.fp8_attention == 2
    fp8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims]
    assert len(fp8_weights) == report.folded_weights > 0  # weights stored in fp8
    assert report.fp8_qdq == report.folded_weights + sum(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    activations = sum(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    assert activations == report.folded_weights + 2 * 4  # linear inputs + Q, K, softmax, V per attention
    result = assert_parity(b, 1e-3)
    assert result.graph == "exported" and result.tolerance == get_format("fp8").parity_tolerance


def test_int8_graph_runs_in_onnxruntime_like_the_fake_quant_model(built: Any) -> None:
    b = built("int8")
    graph = b.graph()
    assert {n.domain for n in graph.graph.node} == {""}
    assert b.onnx.qdq.int8_qdq > 0 and b.onnx.qdq.fp8_qdq == 0 and b.onnx.fp8_attention == 0
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2 for t in graph.graph.initializer)
    assert_parity(b, 1e-4)


def test_nvfp4_graph_keeps_only_tensorrts_dynamic_quantize(built: Any) -> None:
    b = built("nvfp4")
    report = b.onnx.qdq
    assert report.custom_ops == {"trt::TRT_FP4DynamicQuantize": report.fp4_activations}
    assert report.fp4_weights == report.fp4_activations > 0
    assert report.opset == 23 and not report.onnxruntime_runnable
    manifest = b.onnx.to_manifest()
    assert manifest["onnxruntime_runnable"] is False and "trt::TRT_FP4DynamicQuantize" in manifest["custom_ops"]
    result = assert_parity(b, 1e-5)  # onnxruntime on a copy with the TensorRT op emulated by standard ops
    assert result.graph == "exported, trt::TRT_FP4DynamicQuantize emulated by standard ops"
    assert {n.domain for n in b.graph().graph.node} == {"", "trt"}  # the shipped graph is unchanged


def test_svdquant_graph_adds_the_low_rank_branch(built: Any) -> None:
    b = built("svdquant")
    nv = built("nvfp4")
    assert b.onnx.qdq.custom_ops == nv.onnx.qdq.custom_ops
    ops, nv_ops = b.onnx.artifact.op_types, nv.onnx.artifact.op_types
    assert ops["MatMul"] > nv_ops["MatMul"]  # x @ A^T @ B^T per quantized layer, in high precision
    assert_parity(b, 1e-5)


def test_bfloat16_graph_is_checked_in_float32(built: Any) -> None:
    b = built("fp8", torch.bfloat16)
    result = par.parity_report(b.pipe, ADAPTER, b.trace, b.path, b.fmt)
    assert "bfloat16 computed in float32" in result.graph
    # gating: both sides in float32 (the fake-quant model's float32 copy with the graph's rounded scales)
    assert result.tolerance == get_format("fp8").parity_tolerance
    assert result.report.max_rel_err < 1e-5  # measured 1.5e-7: nothing but the export differs
    # information only: against the bfloat16 model, whose rounding alone costs about 3e-2 here
    assert result.end_to_end is not None
    assert result.end_to_end.max_rel_err < par.DTYPE_PARITY_FLOOR["bfloat16"]
    assert min(result.end_to_end.psnr_db) > 30
    entry = result.to_manifest()
    assert entry["precision"] == "float32" and entry["end_to_end"]["dtype"] == "bfloat16"
    assert entry["summary"]["max_rel_err"] <= entry["gate"] and "min_psnr_db" in entry["end_to_end"]["summary"]


def test_fp8_engine_builds_for_ada_and_is_refused_for_ampere(built: Any) -> None:
    rtx()
    b = built("fp8")
    info = b.engine("sm_89")
    assert info.strongly_typed and info.size > 0
    assert get_format("fp8").supports("tensorrt-rtx", "sm_86") is not None  # our dry-run rule ...
    with pytest.raises(BuildError, match="fp8"):  # ... is TensorRT-RTX's own
        b.engine("sm_86")


def test_int8_engine_builds_for_ampere(built: Any) -> None:
    rtx()
    assert built("int8").engine("sm_86").size > 0


def test_nvfp4_engine_builds_for_blackwell_only(built: Any) -> None:
    rtx()
    b = built("nvfp4")
    assert b.engine("sm_120").size > 0
    with pytest.raises(BuildError, match="fp4"):
        b.engine("sm_89")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "arch"),
    [("fp8", "sm_120"), ("int8", "sm_89"), ("int8", "sm_120"), ("nvfp4", "sm_121"), ("svdquant", "sm_120")],
)
def test_engine_matrix(built: Any, fmt: str, arch: str) -> None:
    rtx()
    assert get_format(fmt).supports("tensorrt-rtx", arch) is None
    assert built(fmt).engine(arch).size > 0


# --- a 16-bit model computing in float32 for parity (b), without a float32 copy -----------------------------------


def float32_copy_reference(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """What ``float32_compute`` replaced, kept as its reference: a float32 deep copy of the fake-quant model with
    each fp8/int8 amax rounded as the graph holds it and the graph's dtype on the fp8 attentions."""
    import copy
    import types

    from modelopt.torch.quantization.nn import TensorQuantizer

    from dtcompile.quant import export as qexport

    memo: dict[int, Any] = {}  # fp8 attention routing holds torch.nn.functional, which deepcopy cannot copy
    for sub in module.modules():
        for entry in sub.__dict__.get("_functionals_to_replace", ()):
            if isinstance(entry[0], types.ModuleType):
                memo[id(entry[0])] = entry[0]
    reference = copy.deepcopy(module, memo).float()
    for sub in reference.modules():
        if isinstance(sub, TensorQuantizer):
            qexport._round_amax_as_exported(sub, dtype)
    for _, attention in qexport.attention_modules(reference):
        if attention.__dict__.get("_functionals_to_replace"):
            setattr(attention, qexport._GRAPH_DTYPE_ATTR, dtype)
    return reference


def module_state(module: torch.nn.Module) -> dict[str, Any]:
    """Everything ``float32_compute`` may touch: tensors (values, dtypes, storage), hooks, instance attributes."""
    return {
        "tensors": {k: (v.dtype, v.data_ptr(), v.clone()) for k, v in module.state_dict(keep_vars=True).items()},
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules()),
        "attributes": [sorted(m.__dict__) for m in module.modules()],
    }


def assert_same_state(module: torch.nn.Module, before: dict[str, Any]) -> None:
    after = module_state(module)
    assert after["hooks"] == before["hooks"] == 0 and after["attributes"] == before["attributes"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (dtype, ptr, value) in before["tensors"].items():
        got_dtype, got_ptr, got = after["tensors"][name]
        assert (got_dtype, got_ptr) == (dtype, ptr) and torch.equal(got, value), name


@pytest.fixture(scope="module")
def bf16_quantized(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(pipeline, two-step trace on one prompt) of a bfloat16 tiny-FLUX quantized in ``fmt`` (not exported)."""
    cache: dict[str, Any] = {}

    def get(fmt: str) -> Any:
        if fmt not in cache:
            pipe = build_tiny_flux(0, CONFIG).to(torch.bfloat16)
            pipe.set_progress_bar_config(disable=True)
            calib = {"prompts": ["a cat", "a dog on a beach"], "size": 2, "batch": 2, "steps": 2}  # as Built's
            spec = parse_quant_spec({**SPECS[fmt], "calib": calib})
            cal.calibrate(pipe, ADAPTER, spec, tmp_path_factory.mktemp(f"bf16-{fmt}"), **RUN)
            cache[fmt] = pipe, acc.trace_pipeline(pipe, ADAPTER, acc.HELDOUT_PROMPTS[:1], steps=2, **RUN)
        return cache[fmt]

    return get


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nvfp4"])
def test_float32_compute_equals_a_float32_copy_one_block_at_a_time(bf16_quantized: Any, fmt: str) -> None:
    from dtcompile.quant.export import _GRAPH_DTYPE_ATTR, attention_modules, float32_compute

    pipe, trace = bf16_quantized(fmt)
    module = pipe.transformer
    fp8_attentions = [a for _, a in attention_modules(module) if a.__dict__.get("_functionals_to_replace")]
    assert bool(fp8_attentions) == (fmt == "fp8")  # SPECS: fp8 with quantize_mha
    before = module_state(module)
    expected = acc.teacher_forced(float32_copy_reference(module, torch.bfloat16), trace, torch.float32)

    blocks = [*module.transformer_blocks, *module.single_transformer_blocks]
    widened: list[int] = []  # blocks in float32 at each block call

    def count(_block: Any, _args: Any) -> None:
        widened.append(sum(next(b.parameters()).dtype == torch.float32 for b in blocks))

    with float32_compute(module, torch.bfloat16) as reference:
        assert reference is module
        amax = [b for n, b in module.named_buffers() if n.endswith("._amax")]
        assert amax and all(a.dtype == torch.float32 for a in amax)  # bfloat16 outside the context
        assert all(getattr(a, _GRAPH_DTYPE_ATTR) == torch.bfloat16 for a in fp8_attentions)
        handles = [b.register_forward_pre_hook(count) for b in blocks]  # after the context's own hooks
        got = acc.teacher_forced(module, trace, torch.float32)
        for h in handles:
            h.remove()
    assert widened == [1] * len(blocks) * 2  # 2 steps: each block in float32 only during its own call
    assert [len(g) for g in got] == [len(e) for e in expected] == [2]  # 1 prompt, 2 steps
    assert all(torch.equal(g, e) for g, e in zip(got[0], expected[0], strict=True))
    assert_same_state(module, before)
    # the restored module computes as before
    with torch.no_grad():
        again = acc.teacher_forced(module, trace)
    assert all(torch.equal(a, b) for a, b in zip(again[0], trace.noise[0], strict=True))


def test_float32_compute_restores_the_module_when_a_block_raises(bf16_quantized: Any) -> None:
    from dtcompile.quant.export import float32_compute

    pipe, trace = bf16_quantized("fp8")
    module = pipe.transformer
    before = module_state(module)
    block = module.transformer_blocks[0]
    seen: list[torch.dtype] = []

    def boom(_module: Any, _args: Any, _out: Any) -> None:
        seen.append(next(block.parameters()).dtype)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), float32_compute(module, torch.bfloat16):
        handle = block.ff.register_forward_hook(boom)  # raises inside the block, while it is in float32
        try:
            acc.teacher_forced(module, trace, torch.float32)
        finally:
            handle.remove()
    assert seen == [torch.float32]
    assert_same_state(module, before)
