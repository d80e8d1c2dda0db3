"""Accuracy of a quantized component: traces of the pipeline, reports against a reference, graph parity.

``trace_pipeline`` and ``accuracy_report`` measure a quantized component against a reference: per-step noise
prediction cosine similarity and relative error (teacher-forced: the candidate sees the reference's step
inputs, so the numbers are the model's own error, and free-running: what a user gets, errors compounding), and
the final images' PSNR. ``onnxruntime_component`` wraps an exported graph so the same report compares the
graph against the fake-quant torch model (``parity_report``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import VerificationError
from dtcompile.core.metrics import PSNR_IDENTICAL, psnr
from dtcompile.core.progress import measured
from dtcompile.models.base import GenerationRequest
from dtcompile.quant import get_format
from dtcompile.quant.calibration import _no_progress_bar

if TYPE_CHECKING:
    import torch

    from dtcompile.models.base import ModelAdapter

log = logging.getLogger("dtcompile.quantize")

#: Held-out prompts for accuracy reports; never in the calibration file (a test checks).
HELDOUT_PROMPTS: tuple[str, ...] = (
    "a red fox sitting in fresh snow at dawn, soft golden light, telephoto photograph",
    "an isometric illustration of a tiny island city with a lighthouse and winding streets",
    "close-up portrait of an elderly fisherman with a weathered face, dramatic side lighting",
    "a bowl of ramen on a wooden table, steam rising, shallow depth of field",
    "a watercolor painting of a mountain lake surrounded by pine trees in autumn",
    "a futuristic train gliding over a desert at sunset, cinematic wide shot",
    "a black cat asleep on a stack of old books next to a window with rain drops",
    "a knight in ornate silver armor standing in a misty forest, digital art",
)


@dataclass
class PipelineTrace:
    """Per prompt: the component's inputs and noise prediction at every step, and the final image."""

    prompts: list[str]
    inputs: list[list[dict[str, Any]]]  # [prompt][step] keyword tensors the pipeline passed
    noise: list[list[Any]]  # [prompt][step] noise prediction (CPU float32)
    images: list[Any]  # [prompt] final image (CPU float32, [0, 1], C x H x W)
    settings: dict[str, Any]


@contextlib.contextmanager
def _swap_component(pipe: Any, name: str, module: Any) -> Iterator[None]:
    original = getattr(pipe, name)
    if module is None or module is original:
        yield
        return
    setattr(pipe, name, module)
    try:
        yield
    finally:
        setattr(pipe, name, original)


