"""Run an artifact: pick the engine for this machine, stand it in for the component, call the pipeline.

The denoising loop is diffusers' own (its scheduler and pipeline code unchanged); only the engine-backed
component differs, so parity with the plain pipeline is a like-for-like comparison.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtcompile.core.errors import ArtifactError, UnsupportedError
from dtcompile.core.targets import BACKENDS, gpu_arch
from dtcompile.manifest import EngineEntry, Manifest, ShapeRange, Verifier, artifact_path, read_manifest
from dtcompile.models import adapter_for
from dtcompile.models.base import GenerationRequest
from dtcompile.runtime.engines import select_engine

log = logging.getLogger("dtcompile.run")
BACKEND_CHOICES = ("auto", *BACKENDS)


def verify_pipeline_files(artifact_dir: Path, manifest: Manifest, verifier: Verifier) -> None:
    """Check every file of the saved pipeline against the manifest, and refuse files it does not list.

    Raises ArtifactError naming the file.
    """
    if manifest.pipeline is None:
        raise ArtifactError(f"{artifact_dir}: the manifest lists no pipeline files")
    listed = {e.file for e in manifest.pipeline.files}
    for e in manifest.pipeline.files:
        verifier.check(e)
    folder = artifact_path(artifact_dir, manifest.pipeline.dir or "pipeline")
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(artifact_dir).as_posix()
        if rel not in listed:
            raise ArtifactError(
                f"{path}: not listed in the manifest (the pipeline folder holds only what the build wrote); "
                "remove it or re-pull the artifact"
            )


def check_finite_option(name: str, value: float) -> None:
    """Refuse NaN and infinite values of option ``name`` (they run to a black image otherwise)."""
    import math

    if not math.isfinite(value):
        raise UnsupportedError(f"--{name} {value}: must be a finite number")


def check_size(shapes: dict[str, ShapeRange], height: int, width: int, batch: int = 1, *, flag: str = "--{}") -> None:
    """Refuse sizes outside the shape ranges (``Manifest.shapes``) the artifact was built for; ``flag`` formats
    the variable's name in the message (the CLI's ``--height``; the server's plain ``height``)."""
    for name, value in (("height", height), ("width", width), ("batch", batch)):
        r = shapes[name]
        if not r.min <= value <= r.max:
            raise UnsupportedError(
                f"{flag.format(name)} {value} is outside the artifact's range {r.min}..{r.max}; "
                f"rebuild with export.shapes.{name} covering it"
            )


def pipeline_config(artifact_dir: Path) -> Callable[[str], dict[str, Any] | None]:
    """``component -> config.json`` of the artifact's saved pipeline (None where it has none), each read once."""

    @functools.cache
    def config(component: str) -> dict[str, Any] | None:
        try:
            return json.loads(artifact_path(artifact_dir, f"pipeline/{component}/config.json").read_text())
        except (OSError, ValueError, ArtifactError):
            return None

    return config


def check_generation(
    manifest: Manifest,
    height: int,
    width: int,
    config: Callable[[str], dict[str, Any] | None],
    *,
    flag: str = "--{}",
) -> None:
    """Refuse a size the artifact was not built for, or one its family cannot make exactly (UnsupportedError);
    ``config`` is the artifact's ``pipeline_config``."""
    check_size(manifest.shapes, height, width, flag=flag)
    adapter_for(manifest.source.pipeline_class).check_image_size(height, width, config)


def check_frames(manifest: Manifest, frames: int | None, config: Callable[[str], dict[str, Any] | None],
                 *, flag: str = "--frames") -> None:  # fmt: skip
    """A video artifact's frame count: inside the built range and one its family makes exactly; image
    artifacts take none (UnsupportedError naming ``flag``)."""
    adapter = adapter_for(manifest.source.pipeline_class)
    if not adapter.video:
        if frames is not None:
            raise UnsupportedError(f"{flag}: {manifest.source.pipeline_class} artifacts make images, not videos")
        return
    r = manifest.shapes["frames"]
    assert frames is not None
    if not r.min <= frames <= r.max:
        raise UnsupportedError(
            f"{flag} {frames} is outside the artifact's range {r.min}..{r.max}; rebuild with export.shapes.frames "
            "covering it"
        )
    try:
        adapter.check_frames(frames, config)
    except UnsupportedError as exc:
        raise UnsupportedError(f"{flag} {str(exc).removeprefix('frames ')}") from None


