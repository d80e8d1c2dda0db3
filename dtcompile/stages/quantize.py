"""Quantize stage: a loaded pipeline and a ``quant:`` spec in, its component quantized in place out.

Input: a diffusers pipeline (its ``adapter.component``, e.g. the FLUX transformer), a ``QuantSpec`` and a cache
folder. Output: ``QuantResult`` — the component is now a ModelOpt fake-quant module, its calibrated state is in
``<cache_dir>/<key>/state.mto`` (``mto.save``) and reused when the key matches, so a build that changes only
later stages (export, engine) skips calibration.

Calibration runs the pipeline's own denoising loop (diffusers' scheduler, unchanged) over the calibration
prompts as ``mtq.quantize``'s forward loop, on whatever device the pipeline is on. The cache key is the sha256
of every input that changes the calibrated state: the resolved spec (format fields, calibration settings,
attention, exclusions), the prompt text, the component's weights, its dtype, the calibration image size and
text length, and the versions of dtcompile's calibration code, ModelOpt, torch and diffusers.

``trace_pipeline`` and ``accuracy_report`` measure a quantized component against a reference: per-step noise
prediction cosine similarity and relative error (teacher-forced: the candidate sees the reference's step
inputs, so the numbers are the model's own error, and free-running: what a user gets, errors compounding), and
the final images' PSNR. ``onnxruntime_component`` wraps an exported graph so the same report compares the
graph against the fake-quant torch model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.digests import sha256_json, sha256_text
from dtcompile.core.errors import ArtifactError, BuildError, DtcError, RecipeError, VerificationError
from dtcompile.core.files import cache_root
from dtcompile.core.metrics import PSNR_IDENTICAL, psnr
from dtcompile.core.versions import dist_version
from dtcompile.quant import get_format
from dtcompile.recipe.quant import BUILTIN_PROMPTS, CalibSpec

if TYPE_CHECKING:
    import torch

    from dtcompile.models.base import ModelAdapter
    from dtcompile.quant import AnyQuantSpec

log = logging.getLogger("dtcompile.quantize")

#: Bump when the calibration procedure changes what it saves: part of the cache key.
CALIB_VERSION = 1
#: The prompt file shipped with dtcompile (``calib.prompts: builtin``).
BUILTIN_PROMPTS_FILE = Path(__file__).resolve().parents[2] / "recipes" / "calib" / "prompts.txt"
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


# --- prompts -----------------------------------------------------------------------------------------------


def load_prompts(calib: CalibSpec, base_dir: Path | None = None) -> list[str]:
    """The first ``calib.size`` calibration prompts.

    A file has one prompt per line; blank lines and ``#`` comments are skipped. Relative paths are resolved
    against ``base_dir`` (the recipe's folder), else the working directory.

    Raises:
        RecipeError: the file is missing or holds fewer than ``size`` prompts.
    """
    if isinstance(calib.prompts, list):
        prompts = [p.strip() for p in calib.prompts]
    else:
        path = _prompt_file(calib.prompts, base_dir)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise RecipeError(f"quant.calib.prompts: cannot read {path} ({exc.strerror or exc})") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(prompts) < calib.size:
        raise RecipeError(
            f"quant.calib.size is {calib.size} but {_where(calib)} has only {len(prompts)} prompts; "
            f"set quant.calib.size to at most {len(prompts)} or add prompts"
        )
    return prompts[: calib.size]


def _prompt_file(value: str, base_dir: Path | None) -> Path:
    if value == BUILTIN_PROMPTS:
        if not BUILTIN_PROMPTS_FILE.is_file():
            raise RecipeError(
                f"quant.calib.prompts: the built-in prompt file {BUILTIN_PROMPTS_FILE} is not installed; "
                f"give a prompt file path or a list of prompts"
            )
        return BUILTIN_PROMPTS_FILE
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise RecipeError(f"quant.calib.prompts: prompt file '{value}' not found (looked at {path})")
    return path


def _where(calib: CalibSpec) -> str:
    return "the prompt list" if isinstance(calib.prompts, list) else f"'{calib.prompts}'"


# --- exclusions ----------------------------------------------------------------------------------------------


def resolve_exclude(spec: AnyQuantSpec, adapter: ModelAdapter) -> list[str]:
    """The spec's exclude patterns, or the model family's defaults when the spec leaves them unset."""
    return list(spec.exclude) if spec.exclude is not None else list(adapter.default_exclude)


def check_exclude(module: torch.nn.Module, patterns: Sequence[str]) -> None:
    """Every exclude pattern must match at least one module (a typo would silently quantize a layer).

    Raises:
        RecipeError: naming the pattern and a few real module names.
    """
    names = [n for n, _ in module.named_modules() if n]
    for i, pattern in enumerate(patterns):
        if not any(fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(names[:4])
            raise RecipeError(
                f"quant.exclude[{i}]: pattern '{pattern}' matches no module of the {type(module).__name__} "
                f"(module names look like {sample}); fix the pattern or remove it"
            )


def _check_lora_fused(module: torch.nn.Module) -> None:
    for name, sub in module.named_modules():
        if "lora" in type(sub).__module__.lower() and getattr(sub, "merged", True) is False:
            raise BuildError(
                f"'{name}' is an unfused LoRA layer; LoRAs must be fused into the weights before quantization"
            )


# --- cache key -----------------------------------------------------------------------------------------------


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), for when no file digest is known."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def calibration_key(
    spec: AnyQuantSpec,
    exclude: Sequence[str],
    prompts: Sequence[str],
    component_sha256: str,
    *,
    dtype: str,
    height: int,
    width: int,
    max_sequence_length: int | None,
    guidance_scale: float | None,
) -> str:
    """sha256 of everything that changes the calibrated state (see the module docstring)."""
    payload = {
        "calib_version": CALIB_VERSION,
        "spec": {**spec.model_dump(mode="json"), "exclude": list(exclude)},
        "prompts_sha256": prompts_sha256(prompts),
        "component_sha256": component_sha256,
        "dtype": dtype,
        "height": height,
        "width": width,
        "max_sequence_length": max_sequence_length,
        "guidance_scale": guidance_scale,
        "versions": {d: dist_version(d) for d in ("nvidia-modelopt", "torch", "diffusers")},
    }
    return sha256_json(payload)


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the prompts, one per line (the calibration-data hash recorded in the manifest)."""
    return sha256_text("\n".join(prompts))


# --- calibration -------------------------------------------------------------------------------------------------


@dataclass
class QuantResult:
    """A component quantized in place, and where its calibrated state is kept."""

    format: str
    key: str
    state_path: Path
    cache_hit: bool
    prompts_sha256: str
    n_prompts: int
    exclude: list[str]
    fp8_attention: list[str]
    enabled_quantizers: int
    calib_s: float
    spec: dict[str, Any] = field(default_factory=dict)
    format_info: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        """JSON for the manifest: the resolved spec, calibration-data hash, key and what was quantized."""
        return {
            **self.format_info,
            "spec": self.spec,
            "exclude": self.exclude,
            "calib": {"prompts_sha256": self.prompts_sha256, "n_prompts": self.n_prompts, "key": self.key},
            "fp8_attention": len(self.fp8_attention),
            "enabled_quantizers": self.enabled_quantizers,
            "cache_hit": self.cache_hit,
        }


class _StopDenoising(Exception):
    """Raised from the step callback once the collected steps are done (the rest would add nothing)."""


def calibrate(
    pipe: Any,
    adapter: ModelAdapter,
    spec: AnyQuantSpec,
    cache_dir: Path,
    *,
    height: int,
    width: int,
    max_sequence_length: int | None = None,
    guidance_scale: float | None = None,
    component_sha256: str | None = None,
    base_dir: Path | None = None,
) -> QuantResult:
    """Quantize ``pipe``'s component in place: restore its calibrated state from the cache, or calibrate it.

    Args:
        pipe: the diffusers pipeline; its component ``adapter.component`` is quantized in place.
        adapter: the model family (component name, default exclusions).
        spec: the recipe's ``quant`` section.
        cache_dir: where calibrated states are kept (``<cache_dir>/<key>/state.mto``).
        height, width: calibration image size in pixels (the recipe's opt shape).
        max_sequence_length: text length passed to the pipeline (the recipe's opt ``text_len``).
        guidance_scale: passed to the pipeline when set (else its default).
        component_sha256: digest of the component's weights (else hashed from its state dict).
        base_dir: folder relative prompt paths are resolved against (the recipe's folder).

    Raises:
        RecipeError: prompts or exclude patterns are wrong. UnsupportedError: the spec cannot quantize this
        component (e.g. SVDQuant rank too large). BuildError: calibration failed.
    """
    t0 = time.perf_counter()
    module = getattr(pipe, adapter.component)
    fmt = get_format(spec.format)
    exclude = resolve_exclude(spec, adapter)
    if spec.exclude is not None:  # the family's defaults may name modules a variant lacks
        check_exclude(module, exclude)
    _check_lora_fused(module)
    fmt.check_module(spec, module, exclude)
    prompts = load_prompts(spec.calib, base_dir)
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    key = calibration_key(
        spec,
        exclude,
        prompts,
        component_sha256 or module_sha256(module),
        dtype=dtype,
        height=height,
        width=width,
        max_sequence_length=max_sequence_length,
        guidance_scale=guidance_scale,
    )
    state_path = Path(cache_dir) / key[:32] / "state.mto"
    import modelopt.torch.opt as mto

    from dtcompile.quant.export import enable_fp8_attention, quantized_forward

    cache_hit = state_path.is_file()
    attention: dict[str, list[str]] = {"fp8": [], "disabled": []}
    if cache_hit:
        log.info("quantize %s: restoring calibrated %s state %s", adapter.component, spec.format, state_path)
        try:
            with _modelopt_output():
                restored = mto.restore(module, str(state_path))
        except Exception as exc:  # a truncated or foreign file: name it and the way out
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ArtifactError(
                f"cannot restore the calibrated state {state_path} ({first}); delete {state_path.parent} to "
                f"calibrate again"
            ) from exc
        if restored is not module:
            setattr(pipe, adapter.component, restored)
            module = restored
        attention = enable_fp8_attention(module)
    else:
        import modelopt.torch.quantization as mtq

        config = fmt.modelopt_config(spec, exclude, dtype)
        loop = _forward_loop(pipe, spec.calib, prompts, height, width, max_sequence_length, guidance_scale)

        def forward_loop(model: torch.nn.Module) -> None:
            # Modules are converted by now: route attention before any range is collected.
            attention.update(enable_fp8_attention(model) if spec.quantize_mha else {})
            loop(model)

        log.info(
            "quantize %s: calibrating %s on %d prompts (batch %d, %d steps, ranges from %d) at %dx%d on %s",
            adapter.component,
            spec.format,
            len(prompts),
            spec.calib.batch,
            spec.calib.steps,
            spec.calib.collected_steps(),
            height,
            width,
            next(module.parameters()).device,
        )
        try:
            with quantized_forward(), _modelopt_output(), _no_progress_bar(pipe):
                quantized = mtq.quantize(module, config, forward_loop)
        except DtcError:  # our own errors already speak to the user
            raise
        except Exception as exc:  # ModelOpt raises many types; all mean "calibration failed"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
            raise BuildError(f"calibration of {adapter.component} ({spec.format}) failed: {first}") from exc
        if quantized is not module:
            setattr(pipe, adapter.component, quantized)
            module = quantized
        _save_state(mto, module, state_path, key)
    enabled = sum(1 for _, m in module.named_modules() if type(m).__name__.endswith("TensorQuantizer") and m.is_enabled)
    if enabled == 0:
        raise BuildError(
            f"quant.format {spec.format}: no quantizer is enabled in {adapter.component} (every layer excluded?); "
            f"check quant.exclude"
        )
    calib_s = time.perf_counter() - t0
    log.info(
        "quantize %s: %s, %d quantizers enabled, %d fp8 attentions, %.1f s; state %s",
        adapter.component,
        "cache hit" if cache_hit else "calibrated",
        enabled,
        len(attention["fp8"]),
        calib_s,
        state_path,
    )
    return QuantResult(
        format=spec.format,
        key=key,
        state_path=state_path,
        cache_hit=cache_hit,
        prompts_sha256=prompts_sha256(prompts),
        n_prompts=len(prompts),
        exclude=exclude,
        fp8_attention=attention["fp8"],
        enabled_quantizers=enabled,
        calib_s=calib_s,
        spec={**spec.model_dump(mode="json"), "exclude": exclude},
        format_info=fmt.manifest(spec),
    )


@contextlib.contextmanager
def _modelopt_output() -> Iterator[None]:
    """ModelOpt prints progress to stdout ("Inserted 192 quantizers", "SVD <layer>"): send it to the debug log."""
    import io

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            log.debug("modelopt: %s", line)


@contextlib.contextmanager
def _no_progress_bar(pipe: Any) -> Iterator[None]:
    """Silence the pipeline's per-call progress bar for the duration (its settings are restored after)."""
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = saved


def _save_state(mto: Any, module: torch.nn.Module, state_path: Path, key: str) -> None:
    """``mto.save`` into a temporary file next to the target, then rename (a reader never sees half a file)."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=state_path.parent)
    os.close(fd)
    try:
        mto.save(module, tmp)
        os.replace(tmp, state_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    (state_path.parent / "key.txt").write_text(key + "\n")


def _forward_loop(
    pipe: Any,
    calib: CalibSpec,
    prompts: Sequence[str],
    height: int,
    width: int,
    max_sequence_length: int | None,
    guidance_scale: float | None,
) -> Callable[[Any], None]:
    """ModelOpt forward loop: the pipeline's denoising loop over ``prompts``, ``calib.batch`` per call.

    Each call uses a generator seeded with ``calib.seed`` + batch index and stops after the collected steps
    (``calib.percentile`` of ``calib.steps``): later steps would add no ranges. Latents are never decoded.
    """
    import torch

    collect = calib.collected_steps()
    batches = [list(prompts[i : i + calib.batch]) for i in range(0, len(prompts), calib.batch)]

    def stop_after_collected(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if step + 1 >= collect:
            raise _StopDenoising
        return kwargs

    def loop(_model: Any) -> None:
        for b, batch in enumerate(batches):
            kwargs: dict[str, Any] = {
                "prompt": batch,
                "height": height,
                "width": width,
                "num_inference_steps": calib.steps,
                "generator": torch.Generator("cpu").manual_seed(calib.seed + b),
                "output_type": "latent",
            }
            if max_sequence_length is not None:
                kwargs["max_sequence_length"] = max_sequence_length
            if guidance_scale is not None:
                kwargs["guidance_scale"] = guidance_scale
            if collect < calib.steps:
                kwargs["callback_on_step_end"] = stop_after_collected
            with contextlib.suppress(_StopDenoising):
                pipe(**kwargs)

    return loop


def restore_quantized(module: torch.nn.Module, state_path: Path) -> torch.nn.Module:
    """Load a calibrated state saved by ``calibrate`` into an unquantized copy of the same component.

    Returns the quantized module (ModelOpt converts in place; use the returned object).
    """
    import modelopt.torch.opt as mto

    from dtcompile.quant.export import enable_fp8_attention

    module = mto.restore(module, str(state_path))
    enable_fp8_attention(module)
    return module


# --- accuracy ----------------------------------------------------------------------------------------------------


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
) -> PipelineTrace:
    """Run the pipeline once per prompt (generator seeded ``seed`` + index) and record every step.

    ``component`` stands in for the pipeline's own component during the run (e.g. an onnxruntime module).
    """
    import torch

    name = adapter.component
    inputs: list[list[dict[str, Any]]] = []
    noise: list[list[Any]] = []
    images: list[Any] = []
    with _swap_component(pipe, name, component), quantized_forward_ctx(), _no_progress_bar(pipe):
        module = getattr(pipe, name)
        for i, prompt in enumerate(prompts):
            recorder = _StepRecorder()
            handle = module.register_forward_hook(recorder, with_kwargs=True)
            try:
                kwargs: dict[str, Any] = {
                    "prompt": prompt,
                    "height": height,
                    "width": width,
                    "num_inference_steps": steps,
                    "generator": torch.Generator("cpu").manual_seed(seed + i),
                    "output_type": "pt",
                }
                if max_sequence_length is not None:
                    kwargs["max_sequence_length"] = max_sequence_length
                if guidance_scale is not None:
                    kwargs["guidance_scale"] = guidance_scale
                image = pipe(**kwargs).images[0]
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
    cosine similarity and relative L2 error; per prompt: final-image PSNR (dB)."""

    candidate: str
    reference: str
    prompts: int
    steps: int
    teacher_forced: dict[str, list[float]]
    free_running: dict[str, list[float]]
    psnr_db: list[float]

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

        return {
            "candidate": self.candidate,
            "reference": self.reference,
            "prompts": self.prompts,
            "steps": self.steps,
            "teacher_forced": {k: r(v) for k, v in self.teacher_forced.items()},
            "free_running": {k: r(v) for k, v in self.free_running.items()},
            "psnr_db": r(self.psnr_db),
            "summary": {
                "min_cos": float(f"{self.min_cos:.6g}"),
                "max_rel_err": float(f"{self.max_rel_err:.6g}"),
                "min_psnr_db": float(f"{min(self.psnr_db):.6g}"),
                "mean_psnr_db": float(f"{sum(self.psnr_db) / len(self.psnr_db):.6g}"),
            },
        }


def accuracy_report(
    pipe: Any,
    adapter: ModelAdapter,
    reference: PipelineTrace,
    *,
    component: Any = None,
    candidate: str = "quantized",
    reference_name: str = "unquantized",
) -> tuple[AccuracyReport, PipelineTrace]:
    """Compare ``component`` (default: the pipeline's own component now) against ``reference``.

    Teacher-forced: the candidate is called on each recorded step input of the reference. Free-running: the
    pipeline is run again with the candidate, same prompts and seeds. Returns the report and the candidate's
    own trace (a reference for the next comparison, e.g. onnxruntime against this fake-quant model).
    """
    import torch

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
    )
    module = component if component is not None else getattr(pipe, adapter.component)
    forced: list[list[Any]] = []
    with torch.no_grad(), quantized_forward_ctx():
        for per_prompt in reference.inputs:
            outs = []
            for kwargs in per_prompt:
                out = module(**kwargs, return_dict=False)[0]
                outs.append(out.detach().float().cpu())
            forced.append(outs)
    report = AccuracyReport(
        candidate=candidate,
        reference=reference_name,
        prompts=len(reference.prompts),
        steps=s["steps"],
        teacher_forced=_per_step(forced, reference.noise),
        free_running=_per_step(trace.noise, reference.noise),
        psnr_db=[psnr(a, b, cap=PSNR_IDENTICAL) for a, b in zip(trace.images, reference.images, strict=True)],
    )
    log.info(
        "accuracy %s vs %s: teacher-forced min cos %.6f, max rel err %.3g; PSNR min %.1f dB",
        candidate,
        reference_name,
        report.min_cos,
        report.max_rel_err,
        min(report.psnr_db),
    )
    return report, trace


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