def trace_pipeline(
    pipe: Any,
    adapter: ModelAdapter,
    prompts: Sequence[str],
    *,
    steps: int,
    height: int,
    width: int,
    seed: int = 0,
    max_sequence_length: int | None = None,
    guidance_scale: float | None = None,
    component: Any = None,
    frames: int | None = None,
    label: str = "trace",
) -> PipelineTrace:
    """Run the pipeline once per prompt (generator seeded ``seed`` + index) and record every step.

    ``frames``: video families' pixel frames (None for images).

    ``component`` stands in for the pipeline's own component during the run (e.g. an onnxruntime module).
    ``label`` names the run's progress (prompts x steps).
    """
    import torch

    from dtcompile.core.progress import progress

    name = adapter.component
    inputs: list[list[dict[str, Any]]] = []
    noise: list[list[Any]] = []
    images: list[Any] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_swap_component(pipe, name, component))
        stack.enter_context(quantized_forward_ctx())
        stack.enter_context(_no_progress_bar(pipe))
        bar = stack.enter_context(progress(label, len(prompts) * steps))

        def step_done(_pipe: Any, _step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            bar.update()
            return kwargs

        module = getattr(pipe, name)
        for i, prompt in enumerate(prompts):
            recorder = _StepRecorder()
            handle = module.register_forward_hook(recorder, with_kwargs=True)
            try:
                request = GenerationRequest(
                    prompt,
                    steps,
                    height,
                    width,
                    generator=torch.Generator("cpu").manual_seed(seed + i),
                    guidance=guidance_scale,
                    text_len=max_sequence_length,
                    output_type="pt",
                    frames=frames,
                    callback=step_done,
                )
                image = adapter.output_media(pipe(**adapter.call_kwargs(request)))[0]
            finally:
                handle.remove()
            inputs.append(recorder.inputs)
            noise.append(recorder.noise)
            images.append(image.detach().float().cpu())
    settings = {
        "steps": steps,
        "height": height,
        "width": width,
        "seed": seed,
        "max_sequence_length": max_sequence_length,
        "guidance_scale": guidance_scale,
        "frames": frames,
    }
    return PipelineTrace(list(prompts), inputs, noise, images, settings)


class _StepRecorder:
    """Forward hook recording the keyword tensors and the noise prediction of every component call."""

    def __init__(self) -> None:
        self.inputs: list[dict[str, Any]] = []
        self.noise: list[Any] = []
        # Text embeddings are the same unchanged tensor every step: one copy. The original stays referenced
        # (so its id cannot be reused by a later tensor) and its version counter is checked.
        self._shared: dict[int, tuple[Any, int, Any]] = {}

    def __call__(self, _module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        import torch

        rec = {}
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                seen = self._shared.get(id(v))
                if seen is None or seen[0] is not v or seen[1] != v._version:
                    seen = (v, v._version, v.detach().clone())
                    self._shared[id(v)] = seen
                rec[k] = seen[2]
        self.inputs.append(rec)
        out = output[0] if isinstance(output, (tuple, list)) else output
        out = out["sample"] if isinstance(out, dict) else out
        self.noise.append(out.detach().float().cpu())


def quantized_forward_ctx() -> contextlib.AbstractContextManager[None]:
    """``quantized_forward`` when ModelOpt is importable, else a no-op (unquantized pipelines)."""
    from importlib.util import find_spec

    if find_spec("modelopt") is None:
        return contextlib.nullcontext()
    from dtcompile.quant.export import quantized_forward

    return quantized_forward()


@dataclass
class AccuracyReport:
    """Candidate against reference. Per step (worst prompt): teacher-forced and free-running noise-prediction
    cosine similarity and relative L2 error; per prompt: final-image PSNR (dB); for videos also every frame's
    PSNR (``frame_psnr_db``, per prompt) and ``psnr_db`` the worst frame's. A teacher-forced-only report
    (``free_running`` and ``psnr_db`` None) compares the component alone, outside the pipeline; a text
    encoder's (``outputs`` set) has one entry per graph output in place of steps, each the worst prompt's."""

    candidate: str
    reference: str
    prompts: int
    steps: int | None  # None: a component called once per prompt (``outputs`` in place of steps)
    teacher_forced: dict[str, list[float]]
    free_running: dict[str, list[float]] | None = None
    psnr_db: list[float] | None = None
    frame_psnr_db: list[list[float]] | None = None
    outputs: list[str] | None = None  # a text encoder's report: one entry per graph output, not per step

    @property
    def max_rel_err(self) -> float:
        """Worst teacher-forced per-step relative error (the model's own error)."""
        return max(self.teacher_forced["rel_err_max"])

    @property
    def min_cos(self) -> float:
        """Worst teacher-forced per-step cosine similarity."""
        return min(self.teacher_forced["cos_min"])

    def to_manifest(self) -> dict[str, Any]:
        """JSON for the manifest (numbers rounded to 6 significant digits)."""

        def r(values: list[float]) -> list[float]:
            return [float(f"{v:.6g}") for v in values]

        out: dict[str, Any] = {"candidate": self.candidate, "reference": self.reference, "prompts": self.prompts}
        if self.outputs is not None:
            out["outputs"] = list(self.outputs)
        else:
            out["steps"] = self.steps
        out["teacher_forced"] = {k: r(v) for k, v in self.teacher_forced.items()}
        summary = {"min_cos": float(f"{self.min_cos:.6g}"), "max_rel_err": float(f"{self.max_rel_err:.6g}")}
        if self.free_running is not None:
            out["free_running"] = {k: r(v) for k, v in self.free_running.items()}
        if self.psnr_db is not None:
            out["psnr_db"] = r(self.psnr_db)
            summary["min_psnr_db"] = float(f"{min(self.psnr_db):.6g}")
            summary["mean_psnr_db"] = float(f"{sum(self.psnr_db) / len(self.psnr_db):.6g}")
        if self.frame_psnr_db:
            out["frame_psnr_db"] = [r(f) for f in self.frame_psnr_db]
        return {**out, "summary": summary}


def accuracy_report(
    pipe: Any,
    adapter: ModelAdapter,
    reference: PipelineTrace,
    *,
    component: Any = None,
    candidate: str = "quantized",
    reference_name: str = "unquantized",
    label: str | None = None,
) -> tuple[AccuracyReport, PipelineTrace]:
    """Compare ``component`` (default: the pipeline's own component now) against ``reference``.

    Teacher-forced: the candidate is called on each recorded step input of the reference. Free-running: the
    pipeline is run again with the candidate, same prompts and seeds. Returns the report and the candidate's
    own trace (a reference for the next comparison, e.g. onnxruntime against this fake-quant model).
    ``label`` names its progress (default ``accuracy <candidate>``).
    """

    label = label or f"accuracy {candidate}"
    s = reference.settings
    trace = trace_pipeline(
        pipe,
        adapter,
        reference.prompts,
        steps=s["steps"],
        height=s["height"],
        width=s["width"],
        seed=s["seed"],
        max_sequence_length=s["max_sequence_length"],
        guidance_scale=s["guidance_scale"],
        component=component,
        frames=s.get("frames"),
        label=label,
    )
    module = component if component is not None else getattr(pipe, adapter.component)
    forced = teacher_forced(module, reference, label=f"{label} teacher-forced")
    report = AccuracyReport(
        candidate=candidate,
        reference=reference_name,
        prompts=len(reference.prompts),
        steps=s["steps"],
        teacher_forced=_per_step(forced, reference.noise),
        free_running=_per_step(trace.noise, reference.noise),
        psnr_db=[psnr(a, b, cap=PSNR_IDENTICAL) for a, b in zip(trace.images, reference.images, strict=True)],
    )
    if trace.images and trace.images[0].dim() == 4:  # videos (frames x C x H x W): every frame, worst as psnr_db
        report.frame_psnr_db = [
            [psnr(fa, fb, cap=PSNR_IDENTICAL) for fa, fb in zip(a, b, strict=True)]
            for a, b in zip(trace.images, reference.images, strict=True)
        ]
        report.psnr_db = [min(f) for f in report.frame_psnr_db]
    log.info(
        "accuracy %s vs %s: teacher-forced min cos %.6f, max rel err %.3g; PSNR min %.1f dB",
        candidate,
        reference_name,
        report.min_cos,
        report.max_rel_err,
        min(report.psnr_db),
    )
    return report, trace


def teacher_forced(
    module: Any, trace: PipelineTrace, dtype: torch.dtype | None = None, label: str = "teacher-forced"
) -> list[list[torch.Tensor]]:
    """``module``'s noise prediction (CPU float32) on every recorded step input of ``trace``, [prompt][step];
    ``dtype``: floating-point inputs cast to it first (e.g. float32 for a 16-bit model computing in float32);
    ``label`` names the progress bar."""
    import torch

    from dtcompile.core.progress import progress

    def cast(v: Any) -> Any:
        return v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v

    forced: list[list[torch.Tensor]] = []
    calls = sum(len(per_prompt) for per_prompt in trace.inputs)
    with torch.no_grad(), quantized_forward_ctx(), progress(label, calls) as bar:
        for per_prompt in trace.inputs:
            outs = []
            for kwargs in per_prompt:
                out = module(**{k: cast(v) for k, v in kwargs.items()}, return_dict=False)[0]
                outs.append(out.detach().float().cpu())
                bar.update()
            forced.append(outs)
    return forced


def _per_step(candidate: list[list[Any]], reference: list[list[Any]]) -> dict[str, list[float]]:
    steps = min(len(c) for c in candidate + reference)
    cos_min, rel_max, rel_mean = [], [], []
    for step in range(steps):
        cs, rs = [], []
        for cand, ref in zip(candidate, reference, strict=True):
            c, r = cand[step].reshape(-1).double(), ref[step].reshape(-1).double()
            denom = float(c.norm() * r.norm())
            cs.append(float(c @ r) / denom if denom else (1.0 if float((c - r).norm()) == 0 else 0.0))
            rn = float(r.norm())
            rs.append(float((c - r).norm()) / rn if rn else float((c - r).norm()))
        cos_min.append(min(cs))
        rel_max.append(max(rs))
        rel_mean.append(sum(rs) / len(rs))
    return {"cos_min": cos_min, "rel_err_max": rel_max, "rel_err_mean": rel_mean}


def onnxruntime_component(
    onnx_path: Path, module: torch.nn.Module, output_name: str = "latent", dtype: torch.dtype | None = None
) -> Any:
    """A stand-in for ``module`` that runs ``onnx_path`` in onnxruntime (basic graph optimizations only:
    the int8 fusions of higher levels change the numbers; ``low_memory``, as it runs beside the torch model);
    outputs cast to ``dtype`` (default: the module's)."""
    from dtcompile.backends.onnxruntime import OrtRunner
    from dtcompile.backends.standin import EngineModule

    runner = OrtRunner(Path(onnx_path), optimization="basic", low_memory=True)
    param = next(module.parameters())
    out_dtype = param.dtype if dtype is None else dtype
    return EngineModule(runner, dict(module.config), runner.input_names, output_name, out_dtype, str(param.device))


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
    noise: RoundingNoise | None = None  # a component's own rounding noise, where the gate allows for it

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
    definition (``qdq.fp4_reference_graph``) and a 16-bit graph computes in float32 (``qdq.float32_copy``),
    written one weight at a time (``qdq.onnxruntime_copy``)."""
    import onnx

    from dtcompile.quant.qdq import onnxruntime_copy

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


def float32_parity(module: torch.nn.Module, graph_path: Path, trace: PipelineTrace, dtype: str) -> AccuracyReport:
    """Teacher-forced: the float32 graph ``graph_path`` (``runnable_graph``) in onnxruntime against the 16-bit
    fake-quant ``module`` computing in float32 (``quant.export.float32_compute``: the graph's own scales, no
    copy of the model), both on ``trace``'s step inputs cast to float32. Nothing but the export can differ
    here, so the tolerance is tight."""
    import torch

    from dtcompile.quant.export import float32_compute

    in_float32 = float32_compute(module, getattr(torch, dtype))
    with measured("parity (b): fake-quant torch in float32", log), in_float32 as reference:
        expected = teacher_forced(reference, trace, torch.float32, label="parity fake-quant float32")
    with measured("parity (b): onnxruntime in float32", log):
        component = onnxruntime_component(graph_path, module, dtype=torch.float32)
        got = teacher_forced(component, trace, torch.float32, label="parity onnxruntime float32")
        del component
    return AccuracyReport(
        candidate="onnxruntime (float32)",
        reference="fake-quant torch (float32)",
        prompts=len(trace.prompts),
        steps=trace.settings["steps"],
        teacher_forced=_per_step(got, expected),
    )


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
    compute in float32, so the format's tight tolerance separates an export bug from rounding noise: a float32
    model is compared as it is (teacher-forced, free-running and PSNR); a 16-bit model by ``float32_parity``
    (teacher-forced, the graph's float32 copy against the model computing in float32), then end to end against
    the 16-bit torch model in the pipeline (``ParityResult.end_to_end``, information only: 16-bit rounding alone
    costs up to ``DTYPE_PARITY_FLOOR``).
    Graphs with TensorRT's FP4 custom ops are run on a copy where standard ops emulate them
    (``runnable_graph``); the shipped graph is unchanged.

    Raises:
        VerificationError: the worst teacher-forced step error of the float32 comparison exceeds the format's
            tolerance (raised by ``check_parity``, naming the step, the error and the tolerance).
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
            report = _pipeline_parity(pipe, adapter, quantized_trace, path, module, "fake-quant torch")
            check_parity(report, quant_format, limit)
        else:
            report = float32_parity(module, path, quantized_trace, dtype)
            check_parity(report, quant_format, limit)  # before the slower end-to-end run
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
    return ParityResult(report, limit, graph, dtype=dtype, end_to_end=end_to_end)


def _pipeline_parity(
    pipe: Any, adapter: ModelAdapter, trace: PipelineTrace, graph_path: Path, module: Any, reference: str
) -> AccuracyReport:
    """The graph in onnxruntime standing in for the pipeline's component, against ``trace`` (accuracy_report)."""
    component = onnxruntime_component(graph_path, module)
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
            f"the gate {noise.gate(tolerance):.3g} ({NOISE_MARGIN:g} x the model's own fp8 rounding noise "
            f"{noise.max_rel_err:.3g}; the format's tolerance is {tolerance:g})"
        )
        tolerance = noise.gate(tolerance)
    log.info(
        "parity %s vs %s: teacher-forced max rel err %.3g (tolerance %g)",
        report.candidate,
        report.reference,
        err,
        tolerance,
    )
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
        got = module_outputs(wrap(module), inputs, torch.float32, label="parity rounding noise")
    finally:
        for h in handles:
            h.remove()
    names = (f"fake-quant torch, quantizer inputs x (1 + {perturbation:g} N(0,1))", "fake-quant torch")
    return RoundingNoise(perturbation, outputs_report(got, expected, output_names, names=names))


def module_outputs(
    module: Any, inputs: Sequence[dict[str, Any]], dtype: torch.dtype | None = None, label: str = "outputs"
) -> list[list[torch.Tensor]]:
    """[input][output]: ``module``'s outputs (a tensor or a tuple of them; CPU float32) on each keyword feed of
    ``inputs``; floating-point inputs cast to ``dtype`` first when given. ``label`` names the progress."""
    import torch

    from dtcompile.core.progress import progress

    def cast(v: Any) -> Any:
        return v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v

    out: list[list[torch.Tensor]] = []
    with torch.no_grad(), quantized_forward_ctx(), progress(label, len(inputs)) as bar:
        for feeds in inputs:
            got = module(**{k: cast(v) for k, v in feeds.items()})
            out.append([t.detach().float().cpu() for t in (got if isinstance(got, (tuple, list)) else (got,))])
            bar.update()
    return out


def outputs_report(
    candidate: list[list[Any]], reference: list[list[Any]], outputs: Sequence[str], *, names: tuple[str, str]
) -> AccuracyReport:
    """Candidate against reference, [input][output] each (``module_outputs``): per output, the worst input's
    cosine and relative error. ``names``: (candidate, reference) as the report calls them."""
    return AccuracyReport(
        candidate=names[0],
        reference=names[1],
        prompts=len(reference),
        steps=None,
        teacher_forced=_per_step(candidate, reference),
        outputs=list(outputs),
    )


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
    "HELDOUT_PROMPTS",
    "NOISE_MARGIN",
    "NOISE_PERTURBATION",
    "PSNR_IDENTICAL",
    "AccuracyReport",
    "ParityResult",
    "PipelineTrace",
    "RoundingNoise",
    "accuracy_report",
    "check_parity",
    "component_parity",
    "float32_parity",
    "module_outputs",
    "onnxruntime_component",
    "outputs_report",
    "parity_report",
    "parity_tolerance",
    "rounding_noise",
    "quantized_forward_ctx",
    "runnable_graph",
    "teacher_forced",
    "trace_pipeline",
]
