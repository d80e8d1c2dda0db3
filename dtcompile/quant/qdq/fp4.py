"""NVFP4 in the graph: packing weights to FLOAT4E2M1 with FP8 E4M3 block scales, decoding them back, and the
rewrite of TensorRT's FP4 weight and activation ops.

Input: a graph view (``Graph``) with ``trt::TRT_FP4QDQ`` weights and the exporter's block-DQ placeholders. Output:
packed FLOAT4E2M1 initializers with two standard ``DequantizeLinear`` (block size 16, opset 23); activations keep
TensorRT's ``trt::TRT_FP4DynamicQuantize`` (ONNX has no dynamic block quantize op).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtcompile.core.dtypes import TO_ONNX
from dtcompile.core.errors import BuildError
from dtcompile.core.numerics import E2M1_VALUES, NVFP4_BLOCK
from dtcompile.quant.qdq import graph as _graph
from dtcompile.quant.qdq.graph import TRT_DOMAIN, Graph, drop_value_info, node_attr, remove_nodes, to_f32

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from dtcompile.quant.qdq.report import QdqReport

#: The placeholder op the exporter writes for a block-scaled FP4 DequantizeLinear (see quant/export.py): the
#: real op needs opset 21+, which the TorchScript exporter cannot emit.
FP4_BLOCK_DQ_PLACEHOLDER = "DTC_FP4BlockDequantizeLinear"


def fp4_weights(g: Graph, report: QdqReport, dtype: str) -> None:
    """``trt::TRT_FP4QDQ(W)`` becomes FLOAT4E2M1 W -> DQ(block 16) with FP8 block scales -> DQ."""
    import onnx
    from onnx import numpy_helper

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    dead: set[int] = set()
    for node in g.g.node:
        if node.domain != TRT_DOMAIN or node.op_type != "TRT_FP4QDQ":
            continue
        weight = g.const(node.input[0])
        if weight is None:
            raise BuildError(f"{node.name}: TRT_FP4QDQ on a non-constant input {node.input[0]!r} is not supported")
        block = node_attr(node, "block_size", NVFP4_BLOCK)
        packed, block_scale, global_scale = nvfp4_pack(weight, block)
        base = node.input[0]
        w_name, s_name, g_name = f"{base}_fp4", f"{base}_fp4_block_scale", f"{base}_fp4_global_scale"
        new_inits.append(
            g.new_initializer(
                onnx.helper.make_tensor(
                    w_name, onnx.TensorProto.FLOAT4E2M1, list(weight.shape), packed.tobytes(), raw=True
                )
            )
        )
        new_inits.append(
            g.new_initializer(
                onnx.helper.make_tensor(
                    s_name, onnx.TensorProto.FLOAT8E4M3FN, list(block_scale.shape), block_scale.tobytes(), raw=True
                )
            )
        )
        new_inits.append(numpy_helper.from_array(global_scale, g_name))
        del weight, packed, block_scale  # one weight at a time
        scale_out = f"{base}_fp4_scale"
        out = node.output[0]
        wide = f"{out}_f32" if dtype != "float32" else out
        new_nodes.append(
            onnx.helper.make_node("DequantizeLinear", [s_name, g_name], [scale_out], name=f"{base}/DQ_scale")
        )
        new_nodes.append(
            onnx.helper.make_node(
                "DequantizeLinear", [w_name, scale_out], [wide], name=f"{base}/DQ_fp4", axis=-1, block_size=block
            )
        )
        if wide != out:
            new_nodes.append(onnx.helper.make_node("Cast", [wide], [out], name=f"{base}/Cast", to=TO_ONNX[dtype]))
        drop_value_info(g.g, out)
        dead.add(id(node))
        report.fp4_weights += 1
    remove_nodes(g.g, dead)
    g.g.node.extend(new_nodes)
    g.g.initializer.extend(new_inits)


def fp4_activations(g: Graph, report: QdqReport, dtype: str) -> None:
    """The exporter's block-DQ placeholder becomes a standard block-scaled DequantizeLinear (+ Cast)."""
    import onnx

    new_nodes: list[onnx.NodeProto] = []
    for node in g.g.node:
        if node.op_type == "TRT_FP4DynamicQuantize" and node.domain == TRT_DOMAIN:
            report.fp4_activations += 1
        if node.domain != TRT_DOMAIN or node.op_type != FP4_BLOCK_DQ_PLACEHOLDER:
            continue
        node.domain, node.op_type = "", "DequantizeLinear"
        drop_value_info(g.g, node.output[0])
        if dtype != "float32":
            # The FP4 scales are float32 (an fp16 per-tensor scale would underflow); cast the result back.
            out = node.output[0]
            wide = f"{out}_f32"
            node.output[0] = wide
            new_nodes.append(onnx.helper.make_node("Cast", [wide], [out], name=f"{node.name}/Cast", to=TO_ONNX[dtype]))
    g.g.node.extend(new_nodes)


