"""Q/DQ post-processing on small hand-built graphs: TensorRT custom ops in, standard ONNX Q/DQ out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from dtcompile.quant.nvfp4 import nvfp4_fake_quant  # noqa: E402
from dtcompile.quant.qdq.fp4 import FP4_BLOCK_DQ_PLACEHOLDER, decode_nvfp4, nvfp4_pack  # noqa: E402
from dtcompile.quant.qdq.reference import float32_copy, fp4_reference_graph  # noqa: E402
from dtcompile.quant.qdq.standardize import standardize_file, standardize_qdq  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 32)).astype(np.float32)
W = (RNG.standard_normal((16, 32)) * 0.1).astype(np.float32)


def model(nodes: list, inits: list, opset: int = 19, value_info: tuple = ()) -> onnx.ModelProto:
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("X", T.FLOAT, [3, 32])],
        [h.make_tensor_value_info("Y", T.FLOAT, [3, 16])],
        initializer=inits,
        value_info=list(value_info),
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset), h.make_opsetid("trt", 1)])
    m.ir_version = 9
    return m


def run(m: onnx.ModelProto) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": X})[0]


def fp8_qdq(a: np.ndarray, scale: float) -> np.ndarray:
    s = torch.tensor(scale, dtype=torch.float32)
    t = (torch.from_numpy(a) / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return t.numpy()


def test_fp8_custom_ops_become_standard_qdq_with_fp8_weights() -> None:
    sx, sw = float(np.abs(X).max() / 448), float(np.abs(W).max() / 448)
    nodes = [
        h.make_node("TRT_FP8QuantizeLinear", ["X", "sx"], ["xq"], domain="trt"),
        h.make_node("TRT_FP8DequantizeLinear", ["xq", "sx"], ["xd"], domain="trt"),
        h.make_node("TRT_FP8QuantizeLinear", ["W", "sw"], ["wq"], domain="trt"),
        h.make_node("TRT_FP8DequantizeLinear", ["wq", "sw"], ["wd"], domain="trt"),
        h.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        h.make_node("MatMul", ["xd", "wt"], ["Y"]),
    ]
    inits = [nh.from_array(W, "W"), nh.from_array(np.float32(sx), "sx"), nh.from_array(np.float32(sw), "sw")]
    stale = h.make_tensor_value_info("xq", T.UINT8, [3, 32])  # what the exporter writes
    m = model(nodes, inits, value_info=[stale])
    report = standardize_qdq(m, "float32")
    onnx.checker.check_model(m)

    ops = [(n.domain, n.op_type) for n in m.graph.node]
    assert ops.count(("", "QuantizeLinear")) == 1  # the activation; the weight Q is folded away
    assert ops.count(("", "DequantizeLinear")) == 2
    assert ("", "Transpose") not in ops  # weight stored transposed: DQ -> MatMul
    assert [o.domain for o in m.opset_import] == [""]
    assert not m.graph.value_info
    weight = next(t for t in m.graph.initializer if t.name == "W_fp8")
    assert weight.data_type == T.FLOAT8E4M3FN and list(weight.dims) == [32, 16]
    zp = next(t for t in m.graph.initializer if t.name == "dtc_fp8_zero_point")
    assert zp.data_type == T.FLOAT8E4M3FN
    assert (report.fp8_qdq, report.folded_weights, report.folded_transposes) == (2, 1, 1)
    assert report.onnxruntime_runnable and report.opset == 19

    expected = fp8_qdq(X, sx) @ fp8_qdq(W, sw).T
    np.testing.assert_allclose(run(m), expected, rtol=1e-6, atol=1e-6)


def test_int8_weights_fold_and_keep_their_channel_axis() -> None:
    sx = np.float32(np.abs(X).max() / 127)
    sw = (np.abs(W).max(axis=1) / 127).astype(np.float32)  # per output channel (axis 0)
    nodes = [
        h.make_node("QuantizeLinear", ["X", "sx", "zx"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        h.make_node("QuantizeLinear", ["W", "sw", "zw"], ["wq"], axis=0),
        h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        h.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        h.make_node("MatMul", ["xd", "wt"], ["Y"]),
    ]
    inits = [
        nh.from_array(W, "W"),
        nh.from_array(sx, "sx"),
        nh.from_array(np.int8(0), "zx"),
        nh.from_array(sw, "sw"),
        nh.from_array(np.zeros(16, np.int8), "zw"),
    ]
    m = model(nodes, inits)
    before = run(m)
    report = standardize_qdq(m, "float32")
    onnx.checker.check_model(m)
    weight = next(t for t in m.graph.initializer if t.name == "W_int8")
    assert weight.data_type == T.INT8 and list(weight.dims) == [32, 16]
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W_int8")
    assert h.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == 1
    assert (report.int8_qdq, report.folded_weights) == (2, 1)
    np.testing.assert_array_equal(run(m), before)  # folding changes storage, not numbers


def test_nvfp4_weights_packed_in_chunks_are_packed_as_a_whole(monkeypatch: Any) -> None:
    from dtcompile.quant.qdq import graph

    w = (RNG.standard_normal((37, 32)) * 3).astype(np.float32)
    whole = nvfp4_pack(w, 16)
    monkeypatch.setattr(graph, "CHUNK_ELEMENTS", 100)  # 3 rows at a time, the last block short
    for got, expected in zip(nvfp4_pack(w, 16), whole, strict=True):
        np.testing.assert_array_equal(got, expected)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = nvfp4_pack(torch.from_numpy(w).bfloat16().float().numpy().astype(ml_dtypes.bfloat16), 16)
    for got, expected in zip(bf16, nvfp4_pack(torch.from_numpy(w).bfloat16().float().numpy(), 16), strict=True):
        np.testing.assert_array_equal(got, expected)  # a bf16 weight is widened chunk by chunk, exactly


def test_nvfp4_weight_encoding_matches_the_fake_quant() -> None:
    packed, scales, global_scale = nvfp4_pack(W, 16)
    assert packed.shape == (16, 16) and scales.shape == (16, 2)
    w4 = h.make_tensor("w", T.FLOAT4E2M1, [16, 32], packed.tobytes(), raw=True)
    s8 = h.make_tensor("s", T.FLOAT8E4M3FN, [16, 2], scales.tobytes(), raw=True)
    decoded = decode_nvfp4(w4, s8, global_scale, 16)
    expected = nvfp4_fake_quant(torch.from_numpy(W), 16, torch.tensor(np.abs(W).max())).numpy()
    np.testing.assert_array_equal(decoded, expected)
    # A block whose amax is 6 x the per-tensor scale has block scale 1: values round onto the E2M1 grid, midpoints
    # to the even neighbour.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.75, -2.5, 0.3, 5.9, 0, 0, 0, 0])
    got = nvfp4_fake_quant(ties, 16, torch.tensor(6.0 * 448.0))  # per-tensor scale 1
    assert got.tolist()[:12] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, -2.0, 0.5, 6.0]


def test_nvfp4_graph_keeps_only_the_dynamic_quantize_custom_op() -> None:
    amax = float(np.abs(X).max())
    nodes = [
        h.make_node(
            "TRT_FP4DynamicQuantize",
            ["X", "sf2"],
            ["x4", "s8"],
            domain="trt",
            axis=-1,
            block_size=16,
            scale_type=T.FLOAT8E4M3FN,
        ),
        h.make_node("DequantizeLinear", ["s8", "sf2"], ["sx"]),
        h.make_node(FP4_BLOCK_DQ_PLACEHOLDER, ["x4", "sx"], ["xd"], domain="trt", axis=-1, block_size=16),
        h.make_node("TRT_FP4QDQ", ["W"], ["wd"], domain="trt", block_size=16),
        h.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        h.make_node("MatMul", ["xd", "wt"], ["Y"]),
    ]
    inits = [nh.from_array(W, "W"), nh.from_array(np.float32(amax / 6.0 / 448.0), "sf2")]
    m = model(nodes, inits)
    report = standardize_qdq(m, "float32")
    onnx.checker.check_model(m)
    assert report.custom_ops == {"trt::TRT_FP4DynamicQuantize": 1}
    assert not report.onnxruntime_runnable
    assert (report.fp4_weights, report.fp4_activations, report.opset) == (1, 1, 23)
    assert m.ir_version >= 11
    assert any(t.data_type == T.FLOAT4E2M1 for t in m.graph.initializer)
    assert not any(n.op_type == FP4_BLOCK_DQ_PLACEHOLDER for n in m.graph.node)

    reference = fp4_reference_graph(m)  # onnxruntime stand-in for the TensorRT op; the graph itself is kept
    assert any(n.domain == "trt" for n in m.graph.node)
    got = run(reference)
    x_q = nvfp4_fake_quant(torch.from_numpy(X), 16, torch.tensor(amax))
    w_q = nvfp4_fake_quant(torch.from_numpy(W), 16, torch.tensor(np.abs(W).max()))
    np.testing.assert_allclose(got, (x_q @ w_q.T).numpy(), rtol=1e-5, atol=1e-6)


# --- the same rewrite on a graph with external data, one weight at a time -----------------------------------------

WIDE = (RNG.standard_normal((64, 32)) * 0.1).astype(np.float32)  # 8 KiB: external at any threshold


def _qdq_nodes(fmt: str) -> list[onnx.NodeProto]:
    """Activation X and weight W through the exporter's fp8 (``trt::``) or int8 Q/DQ pairs, to xd and wd."""
    if fmt == "fp8":
        q, dq, zx, zw, axis, domain = "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear", [], [], {}, "trt"
    else:
        q, dq, zx, zw, axis, domain = "QuantizeLinear", "DequantizeLinear", ["zx"], ["zw"], {"axis": 0}, ""
    return [
        h.make_node(q, ["X", "sx", *zx], ["xq"], domain=domain),
        h.make_node(dq, ["xq", "sx", *zx], ["xd"], domain=domain),
        h.make_node(q, ["W", "sw", *zw], ["wq"], domain=domain, **axis),
        h.make_node(dq, ["wq", "sw", *zw], ["wd"], domain=domain, **axis),
    ]