def onnxruntime_component(onnx_path: Path, module: torch.nn.Module, output_name: str = "latent") -> Any:
    """A stand-in for ``module`` that runs ``onnx_path`` in onnxruntime (basic graph optimizations only:
    the int8 fusions of higher levels change the numbers)."""
    from dtcompile.backends.onnxruntime import OrtRunner
    from dtcompile.backends.standin import EngineModule

    runner = OrtRunner(Path(onnx_path), optimization="basic")
    param = next(module.parameters())
    return EngineModule(runner, dict(module.config), runner.input_names, output_name, param.dtype, str(param.device))


#: Smallest parity tolerance per dtype: onnxruntime and torch differ this much on unquantized 16-bit graphs.
DTYPE_PARITY_FLOOR = {"float32": 0.0, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class ParityResult:
    """(b): the exported graph in onnxruntime against the fake-quant torch model, or why it was skipped."""

    report: AccuracyReport | None
    tolerance: float
    graph: str  # "exported" | "exported, TensorRT FP4 ops emulated by standard ops" | ""
    skipped: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        """JSON for the manifest."""
        out: dict[str, Any] = {"tolerance": self.tolerance, "graph": self.graph}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.report is not None:
            out.update(self.report.to_manifest())
        return out


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

    ``quantized_trace`` is the fake-quant torch run (the second value ``accuracy_report`` returns). Graphs with
    TensorRT's FP4 custom ops are checked on a temporary copy where those ops are replaced by standard ops
    computing the same NVFP4 definition (``qdq.fp4_reference_graph``), and bfloat16 graphs on a float32 copy
    (``qdq.bfloat16_as_float32``: onnxruntime has no bfloat16 CPU kernels); the shipped graph is unchanged.

    Raises:
        VerificationError: the worst teacher-forced step error exceeds the format's tolerance (raised by
            ``check_parity``, naming the step, the error and the tolerance).
    """
    import onnx

    from dtcompile.quant.qdq import bfloat16_as_float32, fp4_reference_graph

    module = getattr(pipe, adapter.component)
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    limit = parity_tolerance(quant_format, dtype, tolerance)
    header = onnx.load(str(onnx_path), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in header.graph.node if n.domain not in ("", "ai.onnx")})
    del header
    with tempfile.TemporaryDirectory(prefix=".dtc-parity-") as scratch:
        path, notes = Path(onnx_path), []
        if custom or dtype == "bfloat16":
            model = onnx.load(str(onnx_path))
            if custom:
                model = fp4_reference_graph(model)
                notes.append(f"{', '.join(custom)} emulated by standard ops")
            if dtype == "bfloat16":
                model = bfloat16_as_float32(model)
                notes.append("bfloat16 computed in float32 (onnxruntime has no bfloat16 CPU kernels)")
            path = Path(scratch) / "reference.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="reference.onnx.data")
            del model
        graph = ", ".join(["exported", *notes])
        component = onnxruntime_component(path, module)
        report, _ = accuracy_report(
            pipe,
            adapter,
            quantized_trace,
            component=component,
            candidate="onnxruntime",
            reference_name="fake-quant torch",
        )
        del component
    check_parity(report, quant_format, limit)
    return ParityResult(report, limit, graph)


def parity_tolerance(quant_format: str, dtype: str, tolerance: float | None = None) -> float:
    """The format's tolerance (or ``tolerance``), never below what the dtype alone costs."""
    limit = get_format(quant_format).parity_tolerance if tolerance is None else tolerance
    return max(limit, DTYPE_PARITY_FLOOR.get(dtype, 0.0))


