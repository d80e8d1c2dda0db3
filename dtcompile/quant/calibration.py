"""Calibration: a loaded pipeline and a ``quant:`` spec in, its component quantized in place out.

Input: a diffusers pipeline (its ``adapter.component``, e.g. the FLUX transformer), a ``QuantSpec`` and a cache
folder. Output: ``QuantResult`` — the component is now a ModelOpt fake-quant module, its calibrated state is in
``<cache_dir>/<key>/state.mto`` (``_save_state``) and reused when the key matches, so a build that changes only
later stages (export, engine) skips calibration.

Calibration runs the pipeline's own denoising loop (diffusers' scheduler, unchanged) over the calibration
prompts as ``mtq.quantize``'s forward loop, on whatever device the pipeline is on. A text encoder quantized on
its own (``components[i].quant``, ``calibrate_encoder``) is calibrated by running the encoder itself on the
same prompts, tokenized as its pipeline does; both share ``quantize_module`` (restore or calibrate, save).
The cache key is the sha256 of every input that changes the calibrated state: the resolved spec (format
fields, calibration settings, attention, exclusions), the prompt text, the component's weights, its dtype, the
calibration image size and text length (an encoder's: its token count), and the versions of dtcompile's
calibration code, ModelOpt, torch and diffusers (an encoder's: transformers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.digests import sha256_json, sha256_text
from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import ArtifactError, BuildError, DtcError, RecipeError
from dtcompile.core.files import cache_root
from dtcompile.core.versions import dist_version
from dtcompile.models.base import GenerationRequest
from dtcompile.quant import get_format
from dtcompile.recipe.quant import BUILTIN_PROMPTS, CalibSpec

if TYPE_CHECKING:
    import torch

    from dtcompile.models.base import ModelAdapter
    from dtcompile.quant import AnyQuantSpec

log = logging.getLogger("dtcompile.quantize")

#: Bump when the calibration procedure changes what it saves: part of the cache key.
CALIB_VERSION = 3  # 2: always-off classes get a non-FP4 quantizer config; 3: the state holds no unchanged weights
#: The prompt file shipped with dtcompile (``calib.prompts: builtin``).
BUILTIN_PROMPTS_FILE = Path(__file__).resolve().parents[2] / "recipes" / "calib" / "prompts.txt"


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
    frames: int | None = None,
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
    if frames is not None:  # video calibration (image keys stay as they were)
        payload["frames"] = frames
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
    frames: int | None = None,
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
        frames: video families' pixel frames per calibration run (the recipe's opt ``frames``).

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
    dtype = dtype_name(next(module.parameters()).dtype)
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
        frames=frames,
    )
    if not (Path(cache_dir) / key[:32] / "state.mto").is_file():
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
    loop = _forward_loop(pipe, adapter, spec.calib, prompts, height, width, max_sequence_length, guidance_scale, frames)
    done = quantize_module(
        module, spec, exclude, dtype, key, cache_dir, loop, label=adapter.component, quiet=_no_progress_bar(pipe)
    )
    if done.module is not module:
        setattr(pipe, adapter.component, done.module)
        module = done.module
    cache_hit, state_path, enabled, attention = done.cache_hit, done.state_path, done.enabled, done.fp8_attention
    calib_s = time.perf_counter() - t0
    log.info(
        "quantize %s: %s, %d quantizers enabled, %d fp8 attentions, %.1f s; state %s",
        adapter.component,
        "cache hit" if cache_hit else "calibrated",
        enabled,
        len(attention),
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
        fp8_attention=attention,
        enabled_quantizers=enabled,
        calib_s=calib_s,
        spec={**spec.model_dump(mode="json"), "exclude": exclude},
        format_info=fmt.manifest(spec),
    )


@dataclass
class QuantizedModule:
    """``quantize_module``'s outcome: the fake-quant module (``mto.restore`` may return a new object), where its
    calibrated state is, whether it was restored, its fp8 attentions and how many quantizers are enabled."""

    module: Any
    state_path: Path
    cache_hit: bool
    fp8_attention: list[str]
    enabled: int


def quantize_module(
    module: torch.nn.Module,
    spec: AnyQuantSpec,
    exclude: Sequence[str],
    dtype: str,
    key: str,
    cache_dir: Path,
    forward_loop: Callable[[Any], None],
    *,
    label: str,
    quiet: contextlib.AbstractContextManager[Any] | None = None,
) -> QuantizedModule:
    """Quantize ``module`` in place with ``spec``: restore the calibrated state ``<cache_dir>/<key>/state.mto``,
    or calibrate with ``forward_loop`` (ModelOpt's: it runs the model over the calibration data) and save the
    state there. Denoisers (``calibrate``) and text encoders (``calibrate_encoder``) share it; ``label`` names
    the module in logs and errors, ``quiet`` is entered around calibration (e.g. the pipeline's progress bar off).

    Raises:
        ArtifactError: the cached state cannot be restored. BuildError: calibration failed, or no quantizer is
        enabled (everything excluded).
    """
    import modelopt.torch.opt as mto

    from dtcompile.quant.export import enable_fp8_attention, quantized_forward

    state_path = Path(cache_dir) / key[:32] / "state.mto"
    fmt = get_format(spec.format)
    cache_hit = state_path.is_file()
    attention: dict[str, list[str]] = {"fp8": [], "disabled": []}
    if cache_hit:
        log.info("quantize %s: restoring calibrated %s state %s", label, spec.format, state_path)
        try:
            with _modelopt_output():
                restored = load_state(module, state_path)
        except Exception as exc:  # a truncated or foreign file: name it and the way out
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ArtifactError(
                f"cannot restore the calibrated state {state_path} ({first}); delete {state_path.parent} to "
                f"calibrate again"
            ) from exc
        module = restored
        attention = enable_fp8_attention(module)
    else:
        import modelopt.torch.quantization as mtq

        config = fmt.modelopt_config(spec, exclude, dtype)

        def loop(model: torch.nn.Module) -> None:
            # Modules are converted by now: route attention before any range is collected.
            attention.update(enable_fp8_attention(model) if spec.quantize_mha else {})
            forward_loop(model)

        before = _tensor_digests(module)
        try:
            with quantized_forward(), _modelopt_output(), quiet or contextlib.nullcontext():
                module = mtq.quantize(module, config, loop)
        except DtcError:  # our own errors already speak to the user
            raise
        except Exception as exc:  # ModelOpt raises many types; all mean "calibration failed"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
            raise BuildError(f"calibration of {label} ({spec.format}) failed: {first}") from exc
        _save_state(mto, module, state_path, key, before)
    enabled = sum(1 for _, m in module.named_modules() if type(m).__name__.endswith("TensorQuantizer") and m.is_enabled)
    if enabled == 0:
        raise BuildError(
            f"quant.format {spec.format}: no quantizer is enabled in {label} (every layer excluded?); "
            f"check quant.exclude"
        )
    return QuantizedModule(module, state_path, cache_hit, attention["fp8"], enabled)


def encoder_calibration_key(
    spec: AnyQuantSpec,
    exclude: Sequence[str],
    prompts: Sequence[str],
    component_sha256: str,
    *,
    dtype: str,
    tokens: int,
) -> str:
    """sha256 of everything that changes a text encoder's calibrated state: the format's own fields (not the
    denoising schedule, which an encoder never sees), exclusions, prompt text, weights, dtype, token count and
    the versions of dtcompile's calibration code, ModelOpt, torch and transformers."""
    payload = {
        "calib_version": CALIB_VERSION,
        "role": "text_encoder",
        "spec": {**spec.model_dump(mode="json", exclude={"calib", "accuracy"}), "exclude": list(exclude)},
        "prompts_sha256": prompts_sha256(prompts),
        "component_sha256": component_sha256,
        "dtype": dtype,
        "tokens": tokens,
        "versions": {d: dist_version(d) for d in ("nvidia-modelopt", "torch", "transformers")},
    }
    return sha256_json(payload)


def calibrate_encoder(
    module: torch.nn.Module,
    spec: AnyQuantSpec,
    exclude: Sequence[str],
    prompts: Sequence[str],
    batches: Sequence[dict[str, Any]],
    cache_dir: Path,
    *,
    component_sha256: str,
    label: str,
    record: dict[str, Any],
) -> tuple[QuantResult, torch.nn.Module]:
    """Quantize a text encoder in place (or restore its cached state): ModelOpt's forward loop runs the encoder
    itself on ``batches`` (its keyword inputs, e.g. ``input_ids`` of the tokenized ``prompts``). ``record`` is
    what the manifest's ``spec`` says about the settings (format, exclusions, prompt source). Returns the record
    and the fake-quant module, which the caller puts on the pipeline when it is a new object.

    Raises: as ``quantize_module``.
    """
    t0 = time.perf_counter()
    fmt = get_format(spec.format)
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    tokens = int(batches[0]["input_ids"].shape[-1]) if batches else 0
    key = encoder_calibration_key(
        spec, exclude, prompts, component_sha256 or module_sha256(module), dtype=dtype, tokens=tokens
    )
    if not (Path(cache_dir) / key[:32] / "state.mto").is_file():
        log.info("quantize %s: calibrating %s on %d prompts (%d tokens, %d batches)", label, spec.format,
                 len(prompts), tokens, len(batches))  # fmt: skip
    done = quantize_module(module, spec, exclude, dtype, key, cache_dir, _encoder_loop(batches, label), label=label)
    calib_s = time.perf_counter() - t0
    log.info("quantize %s: %s, %d quantizers enabled, %.1f s; state %s", label,
             "cache hit" if done.cache_hit else "calibrated", done.enabled, calib_s, done.state_path)  # fmt: skip
    result = QuantResult(
        format=spec.format,
        key=key,
        state_path=done.state_path,
        cache_hit=done.cache_hit,
        prompts_sha256=prompts_sha256(prompts),
        n_prompts=len(prompts),
        exclude=list(exclude),
        fp8_attention=done.fp8_attention,
        enabled_quantizers=done.enabled,
        calib_s=calib_s,
        spec=record,
        format_info=fmt.manifest(spec),
    )
    return result, done.module


def _encoder_loop(batches: Sequence[dict[str, Any]], label: str) -> Callable[[Any], None]:
    """ModelOpt forward loop over a text encoder: one call per batch of token ids (progress: batches)."""

    def loop(model: Any) -> None:
        import torch

        from dtcompile.core.progress import progress

        with progress(f"calibrate {label}", len(batches)) as bar, torch.no_grad():
            for feeds in batches:
                model(**feeds)
                bar.update()

    return loop


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


def _tensor_digests(module: torch.nn.Module) -> dict[str, bytes]:
    """Each state-dict tensor's digest (BLAKE2b of its bytes, read in place): what ``_save_state`` compares
    against to keep only the tensors calibration added or changed (smoothing rescales weights through
    ``.data``, which no version counter sees)."""
    import hashlib

    import torch

    out = {}
    for name, t in module.state_dict().items():
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = hashlib.blake2b(memoryview(data), digest_size=16).digest()
    return out


def _save_state(mto: Any, module: torch.nn.Module, state_path: Path, key: str, before: dict[str, bytes]) -> None:
    """The calibrated state: ModelOpt's state (``mto.modelopt_state``) and the state-dict tensors calibration
    added (quantizer ranges, low-rank branches) or changed (weights a smoothing rescaled), not the weights it
    left alone, which the component's own files hold (its digest is in the key): a FLUX.1-dev state is
    megabytes, not the 24 GB ``mto.save`` writes, and restoring it loads no second copy of the model. Written
    to a temporary file next to the target, then renamed (a reader never sees half a file)."""
    import torch

    after = _tensor_digests(module)
    tensors = {name: t for name, t in module.state_dict().items() if before.get(name) != after[name]}
    state = {"modelopt_state": mto.modelopt_state(module), "model_state_dict": tensors}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=state_path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, state_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    (state_path.parent / "key.txt").write_text(key + "\n")
    log.info("calibrated state: %d tensors, %.1f MiB (%s)", len(tensors), state_path.stat().st_size / 2**20, state_path)


def load_state(module: torch.nn.Module, state_path: Path) -> torch.nn.Module:
    """``module`` (unquantized, with its own weights) quantized as ``_save_state`` recorded: ModelOpt's state
    restored, then the saved tensors loaded over it; returns the module ModelOpt returns.

    Raises:
        ArtifactError: the file names tensors the quantized module does not have.
    """
    import modelopt.torch.opt as mto
    import torch

    # ModelOpt's own format is a pickle too; mapped, so weights a smoothing changed (int8: most of them) are
    # copied into the module one at a time instead of all read into memory first
    state = torch.load(state_path, map_location="cpu", weights_only=False, mmap=True)
    module = mto.restore_from_modelopt_state(module, state["modelopt_state"])
    result = module.load_state_dict(state["model_state_dict"], strict=False)
    if result.unexpected_keys:
        raise ArtifactError(
            f"{state_path}: names tensors the quantized module lacks ({', '.join(result.unexpected_keys[:3])})"
        )
    return module


def _forward_loop(
    pipe: Any,
    adapter: ModelAdapter,
    calib: CalibSpec,
    prompts: Sequence[str],
    height: int,
    width: int,
    max_sequence_length: int | None,
    guidance_scale: float | None,
    frames: int | None = None,
) -> Callable[[Any], None]:
    """ModelOpt forward loop: the pipeline's denoising loop over ``prompts``, ``calib.batch`` per call.

    Each call uses a generator seeded with ``calib.seed`` + batch index and stops after the collected steps
    (``calib.percentile`` of ``calib.steps``): later steps would add no ranges. Latents are never decoded.
    The step callback also drives the ``calibrate`` progress (batches x collected steps).
    """
    import torch

    from dtcompile.core.progress import progress

    collect = calib.collected_steps()
    batches = [list(prompts[i : i + calib.batch]) for i in range(0, len(prompts), calib.batch)]

    def loop(_model: Any) -> None:
        with progress(f"calibrate {adapter.component}", len(batches) * collect) as bar:

            def step_done(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                bar.update()
                if collect < calib.steps and step + 1 >= collect:
                    raise _StopDenoising
                return kwargs

            for b, batch in enumerate(batches):
                request = GenerationRequest(
                    batch,
                    calib.steps,
                    height,
                    width,
                    generator=torch.Generator("cpu").manual_seed(calib.seed + b),
                    guidance=guidance_scale,
                    text_len=max_sequence_length,
                    frames=frames,
                    output_type="latent",
                    callback=step_done,
                )
                with contextlib.suppress(_StopDenoising):
                    pipe(**adapter.call_kwargs(request))

    return loop


def quant_cache_dir() -> Path:
    """Where calibrated states are kept: ``$DTC_CACHE_DIR/quant`` or ``~/.cache/dtcompile/quant``."""
    return cache_root() / "quant"


__all__ = [
    "BUILTIN_PROMPTS_FILE",
    "CALIB_VERSION",
    "QuantResult",
    "QuantizedModule",
    "calibrate",
    "calibrate_encoder",
    "calibration_key",
    "encoder_calibration_key",
    "check_exclude",
    "load_prompts",
    "module_sha256",
    "prompts_sha256",
    "quant_cache_dir",
    "quantize_module",
    "resolve_exclude",
]