def _graph_for(fmt: str) -> onnx.ModelProto:
    """A graph of each weight kind with a bias from a Constant node (a tensor attribute), output Y [3, 64]."""
    sx = np.float32(np.abs(X).max() / 448)
    if fmt == "fp8":
        sw = np.float32(np.abs(WIDE).max() / 448)
        quant = _qdq_nodes("fp8")
        inits = [nh.from_array(sx, "sx"), nh.from_array(sw, "sw")]
    elif fmt == "int8":
        sw = (np.abs(WIDE).max(axis=1) / 127).astype(np.float32)
        quant = _qdq_nodes("int8")
        inits = [
            nh.from_array(np.float32(np.abs(X).max() / 127), "sx"),
            nh.from_array(np.int8(0), "zx"),
            nh.from_array(sw, "sw"),
            nh.from_array(np.zeros(64, np.int8), "zw"),
        ]
    else:
        quant = [
            h.make_node("Identity", ["X"], ["xd"]),
            h.make_node("TRT_FP4QDQ", ["W"], ["wd"], domain="trt", block_size=16),
        ]
        inits = []
    nodes = [
        *quant,
        h.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        h.make_node("MatMul", ["xd", "wt"], ["mm"]),
        h.make_node("Constant", [], ["bias"], value=nh.from_array(np.linspace(-1, 1, 64, dtype=np.float32))),
        h.make_node("Add", ["mm", "bias"], ["Y"]),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("X", T.FLOAT, [3, 32])],
        [h.make_tensor_value_info("Y", T.FLOAT, [3, 64])],
        initializer=[nh.from_array(WIDE, "W"), *inits],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 19), h.make_opsetid("trt", 1)])
    m.ir_version = 9
    return m