def check_parity(report: AccuracyReport, quant_format: str, tolerance: float) -> None:
    """Fail when the exported graph strays from the fake-quant model by more than ``tolerance``.

    Raises:
        VerificationError: naming the worst step, its error, the tolerance and what to do.
    """
    errors = report.teacher_forced["rel_err_max"]
    worst = max(range(len(errors)), key=lambda i: (math.isnan(errors[i]), errors[i]))
    err = errors[worst]
    if not err <= tolerance:  # also catches NaN
        raise VerificationError(
            f"quant.format {quant_format}: the exported graph in {report.candidate} differs from the fake-quant "
            f"torch model by a relative error of {err:.3g} at step {worst}, over the tolerance {tolerance:g}; "
            f"the export is wrong, not the quantization: rebuild with --debug and report it"
        )


__all__ = [
    "BUILTIN_PROMPTS_FILE",
    "CALIB_VERSION",
    "HELDOUT_PROMPTS",
    "AccuracyReport",
    "ParityResult",
    "PipelineTrace",
    "QuantResult",
    "accuracy_report",
    "calibrate",
    "calibration_key",
    "check_exclude",
    "check_parity",
    "load_prompts",
    "onnxruntime_component",
    "parity_report",
    "parity_tolerance",
    "prompts_sha256",
    "resolve_exclude",
    "restore_quantized",
    "trace_pipeline",
]