def check_reference(adapter: Any, image: Any, pipeline_class: str, *, flag: str = "--image") -> None:
    """An editing family needs a reference image and the others take none (UnsupportedError naming ``flag``)."""
    if adapter.reference_image and image is None:
        raise UnsupportedError(f"{flag}: {pipeline_class} artifacts edit a reference image; pass {flag} REF.png")
    if not adapter.reference_image and image is not None:
        raise UnsupportedError(f"{flag}: {pipeline_class} artifacts take no reference image")


@dataclass
class RunResult:
    """What a run produced and how long it took."""

    image: Any
    backend: str
    arch: str
    seconds: float
    steps: int
    trace: list[Any] = field(default_factory=list)
    engine_module: Any = None
    cache_stats: dict[str, Any] | None = None  # split artifacts: block evaluations done/skipped (docs/cache.md)


def load_engine_pipeline(
    artifact_dir: Path, backend: str = "auto", *, verify: bool | str = True, cache: bool | None = None
) -> tuple[Any, Any, Manifest, EngineEntry]:
    """(pipeline, engine module, manifest, engine entry) for an artifact on this machine.

    ``verify``: how the files it loads are checked (``dtcompile.manifest.VERIFY_MODES``; True: "recorded", a
    hash only for files changed since their last check; False: "size").

    ``cache``: for artifacts split into block engines, skip cached blocks (None: yes); elsewhere must not be True.
    """
    import diffusers

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    verifier = Verifier(artifact_dir, verify)
    # cache-split artifacts also list their parts as components ("part_of" names the component they make up)
    comp = manifest.main_component()
    centry = manifest.component(comp)
    if cache and not centry.is_split:
        raise UnsupportedError(
            f"--cache on: {artifact_dir} has no block engines (its recipe has no cache section); use --cache off"
        )
    pipeline_dir = artifact_dir / "pipeline"
    run = None
    if centry.is_split and not manifest.stopped_after:
        from dtcompile.runtime.cache import CacheRun

        run = CacheRun()  # shared by the experts (Wan2.2): one step count, a cache state per expert, one report

    def denoiser(name: str) -> tuple[Any, EngineEntry]:
        if run is None or not manifest.component(name).is_split:
            return _denoiser_module(artifact_dir, manifest, name, backend, verifier)
        from dtcompile.runtime.cache import load_cached_module

        enabled = cache is not False
        return load_cached_module(
            artifact_dir, manifest, name, backend, gpu=gpu_arch(), verifier=verifier, enabled=enabled, run=run
        )

    module, entry = denoiser(comp)
    dtype, device = module.dtype, module.device
    standins = {
        manifest.component(name).attr or name: _aux_module(artifact_dir, manifest, name, backend, verifier)
        for name in manifest.aux_names()
    }
    for name in manifest.denoiser_names()[1:]:  # Wan2.2's second expert: the pipeline switches between them
        standins[name] = denoiser(name)[0]
    if not (pipeline_dir / "model_index.json").is_file():
        raise ArtifactError(
            f"{pipeline_dir}: artifact has no pipeline files (built with output.include_pipeline: false)"
        )
    verify_pipeline_files(artifact_dir, manifest, verifier)
    verifier.save()
    log.info("verified %d file(s) by sha256, %d by their record (verify=%s)", len(verifier.hashed),
             len(verifier.trusted), verifier.mode)  # fmt: skip
    pipe_cls = getattr(diffusers, manifest.source.pipeline_class)
    diffusers.utils.logging.disable_progress_bar()
    pipe = pipe_cls.from_pretrained(pipeline_dir, **{comp: module}, **standins, dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe, module, manifest, entry


def _open_engine(
    artifact_dir: Path, manifest: Manifest, name: str, backend: str, verifier: Verifier
) -> tuple[Any, EngineEntry]:
    """The runner of component ``name``'s engine for this machine (its files checked first) and its entry."""
    from dtcompile.backends import get_backend

    centry = manifest.component(name)
    entry = select_engine(manifest, name, backend, gpu_arch())
    path = verifier.check(entry)
    for extra in centry.onnx.external_data if centry.onnx and entry.backend == "onnxruntime" else []:
        verifier.check(extra)
    return get_backend(entry.backend).open_runner(path, entry.to_json()), entry


def _denoiser_module(
    artifact_dir: Path, manifest: Manifest, name: str, backend: str, verifier: Verifier
) -> tuple[Any, EngineEntry]:
    """The stand-in for a denoiser (one engine for the whole component) and its engine entry."""
    import torch

    from dtcompile.backends.standin import EngineModule

    centry = manifest.component(name)
    runner, entry = _open_engine(artifact_dir, manifest, name, backend, verifier)
    dtype = getattr(torch, manifest.dtype)
    module = EngineModule(
        runner, centry.config or {}, centry.input_names(), centry.output_name(), dtype, getattr(runner, "device", "cpu")
    )
    return module, entry


def _aux_module(artifact_dir: Path, manifest: Manifest, name: str, backend: str, verifier: Verifier) -> Any:
    """The stand-in for an engine-backed text encoder or VAE decoder (``ComponentEntry.role``)."""
    import torch

    from dtcompile.backends.standin import STANDINS

    centry = manifest.component(name)
    if centry.role is None:  # the caller passes manifest.aux_names(): components with a role
        raise ArtifactError(f"{artifact_dir}: component {name!r} has no role; it is not a text encoder or VAE decoder")
    runner, _ = _open_engine(artifact_dir, manifest, name, backend, verifier)
    return STANDINS[centry.role](
        runner,
        centry.config or {},
        centry.input_names(),
        centry.output_names(),
        getattr(torch, centry.dtype or manifest.dtype),
        getattr(runner, "device", "cpu"),
    )


def run_artifact(
    artifact_dir: Path,
    prompt: str,
    *,
    steps: int = 4,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    image: Any = None,
    frames: int | None = None,
    backend: str = "auto",
    trace: bool = False,
    verify: bool | str = True,
    cache: bool | None = None,
) -> RunResult:
    """Generate one image (or, for video artifacts, one video of ``frames`` frames: default the built opt)
    with the artifact's engines; ``trace`` keeps every step's noise prediction.

    ``cache``: skip cached blocks of a cache-split artifact (None: when it has a cache section; False: run all).
    """
    import torch

    if guidance is not None:
        check_finite_option("guidance", guidance)
    shapes = (before := read_manifest(artifact_dir)).shapes
    height = height or shapes["height"].opt
    width = width or shapes["width"].opt
    config = pipeline_config(artifact_dir)
    check_generation(before, height, width, config)
    adapter = adapter_for(before.source.pipeline_class)
    if adapter.video and frames is None:
        frames = shapes["frames"].opt
    check_frames(before, frames, config)
    if negative_prompt is not None and not adapter.negative_prompt:
        raise UnsupportedError(f"--negative-prompt: {before.source.pipeline_class} artifacts take no negative prompt")
    check_reference(adapter, image, before.source.pipeline_class)
    pipe, module, manifest, entry = load_engine_pipeline(artifact_dir, backend, verify=verify, cache=cache)
    experts = [getattr(pipe, name) for name in manifest.denoiser_names()[1:]]
    if trace:
        module.trace = []
        for expert in experts:  # Wan2.2's low-noise expert records into the same list, in call order
            expert.trace = module.trace
    if hasattr(module, "begin_run"):
        module.begin_run(steps)
    request = GenerationRequest(
        prompt,
        steps,
        height,
        width,
        generator=torch.Generator("cpu").manual_seed(seed),
        guidance=guidance,
        text_len=shapes["text_len"].opt,
        negative_prompt=negative_prompt,
        image=image,
        frames=frames,
    )
    t0 = time.perf_counter()
    out = pipe(**adapter.call_kwargs(request))
    seconds = time.perf_counter() - t0
    log.info("%d steps on %s %s in %.2fs", steps, entry.backend, entry.arch, seconds)
    stats = module.cache_stats() if hasattr(module, "cache_stats") else None
    return RunResult(
        adapter.output_media(out)[0], entry.backend, entry.arch, seconds, steps, module.trace or [], module, stats
    )
