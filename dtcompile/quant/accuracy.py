"""Accuracy of a quantized component: traces of the pipeline and reports against a reference.

``trace_pipeline`` and ``accuracy_report`` measure a quantized component against a reference: per-step noise
prediction cosine similarity and relative error (teacher-forced: the candidate sees the reference's step
inputs, so the numbers are the model's own error, and free-running: what a user gets, errors compounding), and
the final images' PSNR. ``module_outputs`` and ``outputs_report`` do the same for a component called once per
prompt (a text encoder). The exported graph's parity with the fake-quant model: ``dtcompile.quant.parity``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtcompile.core.metrics import PSNR_IDENTICAL, cosine, psnr, rel_l2
from dtcompile.models.base import GenerationRequest
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

        for part in getattr(pipe, "components", {}).values():  # every module of the run, the stand-in included
            eval_mode(part)
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

    def _copy(self, v: Any) -> Any:
        seen = self._shared.get(id(v))
        if seen is None or seen[0] is not v or seen[1] != v._version:
            seen = (v, v._version, v.detach().clone())
            self._shared[id(v)] = seen
        return seen[2]

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        import torch

        from dtcompile.backends.standin import positional_call

        if args:  # a UNet's sample and timestep: named after the stand-in's graph inputs or the forward's parameters
            names = getattr(module, "input_names", None) or list(inspect.signature(module.forward).parameters)
            kwargs = {**positional_call(names, tuple(args)), **kwargs}
        rec: dict[str, Any] = {}
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                rec[k] = self._copy(v)
            elif isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                rec[k] = {name: self._copy(t) for name, t in v.items()}  # a UNet's added_cond_kwargs
            elif isinstance(v, (list, tuple)):  # shapes the pipeline passes as lists (Qwen-Image's img_shapes)
                rec[k] = v
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
    psnr_db = [psnr(a, b, cap=PSNR_IDENTICAL) for a, b in zip(trace.images, reference.images, strict=True)]
    report = AccuracyReport(
        candidate=candidate,
        reference=reference_name,
        prompts=len(reference.prompts),
        steps=s["steps"],
        teacher_forced=per_step(forced, reference.noise),
        free_running=per_step(trace.noise, reference.noise),
        psnr_db=psnr_db,
    )
    if trace.images and trace.images[0].dim() == 4:  # videos (frames x C x H x W): every frame, worst as psnr_db
        report.frame_psnr_db = [
            [psnr(fa, fb, cap=PSNR_IDENTICAL) for fa, fb in zip(a, b, strict=True)]
            for a, b in zip(trace.images, reference.images, strict=True)
        ]
        psnr_db = report.psnr_db = [min(f) for f in report.frame_psnr_db]
    log.info(
        "accuracy %s vs %s: teacher-forced min cos %.6f, max rel err %.3g; PSNR min %.1f dB",
        candidate,
        reference_name,
        report.min_cos,
        report.max_rel_err,
        min(psnr_db),
    )
    return report, trace


def eval_mode(module: Any) -> Any:
    """``module`` (and everything inside it) in eval mode, when it is a torch module: every reference a parity or
    accuracy check compares against runs without dropout (real T5-XXL configs have ``dropout_rate`` 0.1)."""
    import torch

    if isinstance(module, torch.nn.Module):
        module.eval()
    return module


def teacher_forced(
    module: Any, trace: PipelineTrace, dtype: torch.dtype | None = None, label: str = "teacher-forced"
) -> list[list[torch.Tensor]]:
    """``module``'s noise prediction (CPU float32) on every recorded step input of ``trace``, [prompt][step];
    ``dtype``: floating-point inputs cast to it first (e.g. float32 for a 16-bit model computing in float32);
    ``label`` names the progress bar."""
    import torch

    from dtcompile.core.progress import progress

    def cast(v: Any) -> Any:
        if isinstance(v, dict):  # a UNet's added_cond_kwargs
            return {k: cast(t) for k, t in v.items()}
        return v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v

    forced: list[list[torch.Tensor]] = []
    calls = sum(len(per_prompt) for per_prompt in trace.inputs)
    eval_mode(module)
    with torch.no_grad(), quantized_forward_ctx(), progress(label, calls) as bar:
        for per_prompt in trace.inputs:
            outs = []
            for kwargs in per_prompt:
                out = module(**{k: cast(v) for k, v in kwargs.items()}, return_dict=False)[0]
                outs.append(out.detach().float().cpu())
                bar.update()
            forced.append(outs)
    return forced


def per_step(candidate: list[list[Any]], reference: list[list[Any]]) -> dict[str, list[float]]:
    steps = min(len(c) for c in candidate + reference)
    cos_min, rel_max, rel_mean = [], [], []
    for step in range(steps):
        cs, rs = [], []
        for cand, ref in zip(candidate, reference, strict=True):
            cs.append(cosine(cand[step], ref[step]))
            rs.append(rel_l2(cand[step], ref[step]))
        cos_min.append(min(cs))
        rel_max.append(max(rs))
        rel_mean.append(sum(rs) / len(rs))
    return {"cos_min": cos_min, "rel_err_max": rel_max, "rel_err_mean": rel_mean}


def module_outputs(
    module: Any, inputs: Sequence[dict[str, Any]], dtype: torch.dtype | None = None, label: str = "outputs"
) -> list[list[torch.Tensor]]:
    """[input][output]: ``module``'s outputs (a tensor or a tuple of them; CPU float32) on each keyword feed of
    ``inputs``; floating-point inputs cast to ``dtype`` first when given. ``label`` names the progress."""
    import torch

    from dtcompile.core.progress import progress

    def cast(v: Any) -> Any:
        if isinstance(v, dict):  # a UNet's added_cond_kwargs
            return {k: cast(t) for k, t in v.items()}
        return v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v

    out: list[list[torch.Tensor]] = []
    eval_mode(module)
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
        teacher_forced=per_step(candidate, reference),
        outputs=list(outputs),
    )


__all__ = [
    "HELDOUT_PROMPTS",
    "PSNR_IDENTICAL",
    "AccuracyReport",
    "PipelineTrace",
    "accuracy_report",
    "eval_mode",
    "module_outputs",
    "outputs_report",
    "per_step",
    "quantized_forward_ctx",
    "teacher_forced",
    "trace_pipeline",
]
