"""ONNX post-processing of a quantized export: TensorRT custom Q/DQ ops in, standard ONNX Q/DQ out.

Input: the graph ``torch.onnx.export`` wrote for a ModelOpt fake-quant model. Output: the same graph where

- fp8: ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear`` become standard ``QuantizeLinear`` (with a
  float8e4m3fn zero point, which selects the fp8 output type) and ``DequantizeLinear``; stale uint8
  value_info of their outputs is dropped. Weights are stored quantized: ``W -> Q -> DQ`` becomes an fp8
  initializer ``-> DQ``, and a ``DQ -> Transpose -> MatMul`` weight is stored transposed (``DQ -> MatMul``,
  the pattern TensorRT fuses).
- int8: already standard Q/DQ; weights are folded the same way (int8 initializers, per-channel axis kept).
- nvfp4: weights (``trt::TRT_FP4QDQ``) become packed FLOAT4E2M1 initializers with FP8 E4M3 block scales and
  two standard ``DequantizeLinear`` (block size 16, opset 23). Activations keep TensorRT's
  ``trt::TRT_FP4DynamicQuantize``: ONNX has no dynamic block quantize op, so onnxruntime cannot run the
  graph. The report names every custom op left.

Everything here runs on the CPU; ``torch`` is used only for fp8/fp4 rounding.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.dtypes import TO_ONNX
from dtcompile.core.errors import BuildError
from dtcompile.core.files import copy_byte_range
from dtcompile.core.numerics import E2M1_MAX, E2M1_VALUES, FP8_E4M3_MAX, NVFP4_BLOCK, quantize_with_scale

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

#: The placeholder op the exporter writes for a block-scaled FP4 DequantizeLinear (see quant/export.py): the
#: real op needs opset 21+, which the TorchScript exporter cannot emit.
FP4_BLOCK_DQ_PLACEHOLDER = "DTC_FP4BlockDequantizeLinear"
TRT_DOMAIN = "trt"
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")  # what a quantized graph computes in


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


def _written_span(info: ExternalDataInfo) -> tuple[int, int]:
    """(offset, length) of a tensor ``_ExternalData.store`` wrote (it records both; onnx types them as None)."""
    offset: int | None = info.offset
    length: int | None = info.length
    if offset is None or length is None:
        raise BuildError(f"{info.location}: an external data entry without offset or length")
    return offset, length


class _ExternalData:
    """The external data of a graph being rewritten: tensors read one at a time from the original data file(s),
    new weights written to the rewritten graph's data file as they are made, never all in memory.

    ``data_file`` (in a scratch folder) becomes the graph's only data file: ``finish`` copies into it, in
    chunks, every tensor still stored in the original files (``src_dir``), so the graph can be saved next to it.
    """

    #: Tensors smaller than this stay inside the .onnx file (as ``export_onnx`` and ``onnx.save_model`` do).
    min_bytes = 1024

    def __init__(self, src_dir: Path, data_file: Path) -> None:
        self.src_dir = Path(src_dir)
        self.path = Path(data_file)
        self._out = open(self.path, "wb")  # noqa: SIM115 (closed by close)
        self.offset = 0
        # Until ``finish``, new tensors point at this location: an absolute path, which no graph's own external
        # data names (the data file may have the same name as an original one).
        self._new_location = str(self.path.resolve())

    def loaded(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A copy of one tensor stored externally, its bytes read (from the original files or the new one)."""
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor

        loaded = onnx.TensorProto()
        loaded.CopyFrom(tensor)  # metadata only: the data is on disk
        info = ExternalDataInfo(tensor)
        if info.location == self._new_location:
            self._out.flush()
            offset, length = _written_span(info)
            with open(self.path, "rb") as f:
                f.seek(offset)
                loaded.raw_data = f.read(length)
            del loaded.external_data[:]
            loaded.data_location = onnx.TensorProto.DEFAULT
        else:
            load_external_data_for_tensor(loaded, str(self.src_dir))
        return loaded

    def value(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The values of one tensor stored externally (in the original files, or already in the new one)."""
        from onnx import numpy_helper

        return numpy_helper.to_array(self.loaded(tensor))

    def store(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """Write a new tensor's ``raw_data`` (1 KiB or more) to the data file; return a new tensor pointing
        there. (A new one: a cleared field does not give its bytes back, they live as long as the message.)"""
        import onnx

        if not (tensor.HasField("raw_data") and len(tensor.raw_data) >= self.min_bytes):
            return tensor
        self._write_aligned(tensor.raw_data)
        pointer = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        self._point(pointer, self.offset - len(tensor.raw_data), len(tensor.raw_data), self._new_location)
        return pointer

    def finish(self, graph: onnx.GraphProto) -> None:
        """Copy every tensor of ``graph`` still in the original files into the data file."""
        import onnx
        from onnx.external_data_helper import ExternalDataInfo

        for tensor, _ in _all_tensors(graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            if info.location == self._new_location:  # written by ``store``
                self._point(tensor, *_written_span(info))
                continue
            src = self.src_dir / info.location
            start = info.offset or 0
            length = info.length if info.length is not None else src.stat().st_size - start
            self._align()
            self._point(tensor, self.offset, length)
            copy_byte_range(src, start, length, self._write, f"'{tensor.name}'")

    def close(self) -> None:
        self._out.close()

    def _point(self, tensor: onnx.TensorProto, offset: int, length: int, location: str | None = None) -> None:
        import onnx

        del tensor.external_data[:]
        entries = (("location", location or self.path.name), ("offset", str(offset)), ("length", str(length)))
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def _write_aligned(self, data: bytes) -> None:
        self._align()
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.offset += len(data)

    def _align(self) -> None:
        pad = -self.offset % 64  # aligned offsets let onnxruntime and TensorRT map tensors directly
        self._write(b"\0" * pad)


def _has_external_data(graph: onnx.GraphProto) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t, _ in _all_tensors(graph))


def _all_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """(tensor, is an initializer) for initializers and tensor attributes, subgraphs included."""
    for t in graph.initializer:
        yield t, True
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            for t in attr.tensors:
                yield t, False
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


class _Graph:
    """Name indexes over a GraphProto (rebuilt after structural edits); with ``data``, the values of external
    tensors are read one at a time and new initializers go straight to the rewritten data file."""

    def __init__(self, graph: onnx.GraphProto, data: _ExternalData | None = None) -> None:
        self.g = graph
        self.data = data
        self.reindex()

    def reindex(self) -> None:
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or a Constant node output, else None."""
        if name in self.inits:
            return self._value(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    return self._value(a.t)
        return None

    def _value(self, tensor: onnx.TensorProto) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.loaded(tensor))

    def loaded(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor`` with its bytes: itself, or a copy read from disk when it is stored externally."""
        import onnx

        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return tensor
        if self.data is None:
            raise BuildError(f"tensor '{tensor.name}' is stored externally but its data was not loaded")
        return self.data.loaded(tensor)

    def new_initializer(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor``, its data moved to the rewritten data file when the graph streams its weights."""
        return tensor if self.data is None else self.data.store(tensor)

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def standardize_qdq(model: onnx.ModelProto, dtype: str, *, data: _ExternalData | None = None) -> QdqReport:
    """Rewrite ``model`` in place (see the module docstring); ``dtype`` is the model's compute dtype name.

    Ops this code does not know stay as they are and are listed in ``QdqReport.custom_ops``; callers check
    that list against what the format allows (``export_quantized`` does). ``model`` holds its weights, unless
    ``data`` is given (``standardize_file`` on a graph with external data): then each weight is read from disk
    when it is folded and the folded one written to ``data``'s file at once.

    Raises:
        BuildError: an FP4 weight quantizer on a non-constant input, or a graph left with a cycle.
    """
    if dtype not in COMPUTE_DTYPES:
        raise BuildError(f"quantized graphs are float32, float16 or bfloat16; got {dtype}")
    report = QdqReport()
    g = _Graph(model.graph, data)
    _fold_weights(g, report)
    g.reindex()
    _fp8_to_standard(g, report)
    g.reindex()
    _fp4_weights(g, report, dtype)
    g.reindex()
    _fp4_activations(g, report, dtype)
    g.reindex()
    report.int8_qdq = sum(
        1 for n in g.g.node if n.op_type == "DequantizeLinear" and _is_int8_dq(g, n) and n.domain in ("", "ai.onnx")
    )
    _drop_unused_initializers(g)
    report.custom_ops = dict(Counter(f"{n.domain}::{n.op_type}" for n in g.g.node if n.domain not in ("", "ai.onnx")))
    if not any(n.domain == TRT_DOMAIN for n in g.g.node):
        keep = [o for o in model.opset_import if o.domain != TRT_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    if report.fp4_weights or report.fp4_activations:
        # Block-scaled DequantizeLinear is opset 21; FLOAT4E2M1 is opset 23 (IR version 11).
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 23)
        model.ir_version = max(model.ir_version, 11)
    report.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    _topological_sort(model.graph)
    return report


def standardize_file(path: Path, dtype: str) -> QdqReport:
    """``standardize_qdq`` on an ONNX file, written back in place (external data kept in one file).

    A graph with external data is rewritten without loading its weights: the graph is parsed without them,
    each weight the rewrite folds is read from the data file when it is folded and its quantized form written
    to the new data file at once, and the weights left as they were are copied over in chunks, so memory holds
    one weight at a time whatever the model size. A graph without external data (small) is rewritten in
    memory. The rewritten graph is written next to the original and renamed over it, so a failure leaves the
    original untouched. ``onnx.checker`` validates the result.
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    external = _has_external_data(model.graph)
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".qdq-", dir=path.parent) as scratch:
        tmp = Path(scratch) / path.name
        if external:
            data = _ExternalData(path.parent, Path(scratch) / data_name)
            try:
                report = standardize_qdq(model, dtype, data=data)
                data.finish(model.graph)
            finally:
                data.close()
        else:
            report = standardize_qdq(model, dtype)
        onnx.save_model(model, str(tmp))
        del model
        onnx.checker.check_model(str(tmp))
        mode = path.stat().st_mode & 0o777
        if external:
            os.chmod(Path(scratch) / data_name, mode)
            os.replace(Path(scratch) / data_name, path.parent / data_name)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    return report


# --- weights ------------------------------------------------------------------------------------------------


def _fold_weights(g: _Graph, report: QdqReport) -> None:
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
        axis = _attr(q, "axis", 1)
        qvals = _quantize_int8(weight, scale, axis) if int8 else _quantize_fp8(weight, scale)
        transpose = _transpose_to_matmul(g, dq)
        if transpose is not None:
            perm = _attr(transpose, "perm", None) or list(reversed(range(qvals.ndim)))
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
            _set_attr(dq, "axis", axis)
        if transpose is not None:
            _reroute(g, transpose.output[0], dq.output[0])
            dead.add(id(transpose))
            report.folded_transposes += 1
        _drop_value_info(g.g, dq.output[0])
        dead.add(id(q))
        report.folded_weights += 1
    _remove_nodes(g.g, dead)
    g.g.initializer.extend(new_inits)


def _foldable_weight(g: _Graph, q: Any) -> tuple[Any, np.ndarray, np.ndarray, bool] | None:
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


def _reroute(g: _Graph, old: str, new: str) -> None:
    """Every consumer of tensor ``old`` reads ``new`` instead."""
    for user in g.consumers[old]:
        for i, name_in in enumerate(user.input):
            if name_in == old:
                user.input[i] = new


def _transpose_to_matmul(g: _Graph, dq: Any) -> Any | None:
    """The Transpose between a weight DQ and MatMul/Gemm consumers only, if there is exactly that."""
    t = g.only_consumer(dq.output[0])
    if t is None or t.op_type != "Transpose":
        return None
    users = g.consumers.get(t.output[0], [])
    if not users or t.output[0] in g.outputs or any(u.op_type != "MatMul" for u in users):
        return None
    return t


#: Weights are quantized this many elements at a time, so the float32 temporaries stay small whatever the
#: weight's size (QuantizeLinear is elementwise: the result is the same).
_CHUNK_ELEMENTS = 1 << 22


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

    s = torch.from_numpy(_to_f32(scale))
    out = np.empty(weight.shape, np.uint8 if qdtype == "float8_e4m3fn" else np.int8)
    if weight.ndim == 0 or weight.size == 0:
        q = quantize_with_scale(torch.from_numpy(_to_f32(weight)), s, qdtype, axis)
        return q.view(torch.uint8).numpy() if qdtype == "float8_e4m3fn" else q.numpy()
    rows = weight.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, weight.size // rows))
    sliced = axis is not None and axis % weight.ndim == 0
    for i in range(0, rows, step):
        w = torch.from_numpy(_to_f32(weight[i : i + step]))
        q = quantize_with_scale(w, s[i : i + step] if sliced else s, qdtype, axis)
        out[i : i + step] = q.view(torch.uint8).numpy() if qdtype == "float8_e4m3fn" else q.numpy()
    return out


def _to_f32(a: np.ndarray) -> np.ndarray:
    import numpy as np

    return a.astype(np.float32)


# --- fp8 activations ------------------------------------------------------------------------------------------


def _fp8_to_standard(g: _Graph, report: QdqReport) -> None:
    """Remaining ``trt::TRT_FP8*`` pairs become standard Q/DQ with a float8e4m3fn zero point."""
    import onnx

    zp_name = "dtc_fp8_zero_point"
    need_zp = False
    for node in g.g.node:
        if node.domain != TRT_DOMAIN:
            continue
        if node.op_type == "TRT_FP8QuantizeLinear":
            if len(node.input) != 2:
                raise BuildError(f"unexpected inputs of {node.name}: {list(node.input)}")
            node.domain, node.op_type = "", "QuantizeLinear"
            node.input.append(zp_name)
            need_zp = True
            _drop_value_info(g.g, node.output[0])  # the exporter typed it uint8
            report.fp8_qdq += 1
        elif node.op_type == "TRT_FP8DequantizeLinear":
            node.domain, node.op_type = "", "DequantizeLinear"
            _drop_value_info(g.g, node.output[0])
    if need_zp:
        g.g.initializer.append(onnx.helper.make_tensor(zp_name, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))


# --- nvfp4 ----------------------------------------------------------------------------------------------------


def _fp4_weights(g: _Graph, report: QdqReport, dtype: str) -> None:
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
        block = _attr(node, "block_size", NVFP4_BLOCK)
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
        _drop_value_info(g.g, out)
        dead.add(id(node))
        report.fp4_weights += 1
    _remove_nodes(g.g, dead)
    g.g.node.extend(new_nodes)
    g.g.initializer.extend(new_inits)


def _fp4_activations(g: _Graph, report: QdqReport, dtype: str) -> None:
    """The exporter's block-DQ placeholder becomes a standard block-scaled DequantizeLinear (+ Cast)."""
    import onnx

    new_nodes: list[onnx.NodeProto] = []
    for node in g.g.node:
        if node.op_type == "TRT_FP4DynamicQuantize" and node.domain == TRT_DOMAIN:
            report.fp4_activations += 1
        if node.domain != TRT_DOMAIN or node.op_type != FP4_BLOCK_DQ_PLACEHOLDER:
            continue
        node.domain, node.op_type = "", "DequantizeLinear"
        _drop_value_info(g.g, node.output[0])
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
    step = max(1, _CHUNK_ELEMENTS // max(1, shape[-1]))
    chunks = range(0, rows.shape[0], step)
    amax = max((float(np.abs(_to_f32(rows[i : i + step])).max()) for i in chunks), default=0.0)
    global_scale = nvfp4_global_scale(torch.tensor(amax, dtype=torch.float32))
    if float(global_scale) == 0.0:
        global_scale = torch.tensor(1.0)
    packed = np.empty((rows.shape[0], shape[-1] // 2), np.uint8)
    scales = np.empty((rows.shape[0], shape[-1] // block), np.uint8)
    for i in chunks:
        codes, block_scale = nvfp4_encode(torch.from_numpy(_to_f32(rows[i : i + step])), block, global_scale)
        packed[i : i + step] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).numpy()
        scales[i : i + step] = block_scale.view(torch.uint8).numpy()
    return (
        packed.reshape(*shape[:-1], -1),
        scales.reshape(*shape[:-1], -1),
        global_scale.reshape(()).numpy().astype(np.float32),
    )


# --- onnxruntime stand-in for the FP4 graph ---------------------------------------------------------------------


def _decode_fp4_weights(g: _Graph, dead: set[int]) -> list[onnx.TensorProto]:
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
        block = _attr(dq, "block_size", NVFP4_BLOCK)
        decoded = decode_nvfp4(g.loaded(w), g.loaded(g.inits[scale_dq.input[0]]), g.const(scale_dq.input[1]), block)
        new_inits.append(g.new_initializer(numpy_helper.from_array(decoded, dq.output[0])))
        del decoded  # one weight at a time
        dead.update({id(dq), id(scale_dq)})
        _drop_value_info(g.g, dq.output[0])
    return new_inits


def fp4_reference_graph(model: onnx.ModelProto, data: _ExternalData | None = None) -> onnx.ModelProto:
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

    model = _copy(model)
    g = _Graph(model.graph, data)
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
        block = _attr(node, "block_size", NVFP4_BLOCK)
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
        _drop_value_info(g.g, out)
    _remove_nodes(g.g, dead)
    g.g.node.extend(new_nodes)
    g.g.initializer.extend(new_inits)
    g.reindex()
    _drop_unused_initializers(g)
    keep = [o for o in model.opset_import if o.domain != TRT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    _topological_sort(model.graph)
    left = [f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    if left:
        raise BuildError(f"cannot emulate custom ops {sorted(set(left))} for onnxruntime")
    return model


def float32_copy(model: onnx.ModelProto, data: _ExternalData | None = None) -> onnx.ModelProto:
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
    model = _copy(model)
    g = _Graph(model.graph, data)

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
    data = _ExternalData(path.parent, dest.parent / data_name) if _has_external_data(model.graph) else None
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
            key = (node.input[0], _attr(node, "to", 0))
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


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# --- inspection -----------------------------------------------------------------------------------------------


def count_fp8_attention(model: onnx.ModelProto) -> int:
    """Number of ``MatMul -> Softmax -> MatMul`` attentions whose four MatMul inputs (Q, K, softmax, V) are
    each the output of an fp8 ``QuantizeLinear -> DequantizeLinear`` pair (through Casts, as for 16-bit).

    Mul/Div/Add between the first MatMul and the Softmax are allowed (scale, mask), as TensorRT's fp8
    attention fusion allows them.
    """
    g = _Graph(model.graph)

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


def _is_int8_dq(g: _Graph, node: Any) -> bool:
    src = node.input[0]
    if src in g.inits:
        import onnx

        return g.inits[src].data_type == onnx.TensorProto.INT8
    q = g.producer.get(src)
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
        return False
    zp = g.const(q.input[2])
    return zp is not None and zp.dtype.name == "int8"


# --- small helpers ------------------------------------------------------------------------------------------


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node: Any, name: str, value: Any) -> None:
    import onnx

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _drop_value_info(graph: Any, name: str) -> None:
    for i, vi in enumerate(graph.value_info):
        if vi.name == name:
            del graph.value_info[i]
            return


def _remove_nodes(graph: Any, dead: set[int]) -> None:
    if not dead:
        return
    keep = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(keep)


def _drop_unused_initializers(g: _Graph) -> None:
    used = {i for n in g.g.node for i in n.input} | g.outputs
    keep = [t for t in g.g.initializer if t.name in used]
    if len(keep) != len(g.g.initializer):
        del g.g.initializer[:]
        g.g.initializer.extend(keep)


def _topological_sort(graph: Any) -> None:
    """Order nodes so every input is produced before use (new nodes were appended at the end)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            names = ", ".join(n.name or n.op_type for n in rest[:3])
            raise BuildError(f"quantized graph has a cycle or a dangling input near: {names}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