def _values(m: onnx.ModelProto) -> dict[str, tuple[int, list[int], bytes]]:
    """Every initializer and tensor attribute: (type, dims, value bytes), whatever its storage."""
    out = {t.name: (t.data_type, list(t.dims), nh.to_array(t).tobytes()) for t in m.graph.initializer}
    for n in m.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                out[f"{n.output[0]}:{a.name}"] = (a.t.data_type, list(a.t.dims), nh.to_array(a.t).tobytes())
    return out


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nvfp4"])
def test_external_data_graph_is_rewritten_like_the_in_memory_one(tmp_path: Any, fmt: str) -> None:
    from onnx.external_data_helper import convert_model_to_external_data

    expected = _graph_for(fmt)
    expected_report = standardize_qdq(expected, "float32")

    m = _graph_for(fmt)
    # every tensor external, scales and the Constant's attribute included: each is read back from disk
    convert_model_to_external_data(m, location="g.onnx.data", size_threshold=0, convert_attribute=True)
    path = tmp_path / "g.onnx"
    onnx.save_model(m, str(path))
    report = standardize_file(path, "float32")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # no scratch left
    header = onnx.load(str(path), load_external_data=False)
    weight = next(
        t for t in header.graph.initializer if t.name == {"fp8": "W_fp8", "int8": "W_int8", "nvfp4": "W_fp4"}[fmt]
    )
    assert weight.data_location == T.EXTERNAL  # the folded weight went to the data file
    got = onnx.load(str(path))
    assert report == expected_report
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in expected.graph.node
    ]
    assert _values(got) == _values(expected)  # same quantized bytes
    if fmt != "nvfp4":
        np.testing.assert_array_equal(run(got), run(expected))


