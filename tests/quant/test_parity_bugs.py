"""Parity (b) catches export bugs: a bfloat16 tiny-FLUX quantized and exported, then one bug injected into the
graph at a time (a weight scale doubled or negated, a weight transposed, a per-channel scale on the wrong
axis, an activation Q/DQ pair dropped). The float32 check (``float32_parity``: the graph's float32 copy
against the fake-quant model's) raises VerificationError for each (the small ones only at a tolerance fitting
the tiny model, see CASES), while the clean graph passes; the end-to-end figure (graph vs the bfloat16 torch
model, the check before this one, tolerance 0.05) is printed beside it: bfloat16 rounding alone costs it
about 3e-2, so all but the negated scale hid under that tolerance. ``pytest -s`` prints the figures."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("modelopt")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from dtcompile.core.errors import VerificationError  # noqa: E402
from dtcompile.quant import accuracy as acc  # noqa: E402
from dtcompile.quant import get_format  # noqa: E402
from dtcompile.quant import parity as par  # noqa: E402
from tests.quant.test_export import ADAPTER, Built  # noqa: E402

#: Node-name scopes of the layer the weight bugs hit (square 64 x 64 in tiny-flux, so a transposed weight or
#: a per-channel scale on the other axis still has valid shapes) and of the layer whose input Q/DQ is dropped.
LAYER = "/transformer/transformer_blocks.0/attn/to_v/"
ACTIVATION = "/transformer/transformer_blocks.0/ff/net.2/"  # the MLP's down projection (input: the GELU output)
OLD_TOLERANCE = par.DTYPE_PARITY_FLOOR["bfloat16"]  # what parity (b) accepted for bfloat16 before


def _weight_dq(model: Any, layer: str) -> Any:
    scope = f"{layer}weight_quantizer/"
    inits = {t.name for t in model.graph.initializer}
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and scope in n.name and n.input[0] in inits]
    return dq


def _initializer(model: Any, name: str) -> Any:
    return next(t for t in model.graph.initializer if t.name == name)


def _new_scale(model: Any, dq: Any, factor: float) -> None:
    """The DQ reads its own copy of its scale times ``factor`` (the original may be shared)."""
    old = _initializer(model, dq.input[1])
    values = numpy_helper.to_array(old).astype("float32")  # a 0-d array for a per-tensor scale
    values *= factor  # x2 and -1 are exact in any float type
    name = f"{old.name}_bug"
    if old.data_type == onnx.TensorProto.BFLOAT16:  # numpy has no bfloat16: write the bytes
        raw = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        tensor = onnx.helper.make_tensor(name, old.data_type, list(old.dims), raw, raw=True)
    else:
        tensor = numpy_helper.from_array(values.astype(numpy_helper.to_array(old).dtype), name)
    model.graph.initializer.append(tensor)
    dq.input[1] = tensor.name


def scale_x2(model: Any) -> None:
    _new_scale(model, _weight_dq(model, LAYER), 2.0)


def scale_negated(model: Any) -> None:
    _new_scale(model, _weight_dq(model, LAYER), -1.0)


def weight_transposed(model: Any) -> None:
    """The quantized weight stored transposed (same shape, so nothing but the numbers tells)."""
    w = _initializer(model, _weight_dq(model, LAYER).input[0])
    rows, cols = w.dims
    raw = torch.frombuffer(bytearray(w.raw_data), dtype=torch.uint8).reshape(rows, cols).t().contiguous()
    w.raw_data = raw.numpy().tobytes()


def axis_changed(model: Any) -> None:
    """A per-channel weight scale applied along the input instead of the output channels."""
    dq = _weight_dq(model, LAYER)
    (attr,) = [a for a in dq.attribute if a.name == "axis"]
    attr.i = 1 - attr.i


def activation_qdq_dropped(model: Any) -> None:
    """The input quantizer of one linear layer gone: its consumer reads the unquantized activation."""
    scope = f"{ACTIVATION}input_quantizer/"
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and scope in n.name]
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and q.output[0] in n.input]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == dq.output[0]:
                node.input[i] = q.input[0]
    model.graph.node.remove(q)
    model.graph.node.remove(dq)


BUGS: dict[str, Callable[[Any], None]] = {
    "scale_x2": scale_x2,
    "scale_negated": scale_negated,
    "weight_transposed": weight_transposed,
    "axis_changed": axis_changed,
    "activation_qdq_dropped": activation_qdq_dropped,
}
#: (format, bug, tolerance, whether the old end-to-end check passed it). Tolerance None: the format's own,
#: which sits above the noise of wider models (onnxruntime and torch round a few fp8/int8 values on the other
#: side of a boundary: 0.9-2.6e-3 at width 512-1024, docs/quantization.md). A single dropped Q/DQ pair or a
#: per-channel scale on the wrong axis moves a tiny model by only ~1e-3: caught with a tolerance that fits
#: the tiny model's own noise (1.5e-7 fp8, 7.8e-5 int8), not with the format's.
CASES = [
    ("fp8", "scale_x2", None, True),
    ("fp8", "scale_negated", None, False),
    ("fp8", "weight_transposed", None, True),
    ("fp8", "activation_qdq_dropped", 1e-4, True),
    ("int8", "axis_changed", 3e-4, True),
    ("int8", "activation_qdq_dropped", 3e-4, True),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Checked:
    """A bfloat16 quantized tiny-FLUX, its graph and the float32 and end-to-end errors of graphs against it."""

    def __init__(self, fmt: str, root: Path) -> None:
        self.built = Built(fmt, root, torch.bfloat16)
        self.root = root

    def buggy(self, bug: str) -> Path:
        model = onnx.load(str(self.built.path))
        BUGS[bug](model)
        path = self.root / f"bug-{bug}" / "transformer.onnx"
        path.parent.mkdir()
        onnx.save_model(model, str(path))
        return path

    def errors(self, path: Path) -> tuple[float, float]:
        """(float32 check, end to end against the bfloat16 model) max teacher-forced relative errors."""
        b = self.built
        module = b.pipe.transformer
        with tempfile.TemporaryDirectory() as scratch:
            graph, _ = par.runnable_graph(path, "bfloat16", Path(scratch))
            f32 = par.float32_parity(module, graph, b.trace, "bfloat16").max_rel_err
            component = par.onnxruntime_component(graph, module)
            e2e, _ = acc.accuracy_report(b.pipe, ADAPTER, b.trace, component=component)
        return f32, e2e.max_rel_err

    @functools.cached_property
    def clean(self) -> tuple[float, float]:
        return self.errors(self.built.path)


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Checked]:
    cache: dict[str, Checked] = {}

    def get(fmt: str) -> Checked:
        if fmt not in cache:
            cache[fmt] = Checked(fmt, tmp_path_factory.mktemp(f"bugs-{fmt}"))
        return cache[fmt]

    return get


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_clean_graph_passes_far_below_the_tolerance(checked: Callable[[str], Checked], fmt: str) -> None:
    c = checked(fmt)
    result = par.parity_report(c.built.pipe, ADAPTER, c.built.trace, c.built.path, fmt)
    tol = get_format(fmt).parity_tolerance
    assert result.tolerance == tol and result.dtype == "bfloat16"
    assert result.report.max_rel_err < tol / 10, result.report.teacher_forced
    assert result.end_to_end is not None and result.end_to_end.max_rel_err < OLD_TOLERANCE
    print(
        f"\n{fmt} clean: float32 check {result.report.max_rel_err:.3g} (tolerance {tol:g}); "
        f"end to end vs bfloat16 torch {result.end_to_end.max_rel_err:.3g} (old tolerance {OLD_TOLERANCE:g})"
    )


@pytest.mark.parametrize(("fmt", "bug", "tolerance", "old_missed"), CASES)
def test_injected_bug_fails_the_float32_check(
    checked: Callable[[str], Checked], fmt: str, bug: str, tolerance: float | None, old_missed: bool
) -> None:
    c = checked(fmt)
    tol = get_format(fmt).parity_tolerance if tolerance is None else tolerance
    clean, clean_e2e = c.clean
    path = c.buggy(bug)
    err, e2e = c.errors(path)
    print(
        f"\n{fmt} {bug}: float32 check clean {clean:.3g} < tolerance {tol:g} < bug {err:.3g}; end to end "
        f"clean {clean_e2e:.3g}, bug {e2e:.3g} (old tolerance {OLD_TOLERANCE:g}: "
        f"{'missed' if e2e <= OLD_TOLERANCE else 'caught'})"
    )
    assert clean < tol < err
    assert (e2e <= OLD_TOLERANCE) == old_missed
    with pytest.raises(VerificationError, match=f"quant.format {fmt}: the exported graph"):
        par.parity_report(c.built.pipe, ADAPTER, c.built.trace, path, fmt, tolerance=tolerance)