def nvfp4_pack(weight: np.ndarray, block: int = NVFP4_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NVFP4 encoding of a ``weight`` [..., K] (any float dtype) with blocks of ``block`` along K.

    Returns (packed E2M1 codes [..., K/2] as uint8, the first element in the low nibble as ONNX's FLOAT4E2M1
    expects; E4M3 block scales [..., K/block] as uint8 bytes; the float32 per-tensor scale amax / (6 * 448)),
    the same numbers ``nvfp4_fake_quant`` computes in torch. Rows are encoded a block of rows at a time
    (blocks run along K), so the float32 temporaries stay small whatever the weight's size.
    """
    import numpy as np
    import torch

    from dtcompile.core.numerics import nvfp4_encode, nvfp4_global_scale

    shape = weight.shape
    if not shape or shape[-1] % block:
        raise BuildError(f"an NVFP4 weight's last dim must divide by {block}, got shape {tuple(shape)}")
    rows = weight.reshape(-1, shape[-1])
    step = max(1, _graph.CHUNK_ELEMENTS // max(1, shape[-1]))
    chunks = range(0, rows.shape[0], step)
    amax = max((float(np.abs(to_f32(rows[i : i + step])).max()) for i in chunks), default=0.0)
    global_scale = nvfp4_global_scale(torch.tensor(amax, dtype=torch.float32))
    if float(global_scale) == 0.0:
        global_scale = torch.tensor(1.0)
    packed = np.empty((rows.shape[0], shape[-1] // 2), np.uint8)
    scales = np.empty((rows.shape[0], shape[-1] // block), np.uint8)
    for i in chunks:
        codes, block_scale = nvfp4_encode(torch.from_numpy(to_f32(rows[i : i + step])), block, global_scale)
        packed[i : i + step] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).numpy()
        scales[i : i + step] = block_scale.view(torch.uint8).numpy()
    return (
        packed.reshape(*shape[:-1], -1),
        scales.reshape(*shape[:-1], -1),
        global_scale.reshape(()).numpy().astype(np.float32),
    )


def decode_nvfp4(packed: onnx.TensorProto, block_scale: onnx.TensorProto, global_scale: Any, block: int) -> np.ndarray:
    """float32 values of a FLOAT4E2M1 tensor with FLOAT8E4M3FN block scales (blocks along the last dim)."""
    import numpy as np
    import torch

    shape = list(packed.dims)
    raw = np.frombuffer(packed.raw_data, dtype=np.uint8)
    codes = np.empty(raw.size * 2, dtype=np.uint8)
    codes[0::2], codes[1::2] = raw & 0x0F, raw >> 4
    codes = codes[: int(np.prod(shape))]
    magnitude = np.array(E2M1_VALUES, np.float32)[codes & 0x7]
    values = np.where(codes & 0x8, -magnitude, magnitude).reshape(shape)
    scale_bytes = np.frombuffer(block_scale.raw_data, dtype=np.uint8).reshape(list(block_scale.dims))
    scales = torch.from_numpy(scale_bytes.copy()).view(torch.float8_e4m3fn).float().numpy()
    scales = scales * np.asarray(global_scale, dtype=np.float32)
    return (values.reshape(*shape[:-1], -1, block) * scales[..., None]).reshape(shape).astype(np.float32)
