"""ONNX post-processing of a quantized export: TensorRT custom Q/DQ ops in, standard ONNX Q/DQ out.

Input: the graph ``torch.onnx.export`` wrote for a ModelOpt fake-quant model. Output: the same graph where

- fp8: ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear`` become standard ``QuantizeLinear`` (with a
  float8e4m3fn zero point, which selects the fp8 output type) and ``DequantizeLinear``; stale uint8
  value_info of their outputs is dropped. Weights are stored quantized (``weights.fold_weights``).
- int8: already standard Q/DQ; weights are folded the same way (int8 initializers, per-channel axis kept).
- nvfp4: weights become packed FLOAT4E2M1 initializers with FP8 E4M3 block scales (``fp4``). Activations keep
  TensorRT's ``trt::TRT_FP4DynamicQuantize``, so onnxruntime cannot run the graph. The report names every
  custom op left.

Everything here runs on the CPU; ``torch`` is used only for fp8/fp4 rounding.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from dtcompile.core.errors import BuildError
from dtcompile.quant.qdq.external import ExternalData, has_external_data
from dtcompile.quant.qdq.fp4 import fp4_activations, fp4_weights
from dtcompile.quant.qdq.graph import TRT_DOMAIN, Graph, drop_unused_initializers, drop_value_info, topological_sort
from dtcompile.quant.qdq.report import QdqReport, is_int8_dq
from dtcompile.quant.qdq.weights import fold_weights

if TYPE_CHECKING:
    import onnx

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")  # what a quantized graph computes in


def standardize_qdq(model: onnx.ModelProto, dtype: str, *, data: ExternalData | None = None) -> QdqReport:
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
    g = Graph(model.graph, data)
    fold_weights(g, report)
    g.reindex()
    _fp8_to_standard(g, report)
    g.reindex()
    fp4_weights(g, report, dtype)
    g.reindex()
    fp4_activations(g, report, dtype)
    g.reindex()
    report.int8_qdq = sum(
        1 for n in g.g.node if n.op_type == "DequantizeLinear" and is_int8_dq(g, n) and n.domain in ("", "ai.onnx")
    )
    drop_unused_initializers(g)
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
    topological_sort(model.graph)
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
    external = has_external_data(model.graph)
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".qdq-", dir=path.parent) as scratch:
        tmp = Path(scratch) / path.name
        if external:
            data = ExternalData(path.parent, Path(scratch) / data_name)
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


def _fp8_to_standard(g: Graph, report: QdqReport) -> None:
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
            drop_value_info(g.g, node.output[0])  # the exporter typed it uint8
            report.fp8_qdq += 1
        elif node.op_type == "TRT_FP8DequantizeLinear":
            node.domain, node.op_type = "", "DequantizeLinear"
            drop_value_info(g.g, node.output[0])
    if need_zp:
        g.g.initializer.append(onnx.helper.make_tensor(zp_name, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