# --- the stage as run_build calls it ------------------------------------------------------------------------


@dataclass
class QuantizedComponent:
    """The quantize stage's output: calibration record, held-out accuracy (a) and the fake-quant trace."""

    result: QuantResult
    accuracy: AccuracyReport
    trace: PipelineTrace  # the fake-quant run; the exported graph is checked against it (parity b)

    def to_manifest(self) -> dict[str, Any]:
        return {**self.result.to_manifest(), "accuracy": self.accuracy.to_manifest()}


def quant_cache_dir() -> Path:
    """Where calibrated states are kept: ``$DTC_CACHE_DIR/quant`` or ``~/.cache/dtcompile/quant``."""
    return cache_root() / "quant"


def quantize_component(loaded: Any, recipe: Any, base_dir: Path | None, weights_sha256: str) -> QuantizedComponent:
    """Trace the unquantized model on held-out prompts, calibrate (or restore), then measure accuracy (a)."""
    spec, shapes = recipe.quant, recipe.export.shapes
    size = {"height": shapes.height.opt, "width": shapes.width.opt, "max_sequence_length": shapes.text_len.opt}
    reference = trace_pipeline(
        loaded.pipe,
        loaded.adapter,
        HELDOUT_PROMPTS[: spec.accuracy.prompts],
        steps=spec.accuracy.steps,
        seed=spec.calib.seed,
        **size,
    )
    result = calibrate(
        loaded.pipe,
        loaded.adapter,
        spec,
        quant_cache_dir(),
        component_sha256=weights_sha256,
        base_dir=base_dir,
        **size,
    )
    accuracy, trace = accuracy_report(loaded.pipe, loaded.adapter, reference)
    log.info(
        "quantized %s (%s): held-out min cosine %.6f, max rel err %.2e vs unquantized",
        loaded.adapter.component,
        spec.format,
        accuracy.min_cos,
        accuracy.max_rel_err,
    )
    return QuantizedComponent(result, accuracy, trace)
