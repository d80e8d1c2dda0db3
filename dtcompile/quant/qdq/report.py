"""What a Q/DQ rewrite did and what a quantized graph holds: the ``QdqReport`` (the manifest's ``qdq`` entry) and
the graph inspections (int8 DQs, fp8 attentions TensorRT can fuse).

Input: a standardized graph. Output: counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtcompile.quant.qdq.graph import Graph

if TYPE_CHECKING:
    import onnx


@dataclass
class QdqReport:
    """What ``standardize_qdq`` did: quantized tensors per type (a weight stored quantized counts once, an
    activation Q/DQ pair once), weights folded into quantized initializers, custom ops left, the opset."""

    fp8_qdq: int = 0
    int8_qdq: int = 0
    fp4_weights: int = 0
    fp4_activations: int = 0
    folded_weights: int = 0
    folded_transposes: int = 0
    opset: int = 0
    custom_ops: dict[str, int] = field(default_factory=dict)

    @property
    def onnxruntime_runnable(self) -> bool:
        """True when only standard ONNX ops are left."""
        return not self.custom_ops

    def to_manifest(self) -> dict[str, Any]:
        """JSON for the manifest (custom ops as ``domain::op``: count)."""
        return {
            "fp8_qdq": self.fp8_qdq,
            "int8_qdq": self.int8_qdq,
            "fp4_weights": self.fp4_weights,
            "fp4_activations": self.fp4_activations,
            "folded_weights": self.folded_weights,
            "opset": self.opset,
            "custom_ops": dict(sorted(self.custom_ops.items())),
            "onnxruntime_runnable": self.onnxruntime_runnable,
        }


def count_fp8_attention(model: onnx.ModelProto) -> int:
    """Number of ``MatMul -> Softmax -> MatMul`` attentions whose four MatMul inputs (Q, K, softmax, V) are
    each the output of an fp8 ``QuantizeLinear -> DequantizeLinear`` pair (through Casts, as for 16-bit).

    Mul/Div/Add between the first MatMul and the Softmax are allowed (scale, mask), as TensorRT's fp8
    attention fusion allows them.
    """
    g = Graph(model.graph)

    def through(name: str, ops: tuple[str, ...]) -> str:
        node = g.producer.get(name)
        while node is not None and node.op_type in ops:
            name = node.input[0]
            node = g.producer.get(name)
        return name

    def is_fp8_dq(name: str) -> bool:
        dq = g.producer.get(through(name, ("Cast",)))
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            return False
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
            return False
        zp = g.inits.get(q.input[2])
        import onnx

        return zp is not None and zp.data_type == onnx.TensorProto.FLOAT8E4M3FN

    count = 0
    for sm in g.g.node:
        if sm.op_type != "Softmax":
            continue
        mm1 = g.producer.get(through(sm.input[0], ("Cast", "Add", "Mul", "Div")))
        if mm1 is None or mm1.op_type != "MatMul" or not all(is_fp8_dq(i) for i in mm1.input):
            continue
        q = g.only_consumer(sm.output[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        dq = g.only_consumer(q.output[0])
        mm2 = dq
        while mm2 is not None and mm2.op_type in ("DequantizeLinear", "Cast"):
            mm2 = g.only_consumer(mm2.output[0])
        if mm2 is None or mm2.op_type != "MatMul" or not all(is_fp8_dq(i) for i in mm2.input):
            continue
        count += 1
    return count


def is_int8_dq(g: Graph, node: Any) -> bool:
    src = node.input[0]
    if src in g.inits:
        import onnx

        return g.inits[src].data_type == onnx.TensorProto.INT8
    q = g.producer.get(src)
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
        return False
    zp = g.const(q.input[2])
    return zp is not None and zp.dtype.name == "int8"