@pytest.mark.parametrize(("qdtype", "axis"), [("float8_e4m3fn", None), ("int8", None), ("int8", 0), ("int8", 1)])
def test_weights_quantized_in_chunks_are_quantized_as_a_whole(monkeypatch: Any, qdtype: str, axis: Any) -> None:
    from dtcompile.core.numerics import quantize_with_scale
    from dtcompile.quant.qdq import graph, weights

    w = (RNG.standard_normal((37, 24)) * 3).astype(np.float32)
    scale = (np.abs(w).max(axis=1 - axis) / 127).astype(np.float32) if axis is not None else np.float32(0.01)
    whole = quantize_with_scale(torch.from_numpy(w), torch.from_numpy(np.asarray(scale)), qdtype, axis)
    whole = whole.view(torch.uint8) if qdtype == "float8_e4m3fn" else whole
    monkeypatch.setattr(graph, "CHUNK_ELEMENTS", 100)  # 4 rows at a time, the last block short
    got = weights._quantize_in_chunks(w, np.asarray(scale), qdtype, axis)
    np.testing.assert_array_equal(got, whole.numpy())


# --- the float32 copy onnxruntime runs for a bfloat16 graph, streamed one weight at a time --------------------------


UNQUANTIZED = (RNG.standard_normal((32, 64)) * 0.1).astype(np.float32)  # 4 KiB in bfloat16, 8 KiB widened


