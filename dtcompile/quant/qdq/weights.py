"""Weight folding: ``W(initializer) -> Q -> DQ`` becomes a quantized initializer ``-> DQ`` (fp8 and int8), and a
``DQ -> Transpose -> MatMul`` weight is stored transposed (``DQ -> MatMul``, the pattern TensorRT fuses).

Input: a graph view (``Graph``) of an exported fake-quant graph. Output: the same graph, edited in place, with the
report's ``folded_weights``/``folded_transposes``/``fp8_qdq`` counted. Weights are quantized a block of rows at a
time (``graph.CHUNK_ELEMENTS``), one weight at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtcompile.core.numerics import quantize_with_scale
from dtcompile.quant.qdq import graph as _graph
from dtcompile.quant.qdq.graph import (
    TRT_DOMAIN,
    Graph,
    drop_value_info,
    node_attr,
    remove_nodes,
    reroute,
    set_node_attr,
    to_f32,
)

if TYPE_CHECKING:
    import numpy as np

    from dtcompile.quant.qdq.report import QdqReport


def fold_weights(g: Graph, report: QdqReport) -> None:
    """``W(initializer) -> Q -> DQ`` becomes ``Wq(initializer) -> DQ`` for fp8 and int8 weights."""
    import onnx
    from onnx import numpy_helper

    new_inits: list[onnx.TensorProto] = []
    dead: set[int] = set()
    for q in list(g.g.node):
        match = _foldable_weight(g, q)
        if match is None:
            continue
        dq, weight, scale, fp8 = match
        int8 = not fp8
        axis = node_attr(q, "axis", 1)
        qvals = _quantize_int8(weight, scale, axis) if int8 else _quantize_fp8(weight, scale)
        transpose = _transpose_to_matmul(g, dq)
        if transpose is not None:
            perm = node_attr(transpose, "perm", None) or list(reversed(range(qvals.ndim)))
            qvals = qvals.transpose(perm)
            if int8 and scale.ndim == 1:
                axis = list(perm).index(axis if axis >= 0 else axis + weight.ndim)
        name = f"{q.input[0]}_{'fp8' if fp8 else 'int8'}"
        if fp8:
            tensor = onnx.helper.make_tensor(
                name, onnx.TensorProto.FLOAT8E4M3FN, list(qvals.shape), qvals.tobytes(), raw=True
            )
        else:
            tensor = numpy_helper.from_array(qvals, name)
        new_inits.append(g.new_initializer(tensor))
        del weight, qvals, tensor, match  # one weight at a time
        dq.input[0] = name
        if fp8:
            dq.domain, dq.op_type = "", "DequantizeLinear"
            report.fp8_qdq += 1
        if int8 and scale.ndim == 1:
            set_node_attr(dq, "axis", axis)
        if transpose is not None:
            reroute(g, transpose.output[0], dq.output[0])
            dead.add(id(transpose))
            report.folded_transposes += 1
        drop_value_info(g.g, dq.output[0])
        dead.add(id(q))
        report.folded_weights += 1
    remove_nodes(g.g, dead)
    g.g.initializer.extend(new_inits)


def _foldable_weight(g: Graph, q: Any) -> tuple[Any, np.ndarray, np.ndarray, bool] | None:
    """(DQ, weight, scale, fp8) when ``q`` quantizes a constant weight (fp8, or int8 with a zero int8 zero
    point) into exactly one DQ; None for anything else."""
    fp8 = q.domain == TRT_DOMAIN and q.op_type == "TRT_FP8QuantizeLinear"
    int8 = q.domain in ("", "ai.onnx") and q.op_type == "QuantizeLinear" and len(q.input) > 2
    if not (fp8 or int8) or q.input[0] not in g.inits:
        return None
    dq = g.only_consumer(q.output[0])
    if dq is None or dq.op_type not in ("TRT_FP8DequantizeLinear", "DequantizeLinear"):
        return None
    weight = g.const(q.input[0])
    scale = g.const(q.input[1])
    if weight is None or scale is None:
        return None
    if int8:
        zp = g.const(q.input[2])
        if zp is None or zp.dtype.name != "int8" or zp.any():
            return None
    return dq, weight, scale, fp8


def _transpose_to_matmul(g: Graph, dq: Any) -> Any | None:
    """The Transpose between a weight DQ and MatMul/Gemm consumers only, if there is exactly that."""
    t = g.only_consumer(dq.output[0])
    if t is None or t.op_type != "Transpose":
        return None
    users = g.consumers.get(t.output[0], [])
    if not users or t.output[0] in g.outputs or any(u.op_type != "MatMul" for u in users):
        return None
    return t


def _quantize_fp8(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float8e4m3fn bytes (as uint8) of ``weight / scale``, saturated at +-448 like QuantizeLinear."""
    return _quantize_in_chunks(weight, scale, "float8_e4m3fn", None)


def _quantize_int8(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """int8 of ``weight / scale`` (per-tensor or per-``axis``), rounded half to even like QuantizeLinear."""
    return _quantize_in_chunks(weight, scale, "int8", axis if scale.ndim == 1 else None)


def _quantize_in_chunks(weight: np.ndarray, scale: np.ndarray, qdtype: str, axis: int | None) -> np.ndarray:
    """``quantize_with_scale`` over blocks of rows of ``weight`` (a per-channel scale along axis 0 is sliced
    with them); fp8 results as uint8 bytes."""
    import numpy as np
    import torch

    s = torch.from_numpy(to_f32(scale))
    out = np.empty(weight.shape, np.uint8 if qdtype == "float8_e4m3fn" else np.int8)
    if weight.ndim == 0 or weight.size == 0:
        q = quantize_with_scale(torch.from_numpy(to_f32(weight)), s, qdtype, axis)
        return q.view(torch.uint8).numpy() if qdtype == "float8_e4m3fn" else q.numpy()
    rows = weight.shape[0]
    step = max(1, _graph.CHUNK_ELEMENTS // max(1, weight.size // rows))
    sliced = axis is not None and axis % weight.ndim == 0
    for i in range(0, rows, step):
        w = torch.from_numpy(to_f32(weight[i : i + step]))
        q = quantize_with_scale(w, s[i : i + step] if sliced else s, qdtype, axis)
        out[i : i + step] = q.view(torch.uint8).numpy() if qdtype == "float8_e4m3fn" else q.numpy()
    return out
