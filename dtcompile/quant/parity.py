"""Parity (b): an exported quantized graph in onnxruntime against the fake-quant torch model it came from.

``parity_report`` (a denoiser, over the fake-quant model's pipeline trace) and ``component_parity`` (a text
encoder, over held-out prompts) compare both sides in float32, so a format's tight tolerance separates an
export bug (a flipped scale, a wrong axis, a dropped Q/DQ) from rounding noise; ``check_parity`` fails the build
beyond it. ``onnxruntime_component`` wraps a graph as a pipeline component; ``runnable_graph`` is the copy
onnxruntime can run (FP4 custom ops emulated, 16-bit computed in float32).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import VerificationError
from dtcompile.core.progress import measured
from dtcompile.models.examples import model_config
from dtcompile.quant import get_format
from dtcompile.quant.accuracy import (
    AccuracyReport,
    PipelineTrace,
    accuracy_report,
    module_outputs,
    outputs_report,
    per_step,
    teacher_forced,
)

if TYPE_CHECKING:
    import torch

    from dtcompile.models.base import ModelAdapter

log = logging.getLogger("dtcompile.quantize")


def onnxruntime_component(
    onnx_path: Path,
    module: torch.nn.Module,
    output_name: str = "latent",
    dtype: torch.dtype | None = None,
    adapter: ModelAdapter | None = None,
) -> Any:
    """A stand-in for ``module`` that runs ``onnx_path`` in onnxruntime (basic graph optimizations only:
    the int8 fusions of higher levels change the numbers; ``low_memory``, as it runs beside the torch model);
    outputs cast to ``dtype`` (default: the module's); ``adapter``'s ``engine_call`` maps the pipeline's calls
    onto the graph inputs (as the runtime's stand-in does) and the pipeline arguments the export fixed are dropped
    (``adapter.fixed_inputs``, where the family has them: Cosmos)."""
    from dtcompile.backends.onnxruntime import OrtRunner
    from dtcompile.backends.standin import EngineModule

    runner = OrtRunner(Path(onnx_path), optimization="basic", low_memory=True)
    param = next(module.parameters())
    out_dtype = param.dtype if dtype is None else dtype
    config = dict(model_config(module))
    component = EngineModule(runner, config, runner.input_names, output_name, out_dtype, str(param.device))
    if adapter is not None:
        component.call_inputs = functools.partial(adapter.engine_call, config=config)
    fixed = getattr(adapter, "fixed_inputs", None)
    component.fixed_inputs = dict(fixed(config)) if fixed is not None else {}
    return component


#: What a 16-bit dtype alone costs end to end: the graph (in float32) against the 16-bit fake-quant torch model
#: differs this much with no export error. Information only (``ParityResult.end_to_end``); the gating check
#: compares the two in float32, where only the export can differ.
DTYPE_PARITY_FLOOR = {"float32": 0.0, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class ParityResult:
    """(b): the exported graph in onnxruntime against the fake-quant torch model, both in float32 (the
    gating ``report``), or why it was skipped. For a 16-bit model also ``end_to_end``: the graph against the
    16-bit torch model in the pipeline (teacher-forced, free-running and PSNR), information only."""

    report: AccuracyReport | None
    tolerance: float
    graph: str  # "exported" | "exported, TensorRT FP4 ops emulated by standard ops" | ""
    skipped: str | None = None
    dtype: str = "float32"  # the model's
    end_to_end: AccuracyReport | None = None
    noise: RoundingNoise | None = None  # the model's own rounding noise, which the gate allows for

    def to_manifest(self) -> dict[str, Any]:
        """JSON for the manifest: the gating report at the top (as before), ``precision`` both sides ran in,
        and for a 16-bit model ``end_to_end`` (with the dtype's expected floor); with ``noise`` its record and
        the ``gate`` the check applied."""
        out: dict[str, Any] = {"tolerance": self.tolerance, "graph": self.graph, "precision": "float32"}
        if self.noise is not None:
            out["noise"] = self.noise.to_manifest()
            out["gate"] = self.noise.gate(self.tolerance)
        if self.skipped:
            out["skipped"] = self.skipped
        if self.report is not None:
            out.update(self.report.to_manifest())
        if self.end_to_end is not None:
            out["end_to_end"] = {
                "dtype": self.dtype,
                "information_only": True,
                "expected_below": DTYPE_PARITY_FLOOR.get(self.dtype, 0.0),
                **self.end_to_end.to_manifest(),
            }
        return out


def runnable_graph(onnx_path: Path, dtype: str, scratch: Path) -> tuple[Path, list[str]]:
    """The graph onnxruntime checks and what was changed for it: ``onnx_path`` itself, or a copy in
    ``scratch`` where TensorRT's FP4 custom ops are replaced by standard ops computing the same NVFP4
    definition (``qdq.reference.fp4_reference_graph``) and a 16-bit graph computes in float32 (``qdq.reference.float32_copy``),
    written one weight at a time (``qdq.reference.onnxruntime_copy``)."""
    import onnx

    from dtcompile.quant.qdq.reference import onnxruntime_copy

    header = onnx.load(str(onnx_path), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in header.graph.node if n.domain not in ("", "ai.onnx")})
    del header
    if not custom and dtype == "float32":
        return Path(onnx_path), []
    notes = []
    if custom:
        notes.append(f"{', '.join(custom)} emulated by standard ops")
    if dtype != "float32":
        notes.append(f"{dtype} computed in float32 (onnxruntime has no bfloat16 CPU kernels)")
    path = Path(scratch) / "reference.onnx"
    onnxruntime_copy(Path(onnx_path), path, emulate_fp4=bool(custom), widen=dtype != "float32")
    return path, notes


def float32_parity(
    module: torch.nn.Module,
    graph_path: Path,
    trace: PipelineTrace,
    dtype: str,
    *,
    noise: bool = False,
    adapter: ModelAdapter | None = None,
) -> tuple[AccuracyReport, RoundingNoise | None]:
    """Teacher-forced: the float32 graph ``graph_path`` (``runnable_graph``) in onnxruntime against the 16-bit
    fake-quant ``module`` computing in float32 (``quant.export.float32_compute``: the graph's own scales, no
    copy of the model), both on ``trace``'s step inputs cast to float32. Nothing but the export and float32
    summation order can differ here, so the tolerance is tight. Returns the report and, with ``noise``, the
    model's own rounding noise on the same inputs (``trace_noise``; else None)."""
    import torch

    from dtcompile.quant.export import float32_compute

    in_float32 = float32_compute(module, getattr(torch, dtype))
    with measured("parity (b): fake-quant torch in float32", log), in_float32 as reference:
        expected = teacher_forced(reference, trace, torch.float32, label="parity fake-quant float32")
        own = trace_noise(reference, trace, expected) if noise else None
    with measured("parity (b): onnxruntime in float32", log):
        component = onnxruntime_component(graph_path, module, dtype=torch.float32, adapter=adapter)
        got = teacher_forced(component, trace, torch.float32, label="parity onnxruntime float32")
        del component
    report = AccuracyReport(
        candidate="onnxruntime (float32)",
        reference="fake-quant torch (float32)",
        prompts=len(trace.prompts),
        steps=trace.settings["steps"],
        teacher_forced=per_step(got, expected),
    )
    return report, own


def parity_report(
    pipe: Any,
    adapter: ModelAdapter,
    quantized_trace: PipelineTrace,
    onnx_path: Path,
    quant_format: str,
    *,
    tolerance: float | None = None,
) -> ParityResult:
    """Run the exported graph in onnxruntime on the fake-quant model's trace and fail beyond the tolerance.

    ``quantized_trace`` is the fake-quant torch run (the second value ``accuracy_report`` returns). Both sides
    compute in float32, so a tight gate separates an export bug from rounding noise: the format's tolerance or
    ``NOISE_MARGIN`` x the model's own rounding noise on the same steps (``trace_noise``), the larger. A float32
    model is compared as it is (teacher-forced, free-running and PSNR); a 16-bit model by ``float32_parity``
    (teacher-forced, the graph's float32 copy against the model computing in float32), then end to end against
    the 16-bit torch model in the pipeline (``ParityResult.end_to_end``, information only: 16-bit rounding alone
    costs up to ``DTYPE_PARITY_FLOOR``).
    Graphs with TensorRT's FP4 custom ops are run on a copy where standard ops emulate them
    (``runnable_graph``); the shipped graph is unchanged.

    Raises:
        VerificationError: the worst teacher-forced step error of the float32 comparison exceeds the gate
            (raised by ``check_parity``, naming the step, the error and the gate).
    """
    module = getattr(pipe, adapter.component)
    dtype = dtype_name(next(module.parameters()).dtype)
    limit = parity_tolerance(quant_format, tolerance)
    with tempfile.TemporaryDirectory(prefix=".dtc-parity-") as scratch:
        with measured("parity (b): the graph onnxruntime runs", log):
            path, notes = runnable_graph(Path(onnx_path), dtype, Path(scratch))
        graph = ", ".join(["exported", *notes])
        end_to_end = None
        if dtype == "float32":
            with measured("parity (b): the model's own rounding noise", log):
                noise: RoundingNoise | None = trace_noise(module, quantized_trace, quantized_trace.noise)
            report = _pipeline_parity(pipe, adapter, quantized_trace, path, module, "fake-quant torch")
            check_parity(report, quant_format, limit, noise=noise)
        else:
            report, noise = float32_parity(module, path, quantized_trace, dtype, noise=True, adapter=adapter)
            check_parity(report, quant_format, limit, noise=noise)  # before the slower end-to-end run
            with measured(f"parity (b): end to end against {dtype}", log):
                reference = f"fake-quant torch ({dtype})"
                end_to_end = _pipeline_parity(pipe, adapter, quantized_trace, path, module, reference)
            log.info(
                "parity end to end (information only): onnxruntime vs %s torch max rel err %.3g (%s alone: up to %g)",
                dtype,
                end_to_end.max_rel_err,
                dtype,
                DTYPE_PARITY_FLOOR.get(dtype, 0.0),
            )
    return ParityResult(report, limit, graph, dtype=dtype, end_to_end=end_to_end, noise=noise)


def _pipeline_parity(
    pipe: Any, adapter: ModelAdapter, trace: PipelineTrace, graph_path: Path, module: Any, reference: str
) -> AccuracyReport:
    """The graph in onnxruntime standing in for the pipeline's component, against ``trace`` (accuracy_report)."""
    component = onnxruntime_component(graph_path, module, adapter=adapter)
    report, _ = accuracy_report(
        pipe, adapter, trace, component=component, candidate="onnxruntime", reference_name=reference
    )
    return report


def parity_tolerance(quant_format: str, tolerance: float | None = None) -> float:
    """The format's tolerance (or ``tolerance``) for the float32 comparison, whatever the model's dtype."""
    return get_format(quant_format).parity_tolerance if tolerance is None else tolerance


def check_parity(
    report: AccuracyReport,
    quant_format: str,
    tolerance: float,
    *,
    field: str = "quant.format",
    noise: RoundingNoise | None = None,
) -> None:
    """Fail when the exported graph strays from the fake-quant model by more than ``tolerance`` (with
    ``noise``: by more than ``noise.gate(tolerance)``); ``field`` is the recipe field that asked for the format
    (``components[2].quant`` for a text encoder).

    Raises:
        VerificationError: naming the worst step (or output), its error, the tolerance and what to do.
    """
    errors = report.teacher_forced["rel_err_max"]
    worst = max(range(len(errors)), key=lambda i: (math.isnan(errors[i]), errors[i]))
    err = errors[worst]
    where = f"output {report.outputs[worst]}" if report.outputs else f"step {worst}"
    limit = f"the tolerance {tolerance:g}"
    if noise is not None and noise.gate(tolerance) > tolerance:
        limit = (
            f"the gate {noise.gate(tolerance):.3g} ({NOISE_MARGIN:g} x the model's own rounding noise "
            f"{noise.max_rel_err:.3g}; the format's tolerance is {tolerance:g})"
        )
        tolerance = noise.gate(tolerance)
    log.info("parity %s vs %s: teacher-forced max rel err %.3g, %s", report.candidate, report.reference, err,
             limit.removeprefix("the "))  # fmt: skip
    if not err <= tolerance:  # also catches NaN
        raise VerificationError(
            f"{field} {quant_format}: the exported graph in {report.candidate} differs from the "
            f"{report.reference} model by a relative error of {err:.3g} at {where}, over {limit}; the export is "
            "wrong, not the quantization: rebuild with --debug and report it"
        )


# --- a component called once per prompt (text encoders) ----------------------------------------------------------

#: Relative perturbation of every quantized input for ``rounding_noise``: about how far onnxruntime's float32
#: arithmetic (another summation order) lands from torch's.
NOISE_PERTURBATION = 1e-6
#: A component's parity gate is the format's tolerance or this many times its own rounding noise, the larger.
NOISE_MARGIN = 2.0


@dataclass
class RoundingNoise:
    """How far the fake-quant model lands from itself when every quantizer input is perturbed by
    ``perturbation`` (relative, seeded): where an fp8 value sits on a rounding boundary, float32 noise picks the
    other side, and deep or wide models carry that flip through every later layer. onnxruntime against torch is
    such a perturbation, so a graph cannot be expected closer to the model than this."""

    perturbation: float
    report: AccuracyReport

    @property
    def max_rel_err(self) -> float:
        return self.report.max_rel_err

    def gate(self, tolerance: float) -> float:
        """The parity gate: ``tolerance`` or ``NOISE_MARGIN`` x this noise, the larger."""
        return float(f"{max(tolerance, NOISE_MARGIN * self.max_rel_err):.6g}")

    def to_manifest(self) -> dict[str, Any]:
        return {
            "perturbation": self.perturbation,
            "margin": NOISE_MARGIN,
            "max_rel_err": float(f"{self.max_rel_err:.6g}"),
            "rel_err_max": [float(f"{v:.6g}") for v in self.report.teacher_forced["rel_err_max"]],
        }


def rounding_noise(
    module: Any,
    wrap: Any,
    inputs: Sequence[dict[str, Any]],
    expected: list[list[Any]],
    output_names: Sequence[str],
    perturbation: float = NOISE_PERTURBATION,
) -> RoundingNoise:
    """``module`` (fake-quant, float32) run on ``inputs`` with every enabled activation quantizer's input
    multiplied by 1 + ``perturbation`` x N(0, 1) (seeded), against ``expected`` (its own unperturbed outputs)."""
    import torch

    with perturbed_quantizers(module, perturbation):
        got = module_outputs(wrap(module), inputs, torch.float32, label="parity rounding noise")
    return RoundingNoise(perturbation, outputs_report(got, expected, output_names, names=_noise_names(perturbation)))


def trace_noise(
    module: Any, trace: PipelineTrace, expected: list[list[Any]], perturbation: float = NOISE_PERTURBATION
) -> RoundingNoise:
    """A denoiser's ``rounding_noise``: ``module`` (fake-quant, computing in float32) teacher-forced on
    ``trace``'s step inputs with its activation quantizers' inputs perturbed, against ``expected`` (its own
    unperturbed outputs on the same inputs), step by step."""
    import torch

    with perturbed_quantizers(module, perturbation):
        got = teacher_forced(module, trace, torch.float32, label="parity rounding noise")
    candidate, reference = _noise_names(perturbation)
    report = AccuracyReport(candidate, reference, len(trace.prompts), trace.settings["steps"], per_step(got, expected))
    noise = RoundingNoise(perturbation, report)
    log.info("parity: the fake-quant model's own rounding noise %.3g", noise.max_rel_err)
    return noise


def _noise_names(perturbation: float) -> tuple[str, str]:
    return f"fake-quant torch, quantizer inputs x (1 + {perturbation:g} N(0,1))", "fake-quant torch"


@contextlib.contextmanager
def perturbed_quantizers(module: Any, perturbation: float = NOISE_PERTURBATION) -> Iterator[None]:
    """Inside: every enabled activation quantizer of ``module`` sees its input multiplied by
    1 + ``perturbation`` x N(0, 1) (seeded, so two runs perturb alike)."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    gen = torch.Generator().manual_seed(0)

    def jitter(_mod: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        return (x * (1 + perturbation * noise), *args[1:])

    quantizers = [
        q
        for n, q in module.named_modules()
        if isinstance(q, TensorQuantizer) and q.is_enabled and not n.endswith("weight_quantizer")
    ]
    handles = [q.register_forward_pre_hook(jitter) for q in quantizers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def component_parity(
    module: torch.nn.Module,
    wrap: Any,
    onnx_path: Path,
    inputs: Sequence[dict[str, Any]],
    output_names: Sequence[str],
    quant_format: str,
    *,
    field: str = "quant.format",
    tolerance: float | None = None,
) -> ParityResult:
    """Parity (b) of a component called once per prompt (a text encoder): its exported graph in onnxruntime
    against the fake-quant ``module``, both in float32, on ``inputs`` (keyword feeds); ``wrap(module)`` is the
    export wrapper (graph inputs in, graph outputs out). A 16-bit model is compared in float32 on both sides: the
    graph's float32 copy (``runnable_graph``) against the model computing in float32
    (``quant.export.float32_compute``: the graph's own rounded scales), as ``parity_report`` does for a
    denoiser, so the format's tolerance separates an export bug from noise.

    The gate allows for the model's own rounding noise (``rounding_noise``, recorded as ``noise``): an fp8
    model wide and deep enough moves by more than the format's tolerance when its float32 arithmetic is
    perturbed as little as onnxruntime's differs from torch's (a random-weight T5 of width 1024 and 4 layers:
    up to 4e-2), which says nothing about the export; the gate is the tolerance or ``NOISE_MARGIN`` x that
    noise, the larger. On small models the noise is ~1e-7 and the gate the tolerance.

    Raises:
        VerificationError: an output's worst relative error exceeds the gate (``check_parity``).
    """
    import torch

    from dtcompile.backends.onnxruntime import OrtRunner
    from dtcompile.quant.export import float32_compute

    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    limit = parity_tolerance(quant_format, tolerance)
    label = f"parity {Path(onnx_path).stem}"
    in_float32 = (
        contextlib.nullcontext(module) if dtype == "float32" else float32_compute(module, getattr(torch, dtype))
    )
    with in_float32 as reference:
        expected = module_outputs(wrap(reference), inputs, torch.float32, label=f"{label} fake-quant float32")
        noise = rounding_noise(reference, wrap, inputs, expected, output_names)
    with tempfile.TemporaryDirectory(prefix=".dtc-parity-") as scratch:
        path, notes = runnable_graph(Path(onnx_path), dtype, Path(scratch))
        runner = OrtRunner(path, optimization="basic", low_memory=True)
        got = [[runner(dict(feeds))[n].float().cpu() for n in output_names] for feeds in inputs]
        del runner
    precision = "" if dtype == "float32" else " (float32)"
    report = outputs_report(
        got, expected, output_names, names=(f"onnxruntime{precision}", f"fake-quant torch{precision}")
    )
    log.info("parity %s: the fake-quant model's own rounding noise %.3g (gate %g)", Path(onnx_path).stem,
             noise.max_rel_err, noise.gate(limit))  # fmt: skip
    check_parity(report, quant_format, limit, field=field, noise=noise)
    return ParityResult(report, limit, ", ".join(["exported", *notes]), dtype=dtype, noise=noise)


__all__ = [
    "DTYPE_PARITY_FLOOR",
    "NOISE_MARGIN",
    "NOISE_PERTURBATION",
    "ParityResult",
    "RoundingNoise",
    "check_parity",
    "component_parity",
    "float32_parity",
    "onnxruntime_component",
    "parity_report",
    "parity_tolerance",
    "perturbed_quantizers",
    "rounding_noise",
    "runnable_graph",
    "trace_noise",
]