def _bf16(a: np.ndarray, name: str) -> onnx.TensorProto:
    raw = torch.from_numpy(np.array(a, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return h.make_tensor(name, T.BFLOAT16, list(np.shape(a)), raw, raw=True)


def _bf16_graph_for(fmt: str) -> onnx.ModelProto:
    """A bfloat16 graph of each weight kind as the exporter writes it (bfloat16 input, weight, fp8/int8 scales;
    float32 NVFP4 per-tensor scale), then standardized, plus an unquantized bfloat16 MatMul whose weight is a
    Constant node (a tensor attribute) and a Constant bias. Output Y [3, 64]."""
    w = nh.from_array(WIDE, "W")
    if fmt == "fp8":
        quant = _qdq_nodes("fp8")
        inits = [_bf16(np.float32(np.abs(X).max() / 448), "sx"), _bf16(np.float32(np.abs(WIDE).max() / 448), "sw")]
    elif fmt == "int8":
        quant = _qdq_nodes("int8")
        inits = [
            _bf16(np.float32(np.abs(X).max() / 127), "sx"),
            nh.from_array(np.int8(0), "zx"),
            _bf16(np.abs(WIDE).max(axis=1) / 127, "sw"),
            nh.from_array(np.zeros(64, np.int8), "zw"),
        ]
    else:
        dynamic = {"axis": -1, "block_size": 16, "scale_type": T.FLOAT8E4M3FN}
        quant = [
            h.make_node("TRT_FP4DynamicQuantize", ["X", "sf2"], ["x4", "s8"], domain="trt", **dynamic),
            h.make_node("DequantizeLinear", ["s8", "sf2"], ["sx"]),
            h.make_node(FP4_BLOCK_DQ_PLACEHOLDER, ["x4", "sx"], ["xd"], domain="trt", axis=-1, block_size=16),
            h.make_node("TRT_FP4QDQ", ["W"], ["wd"], domain="trt", block_size=16),
        ]
        inits = [nh.from_array(np.float32(np.abs(X).max() / 6.0 / 448.0), "sf2")]
    nodes = [
        *quant,
        h.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        h.make_node("MatMul", ["xd", "wt"], ["mm"]),
        h.make_node("Constant", [], ["w2"], value=_bf16(UNQUANTIZED, "w2")),
        h.make_node("MatMul", ["X", "w2"], ["mm2"]),
        h.make_node("Add", ["mm", "mm2"], ["sum"]),
        h.make_node("Constant", [], ["bias"], value=_bf16(np.linspace(-1, 1, 64, dtype=np.float32), "bias")),
        h.make_node("Add", ["sum", "bias"], ["Y"]),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("X", T.BFLOAT16, [3, 32])],
        [h.make_tensor_value_info("Y", T.BFLOAT16, [3, 64])],
        initializer=[_bf16(nh.to_array(w), "W"), *inits],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 19), h.make_opsetid("trt", 1)])
    m.ir_version = 9
    standardize_qdq(m, "bfloat16")
    return m


def _nodes(m: onnx.ModelProto) -> list[tuple[Any, ...]]:
    """Every node's op, I/O and non-tensor attributes (tensor attributes: ``_values``)."""
    return [
        (n.domain, n.op_type, list(n.input), list(n.output),
         sorted((a.name, a.type, a.i, a.f, a.s, list(a.ints)) for a in n.attribute if not a.HasField("t")))
        for n in m.graph.node
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nvfp4"])
def test_runnable_graph_of_a_bfloat16_graph_streams_like_the_in_memory_copy(tmp_path: Any, fmt: str) -> None:
    from onnx.external_data_helper import ExternalDataInfo, convert_model_to_external_data

    from dtcompile.quant.parity import runnable_graph
    from dtcompile.quant.qdq.external import all_tensors

    m = _bf16_graph_for(fmt)
    expected = float32_copy(fp4_reference_graph(m) if fmt == "nvfp4" else m)  # in memory, as before
    # every tensor external, scales and the Constant's attribute included: each is read back from disk
    convert_model_to_external_data(m, location="g.onnx.data", size_threshold=0, convert_attribute=True)
    (tmp_path / "src").mkdir()
    onnx.save_model(m, str(tmp_path / "src" / "g.onnx"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path, notes = runnable_graph(tmp_path / "src" / "g.onnx", "bfloat16", scratch)

    assert path == scratch / "reference.onnx" and notes[-1].startswith("bfloat16 computed in float32")
    assert sorted(p.name for p in scratch.iterdir()) == ["reference.onnx", "reference.onnx.data"]
    header = onnx.load(str(path), load_external_data=False)
    external = {t.name: ExternalDataInfo(t) for t, _ in all_tensors(header.graph) if t.data_location == T.EXTERNAL}
    assert {e.location for e in external.values()} == {"reference.onnx.data"}  # one data file, relative
    assert "w2" in external  # the widened Constant, written to the new file
    assert {"fp8": "W_fp8", "int8": "W_int8", "nvfp4": "wd_f32"}[fmt] in external  # copied over, or decoded
    got = onnx.load(str(path))
    assert _nodes(got) == _nodes(expected)
    assert _values(got) == _values(expected)
    assert [(v.name, v.type) for v in [*got.graph.input, *got.graph.output, *got.graph.value_info]] == [
        (v.name, v.type) for v in [*expected.graph.input, *expected.graph.output, *expected.graph.value_info]
    ]
    assert not any(t.data_type in (T.BFLOAT16, T.FLOAT4E2M1) for t in got.graph.initializer)
    np.testing.assert_array_equal(run(got), run(expected))
