"""The copy of a quantized graph onnxruntime can run, for parity checks only (never shipped): TensorRT's FP4 ops
emulated with standard ops, and a 16-bit graph computing in float32.

Input: a standardized ONNX file (or ModelProto). Output: the runnable copy (``onnxruntime_copy`` writes it with
its weights in one data file, streamed one weight at a time).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dtcompile.core.errors import BuildError
from dtcompile.core.numerics import E2M1_MAX, FP8_E4M3_MAX, NVFP4_BLOCK
from dtcompile.quant.qdq.external import ExternalData, has_external_data
from dtcompile.quant.qdq.fp4 import decode_nvfp4
from dtcompile.quant.qdq.graph import (
    TRT_DOMAIN,
    Graph,
    copy_model,
    drop_unused_initializers,
    drop_value_info,
    node_attr,
    remove_nodes,
    topological_sort,
)

if TYPE_CHECKING:
    import onnx


def _decode_fp4_weights(g: Graph, dead: set[int]) -> list[onnx.TensorProto]:
    """Each FP4 weight (DQ(block scales) -> DQ(E2M1, block)) decoded to a float32 initializer, one at a time; the
    two DQs are added to ``dead``."""
    import onnx
    from onnx import numpy_helper

    new_inits: list[onnx.TensorProto] = []
    for dq in g.g.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
            continue
        w = g.inits[dq.input[0]]
        if w.data_type != onnx.TensorProto.FLOAT4E2M1:
            continue
        scale_dq = g.producer.get(dq.input[1])
        if scale_dq is None or scale_dq.op_type != "DequantizeLinear":
            raise BuildError(f"unexpected FP4 weight pattern at {dq.name}")
        block = node_attr(dq, "block_size", NVFP4_BLOCK)
        decoded = decode_nvfp4(g.loaded(w), g.loaded(g.inits[scale_dq.input[0]]), g.const(scale_dq.input[1]), block)
        new_inits.append(g.new_initializer(numpy_helper.from_array(decoded, dq.output[0])))
        del decoded  # one weight at a time
        dead.update({id(dq), id(scale_dq)})
        drop_value_info(g.g, dq.output[0])
    return new_inits


def fp4_reference_graph(model: onnx.ModelProto, data: ExternalData | None = None) -> onnx.ModelProto:
    """A copy of an NVFP4 graph that onnxruntime can run, for parity checks only (never shipped).

    onnxruntime has no kernel for ``trt::TRT_FP4DynamicQuantize`` nor for FLOAT4E2M1 tensors. Here each FP4
    weight (DQ of packed E2M1 with E4M3 block scales) becomes its decoded float32 initializer, and each dynamic
    activation quantize with its two DQs becomes standard ops computing ModelOpt's NVFP4 definition: block
    amax / (6 * per-tensor scale), clamped to [2^-9, 448] and cast to E4M3; values divided by the block scale
    and rounded half to even onto the E2M1 grid (saturating at 6). Only the TensorRT op itself is not tested.

    With ``data`` (``onnxruntime_copy``), each FP4 weight is read from disk when it is decoded and the decoded
    one written to ``data``'s file at once.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = copy_model(model)
    g = Graph(model.graph, data)
    dead: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []

    # Weights: DQ(block scales) -> DQ(E2M1, block) becomes a float32 initializer.
    new_inits += _decode_fp4_weights(g, dead)

    # Activations: TRT_FP4DynamicQuantize -> DQ(scales) -> DQ(E2M1, block) becomes an emulation subgraph.
    consts: dict[str, np.ndarray] = {
        "six": np.array(E2M1_MAX, np.float32),
        "min_scale": np.array(2.0**-9, np.float32),
        "max_scale": np.array(FP8_E4M3_MAX, np.float32),
        "one": np.array(1.0, np.float32),
        "zero": np.array(0.0, np.float32),
        "two": np.array(2.0, np.float32),
        "four": np.array(4.0, np.float32),
    }
    consts["axes"] = np.array([1], np.int64)
    for name, value in consts.items():
        new_inits.append(numpy_helper.from_array(value, f"dtc_emu_{name}"))

    def c(name: str) -> str:
        return f"dtc_emu_{name}"

    for k, node in enumerate(list(g.g.node)):
        if node.domain != TRT_DOMAIN or node.op_type != "TRT_FP4DynamicQuantize":
            continue
        x_f4, sx_f8 = node.output[0], node.output[1]
        scale_dq = g.only_consumer(sx_f8)
        value_dq = g.only_consumer(x_f4)
        if scale_dq is None or value_dq is None or scale_dq.op_type != "DequantizeLinear":
            raise BuildError(f"unexpected FP4 activation pattern at {node.name}")
        block = node_attr(node, "block_size", NVFP4_BLOCK)
        p = f"dtc_emu{k}"
        out = value_dq.output[0]
        sf2 = node.input[1]
        new_inits.append(numpy_helper.from_array(np.array([-1, block], np.int64), f"{p}_block_shape"))
        new_nodes += [
            helper.make_node("Cast", [node.input[0]], [f"{p}_x"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Shape", [f"{p}_x"], [f"{p}_shape"]),
            helper.make_node("Reshape", [f"{p}_x", f"{p}_block_shape"], [f"{p}_blocks"]),
            helper.make_node("Abs", [f"{p}_blocks"], [f"{p}_abs"]),
            helper.make_node("ReduceMax", [f"{p}_abs", c("axes")], [f"{p}_amax"], keepdims=1),
            helper.make_node("Mul", [c("six"), sf2], [f"{p}_den"]),
            helper.make_node("Div", [f"{p}_amax", f"{p}_den"], [f"{p}_s0"]),
            helper.make_node("Equal", [f"{p}_s0", c("zero")], [f"{p}_is0"]),
            helper.make_node("Where", [f"{p}_is0", c("one"), f"{p}_s0"], [f"{p}_s1"]),
            helper.make_node("Clip", [f"{p}_s1", c("min_scale"), c("max_scale")], [f"{p}_s2"]),
            helper.make_node("Cast", [f"{p}_s2"], [f"{p}_s8"], to=onnx.TensorProto.FLOAT8E4M3FN),
            helper.make_node("Cast", [f"{p}_s8"], [f"{p}_s3"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_s3", sf2], [f"{p}_scale"]),
            helper.make_node("Div", [f"{p}_blocks", f"{p}_scale"], [f"{p}_y"]),
            helper.make_node("Abs", [f"{p}_y"], [f"{p}_ya"]),
            helper.make_node("Min", [f"{p}_ya", c("six")], [f"{p}_a"]),
            # E2M1 spacing is 0.5 below 2, 1 below 4, 2 up to 6: round (half to even) on the right grid.
            helper.make_node("Mul", [f"{p}_a", c("two")], [f"{p}_a2"]),
            helper.make_node("Round", [f"{p}_a2"], [f"{p}_r2"]),
            helper.make_node("Div", [f"{p}_r2", c("two")], [f"{p}_fine"]),
            helper.make_node("Round", [f"{p}_a"], [f"{p}_mid"]),
            helper.make_node("Div", [f"{p}_a", c("two")], [f"{p}_ah"]),
            helper.make_node("Round", [f"{p}_ah"], [f"{p}_rh"]),
            helper.make_node("Mul", [f"{p}_rh", c("two")], [f"{p}_coarse"]),
            helper.make_node("Less", [f"{p}_a", c("two")], [f"{p}_lt2"]),
            helper.make_node("Less", [f"{p}_a", c("four")], [f"{p}_lt4"]),
            helper.make_node("Where", [f"{p}_lt4", f"{p}_mid", f"{p}_coarse"], [f"{p}_hi"]),
            helper.make_node("Where", [f"{p}_lt2", f"{p}_fine", f"{p}_hi"], [f"{p}_mag"]),
            helper.make_node("Sign", [f"{p}_y"], [f"{p}_sign"]),
            helper.make_node("Mul", [f"{p}_mag", f"{p}_sign"], [f"{p}_q"]),
            helper.make_node("Mul", [f"{p}_q", f"{p}_scale"], [f"{p}_dq"]),
            helper.make_node("Reshape", [f"{p}_dq", f"{p}_shape"], [out]),
        ]
        dead.update({id(node), id(scale_dq), id(value_dq)})
        drop_value_info(g.g, out)
    remove_nodes(g.g, dead)
    g.g.node.extend(new_nodes)
    g.g.initializer.extend(new_inits)
    g.reindex()
    drop_unused_initializers(g)
    keep = [o for o in model.opset_import if o.domain != TRT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    topological_sort(model.graph)
    left = [f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    if left:
        raise BuildError(f"cannot emulate custom ops {sorted(set(left))} for onnxruntime")
    return model


def float32_copy(model: onnx.ModelProto, data: ExternalData | None = None) -> onnx.ModelProto:
    """A copy of a bfloat16 or float16 graph computing in float32, for onnxruntime parity checks only (its CPU
    kernels have no bfloat16). Every 16-bit initializer, constant and Cast target becomes float32 with the
    same values (weights, Q/DQ scales and constants keep their 16-bit rounding); intermediate results are no
    longer rounded to 16 bits. ``quant.export.float32_compute`` makes the torch model it is compared with.

    With ``data`` (``onnxruntime_copy``), each 16-bit tensor is read from disk when it is widened and the
    float32 one written to ``data``'s file at once."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    narrow, f32 = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16), onnx.TensorProto.FLOAT
    model = copy_model(model)
    g = Graph(model.graph, data)

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type not in narrow:
            return
        values = g._value(t).astype(np.float32)
        t.CopyFrom(g.new_initializer(numpy_helper.from_array(values, t.name)))

    for t in model.graph.initializer:
        widen(t)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                widen(a.t)
            elif a.name == "to" and a.type == onnx.AttributeProto.INT and a.i in narrow:
                a.i = f32
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.type.tensor_type.elem_type in narrow:
            vi.type.tensor_type.elem_type = f32
    _merge_duplicate_casts(model.graph)
    return model


def onnxruntime_copy(path: Path, dest: Path, *, emulate_fp4: bool, widen: bool) -> None:
    """Write the copy of graph ``path`` that onnxruntime can run to ``dest`` (its weights in one data file,
    ``<dest name>.data``): TensorRT's FP4 ops emulated (``fp4_reference_graph``) with ``emulate_fp4``, a 16-bit
    graph computing in float32 (``float32_copy``) with ``widen``.

    Streamed like ``standardize_file``: the graph is parsed without its weights, each weight the copy changes
    is read from disk, rewritten and written to the new data file at once, and the others are copied over in
    chunks, so memory holds one weight at a time. A graph without external data is rewritten in memory.
    """
    import onnx

    path, dest = Path(path), Path(dest)
    model = onnx.load(str(path), load_external_data=False)
    data_name = dest.name + ".data"
    data = ExternalData(path.parent, dest.parent / data_name) if has_external_data(model.graph) else None
    try:
        if emulate_fp4:
            model = fp4_reference_graph(model, data)
        if widen:
            model = float32_copy(model, data)
        if data is not None:
            data.finish(model.graph)
    finally:
        if data is not None:
            data.close()
    if data is not None:
        onnx.save_model(model, str(dest))
    else:
        onnx.save_model(model, str(dest), save_as_external_data=True, location=data_name)


def _merge_duplicate_casts(graph: onnx.GraphProto) -> None:
    """One Cast per (input, target type): consumers of a duplicate read the first one's output.

    The exporter writes two identical Casts where torch casts one tensor twice (T5's RMS norm: bfloat16 ->
    float32, twice); once widened both are float32 -> float32, and onnxruntime's basic optimizations
    (1.32) then drop one and leave its consumer dangling ("Node input ... is not a graph input").
    """
    first: dict[tuple[str, int], str] = {}
    rename: dict[str, str] = {}
    keep = []
    outputs = {o.name for o in graph.output}
    for node in graph.node:  # in topological order: a duplicate's consumers come after it
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            key = (node.input[0], node_attr(node, "to", 0))
            if key in first:
                rename[node.output[0]] = first[key]
                continue
            first[key] = node.output[0]
        keep.append(node)
    if rename:
        kept = [type(n)() for n in keep]
        for new, old in zip(kept, keep, strict=True):
            new.CopyFrom(old)
        del graph.node[:]
        graph.node.extend(kept)
