"""dtcompile/plugins/fused_attention: the Triton kernel (under Triton's CPU interpreter) against PyTorch SDPA, the reference,
the torch custom op and its ONNX node, the AOT build, and the TensorRT plugin classes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:  # not imported here: see _RUNNER
    pytest.skip("the kernel tests need triton (pip install 'dtcompile[plugin]')", allow_module_level=True)

from dtcompile.attention.plugin import load_plugin  # noqa: E402
from dtcompile.core.metrics import rel_l2  # noqa: E402


@pytest.fixture(scope="module")
def plugin():
    return load_plugin()


def _qkv(b: int, h: int, sq: int, sk: int, d: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = torch.randn(b, h, sk, d, generator=g).to(dtype)
    v = torch.randn(b, h, sk, d, generator=g).to(dtype)
    return q, k, v


def _sdpa32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)


# rel L2 against fp32 SDPA on the same (rounded) inputs: about 2.5e-4 (fp16) and 5e-3 (bf16) measured.
TOL = {"float16": 2e-3, "bfloat16": 1.5e-2, "float32": 1e-5}
# (name, dtype, batch, heads, Sq, Sk, head dim, scale, transposed strides): block size is 64, so 77/200/131/33
# are not multiples of it; 16 is tiny-flux's head dim, 64/128 the usual ones (FLUX: 128).
CASES = [
    (f"{dt}-d{d}-s{s}", dt, 2, 3, s, s, d, None, False)
    for dt in ("float16", "bfloat16")
    for d in (64, 128)
    for s in (77, 200)
] + [
    ("cross-scale-strided", "float16", 1, 2, 50, 131, 64, 0.3, True),
    ("fp32-d16", "float32", 1, 4, 33, 33, 16, None, False),
]

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is first imported, and diffusers
# (imported by other tests) imports it.
_RUNNER = """
import json, sys, torch
from dtcompile.attention.plugin import load_plugin
from dtcompile.core.metrics import rel_l2
plugin = load_plugin()
out = {}
for name, dt, b, h, sq, sk, d, scale, strided in json.loads(sys.argv[1]):
    dtype = getattr(torch, dt)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (sq, sk, sk))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    if strided:  # (B, S, H, D) memory viewed as (B, H, S, D), as diffusers hands it over
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    got = plugin.kernel.flash_attention(q, k, v, scale)
    op = plugin.torch_op.register_op()(q, k, v, scale if scale else d ** -0.5)
    out[name] = {"err": rel_l2(got, ref), "torch_err": rel_l2(low, ref), "op_err": rel_l2(op, ref),
                 "shape": list(got.shape), "dtype": str(got.dtype), "contiguous_in": q.is_contiguous()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(CASES)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_sdpa(kernel_results, case) -> None:
    name, dt, b, h, sq, sk, d = case[:7]
    res = kernel_results[name]
    assert res["shape"] == [b, h, sq, d] and res["dtype"] == f"torch.{dt}"
    assert res["err"] <= TOL[dt], f"rel L2 {res['err']:.2e}"
    # within a small factor of torch's own SDPA in that dtype: torch's CPU kernel rounds once at the end, the
    # flash kernel also rounds P to the input dtype before P @ V (as GPU flash attention does): 2.5x in bf16
    assert res["err"] <= 4 * res["torch_err"] + 1e-6, res
    assert res["op_err"] == pytest.approx(res["err"]), "the torch op runs the kernel under the interpreter"
    if case[-1]:
        assert res["contiguous_in"] is False


def test_kernel_rejects_bad_inputs(plugin) -> None:
    q = torch.zeros(1, 1, 8, 24, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dims"):
        plugin.kernel.flash_attention(q, q, q)
    q = torch.zeros(1, 1, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="one of float16/bfloat16/float32"):
        plugin.kernel.flash_attention(q, q, q)


def test_kernel_needs_cuda_or_interpreter(plugin, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 1, 8, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        plugin.kernel.flash_attention(q, q, q)


def test_interpreter_set_too_late_is_named(plugin, monkeypatch) -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.max, InterpretedFunction):
        pytest.skip("this process imported triton with TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 1, 8, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before the process starts"):
        plugin.kernel.flash_attention(q, q, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_sdpa(plugin, dtype) -> None:
    q, k, v = _qkv(2, 2, 40, 40, 32, dtype)
    out = plugin.reference.attention_reference(q, k, v)
    assert out.dtype == dtype
    assert rel_l2(out, _sdpa32(q, k, v)) <= (
        1e-6 if dtype == torch.float32 else TOL[str(dtype).removeprefix("torch.")] / 2
    )


def test_torch_op_cpu_reference_and_fake(plugin, monkeypatch) -> None:
    op = plugin.torch_op.register_op()
    assert plugin.torch_op.register_op() is op  # idempotent: one registration per process
    q, k, v = _qkv(1, 2, 70, 70, 64, torch.float16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = op(q, k, v, 1 / math.sqrt(64))  # CPU without the interpreter: the PyTorch reference
    assert torch.equal(out, plugin.reference.attention_reference(q, k, v))
    assert torch.equal(plugin.torch_op.fused_attention(q, k, v), out)  # scale defaults to 1/sqrt(D)
    with torch.device("meta"):  # the fake implementation gives the shape for tracing
        kv = torch.empty(2, 3, 9, 16, dtype=torch.bfloat16)
        fake = op(torch.empty(2, 3, 5, 16, dtype=torch.bfloat16), kv, kv, 0.25)
    assert fake.shape == (2, 3, 5, 16) and fake.dtype == torch.bfloat16


def test_torch_op_exports_one_plugin_node(plugin, tmp_path) -> None:
    import onnx

    from dtcompile.attention.router import _plugin_symbolic

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return plugin.torch_op.fused_attention(q, k, v) * 2

    q, k, v = _qkv(1, 2, 8, 8, 16, torch.float16)
    with _plugin_symbolic():
        torch.onnx.export(M(), (q, k, v), str(tmp_path / "m.onnx"), opset_version=19, dynamo=False)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    nodes = [n for n in graph.node if n.domain == "dtc"]
    assert [n.op_type for n in nodes] == ["FusedAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"scale": pytest.approx(0.25), "plugin_version": b"1", "plugin_namespace": b"dtc"}


def test_torch_tensorrt_converter_needs_torch_tensorrt(plugin) -> None:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torch_tensorrt imports here; this checks the error where it cannot")
    with pytest.raises(ImportError, match="torch_tensorrt is needed to convert dtc::fused_attention"):
        plugin.torch_op.register_torch_tensorrt_converter()


def test_aot_build_for_sm89(plugin, tmp_path) -> None:
    """The kernel compiles to a cubin for a GPU this machine does not have."""
    index = plugin.build.build(["sm_89"], ["float16"], [64], tmp_path)
    (entry,) = index["kernels"]
    cubin = tmp_path / entry["file"]
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    assert entry["arch"] == "sm_89" and entry["entry"] == "_attn_fwd" and entry["num_warps"] > 0
    with pytest.raises(ValueError, match="head_dim must be one of"):
        plugin.build.compile_kernel("sm_89", "float16", 80)


def test_plugin_record_and_sha(plugin) -> None:
    rec = plugin.plugin_record()
    assert (rec["name"], rec["namespace"], rec["version"], rec["onnx_op"]) == (
        "FusedAttention",
        "dtc",
        "1",
        "dtc::FusedAttention",
    )
    assert rec["sha256"] == plugin.source_sha256() and len(rec["sha256"]) == 64
    assert {p.name for p in plugin.source_files()} >= {"kernel.py", "reference.py", "trt_plugin.py", "torch_op.py"}


def test_trt_plugin_classes_bind_to_tensorrt_rtx(plugin) -> None:
    """The IPluginV3 classes construct against tensorrt_rtx's bindings (RTX's parser cannot use them: see
    test_attention.py::test_plugin_graph_refused_by_rtx_before_parsing)."""
    trt = pytest.importorskip("tensorrt_rtx")
    import numpy as np

    plugin_cls, creator_cls = plugin.trt_plugin.plugin_classes(trt)
    creator = creator_cls()
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == ("FusedAttention", "dtc", "1")
    fc = trt.PluginFieldCollection(
        [trt.PluginField("scale", np.array([0.125], np.float32), trt.PluginFieldType.FLOAT32)]
    )
    p = creator.create_plugin("attn", fc, trt.TensorRTPhase.BUILD)
    assert isinstance(p, plugin_cls) and p.scale == pytest.approx(0.125)
    assert p.get_output_data_types([trt.DataType.HALF] * 3) == [trt.DataType.HALF]
    twin = p.clone()
    assert twin is not p and twin.scale == p.scale
    (field,) = list(p.get_fields_to_serialize())
    assert field.name == "scale"
