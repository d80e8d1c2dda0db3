"""Parity (b) catches export bugs: a bfloat16 tiny-FLUX quantized and exported, then one bug injected into the
graph at a time (a weight scale doubled or negated, a weight transposed, a per-channel scale on the wrong
axis, an activation Q/DQ pair dropped). The build's check (``parity_report``: the graph's float32 copy against
the fake-quant model computing in float32, gated at the format's tolerance or twice the model's own rounding
noise) raises VerificationError for each, while the clean graph passes; the end-to-end figure (graph vs the
bfloat16 torch model, the check before this one, tolerance 0.05) is printed beside it: bfloat16 rounding alone
costs it about 3e-2, so all but the negated scale hid under that tolerance. ``pytest -s`` prints the figures."""

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
#: (format, bug, whether the old end-to-end check passed it). Each fails at the format's own tolerance (the
#: gate: 1e-3 fp8, 5e-4 int8, as the tiny model's own rounding noise is below half of it); a dropped Q/DQ pair
#: or a wrong-axis scale costs about what one layer's quantization does, ~1e-3 here.
CASES = [
    ("fp8", "scale_x2", True),
    ("fp8", "scale_negated", False),
    ("fp8", "weight_transposed", True),
    ("fp8", "activation_qdq_dropped", True),
    ("int8", "axis_changed", True),
    ("int8", "activation_qdq_dropped", True),
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
            f32 = par.float32_parity(module, graph, b.trace, "bfloat16")[0].max_rel_err
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
    # the gate is the tolerance: the tiny model's own rounding noise is below half of it
    assert result.noise is not None and 0 < result.noise.max_rel_err < tol / 2
    assert result.to_manifest()["gate"] == tol
    assert result.report.max_rel_err < tol / 5, result.report.teacher_forced
    assert result.end_to_end is not None and result.end_to_end.max_rel_err < OLD_TOLERANCE
    print(
        f"\n{fmt} clean: float32 check {result.report.max_rel_err:.3g} (own noise {result.noise.max_rel_err:.3g}, "
        f"gate {tol:g}); end to end vs bfloat16 torch {result.end_to_end.max_rel_err:.3g} "
        f"(old tolerance {OLD_TOLERANCE:g})"
    )


@pytest.mark.parametrize(("fmt", "bug", "old_missed"), CASES)
def test_injected_bug_fails_the_build(checked: Callable[[str], Checked], fmt: str, bug: str, old_missed: bool) -> None:
    """The build's own check (``parity_report``, as ``dtc build`` calls it: the format's tolerance, the gate
    allowing for the model's measured noise) fails on each bug; the old end-to-end check missed most."""
    c = checked(fmt)
    tol = get_format(fmt).parity_tolerance
    clean, clean_e2e = c.clean
    path = c.buggy(bug)
    err, e2e = c.errors(path)
    print(
        f"\n{fmt} {bug}: float32 check clean {clean:.3g} < gate {tol:g} < bug {err:.3g}; end to end "
        f"clean {clean_e2e:.3g}, bug {e2e:.3g} (old tolerance {OLD_TOLERANCE:g}: "
        f"{'missed' if e2e <= OLD_TOLERANCE else 'caught'})"
    )
    assert clean < tol < err
    assert (e2e <= OLD_TOLERANCE) == old_missed
    with pytest.raises(VerificationError, match=f"quant.format {fmt}: the exported graph .* over the tolerance"):
        par.parity_report(c.built.pipe, ADAPTER, c.built.trace, path, fmt)


def test_the_gate_allows_for_the_models_own_noise_and_no_more() -> None:
    """A model whose own rounding noise is 1e-3 (FLUX.1-dev widths at 2+2 blocks measure 8e-4 fp8, 3e-3 nvfp4):
    the fp8 gate is 2 x that, so a clean graph at the noise passes and one past twice the noise fails, naming
    the gate, the noise and the tolerance."""

    def report(err: float) -> acc.AccuracyReport:
        return acc.AccuracyReport("onnxruntime (float32)", "fake-quant torch (float32)", 1, 2,
                                  {"cos_min": [1.0, 1.0], "rel_err_max": [err / 2, err], "rel_err_mean": [0, 0]})  # fmt: skip

    noise = par.RoundingNoise(par.NOISE_PERTURBATION, report(1e-3))
    assert noise.gate(1e-3) == 2e-3 and noise.gate(1e-2) == 1e-2
    par.check_parity(report(1.2e-3), "fp8", 1e-3, noise=noise)
    with pytest.raises(VerificationError) as err:
        par.check_parity(report(2.5e-3), "fp8", 1e-3, noise=noise)
    message = str(err.value)
    assert "relative error of 0.0025 at step 1, over the gate 0.002 (2 x the model's own rounding noise" in message
    assert "the format's tolerance is 0.001" in message and "\n" not in message
    with pytest.raises(VerificationError, match="over the tolerance 0.001;"):
        par.check_parity(report(1.2e-3), "fp8", 1e-3)
