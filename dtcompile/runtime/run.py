"""The pieces a runtime ``Session`` (``runtime/session.py``) is made of: engine selection for this machine, the
checks of the pipeline files and of a call's settings against the built profile, and the stand-in modules
that run a component's engine in its place.

The denoising loop is diffusers' own (its scheduler and pipeline code unchanged); only the engine-backed
components differ, so parity with the plain pipeline is a like-for-like comparison.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtcompile.core.errors import ArtifactError, UnsupportedError
from dtcompile.core.targets import BACKENDS, REFERENCE_BACKEND, gpu_arch
from dtcompile.manifest import EngineEntry, Manifest, ShapeRange, Verifier, artifact_path
from dtcompile.models import adapter_for
from dtcompile.runtime.engines import select_engine
from dtcompile.runtime.residency import Residency, backend_device

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


def pipeline_index(artifact_dir: Path) -> dict[str, Any]:
    """The artifact's saved ``pipeline/model_index.json`` ({} where it has none)."""
    try:
        data = json.loads(artifact_path(artifact_dir, "pipeline/model_index.json").read_text())
    except (OSError, ValueError, ArtifactError):
        return {}
    return data if isinstance(data, dict) else {}


def check_reference(
    adapter: Any, image: Any, pipeline_class: str, *, flag: str = "--image", optional: bool = False
) -> None:
    """An editing or image-to-video family needs a reference image (unless ``optional``: an artifact that also
    runs without one) and the others take none (UnsupportedError naming ``flag``)."""
    if adapter.reference_image and image is None and not optional:
        if adapter.video:  # image-to-video: the image is the first frame
            raise UnsupportedError(f"{flag}: {pipeline_class} artifacts start from an image; pass {flag} FIRST.png")
        raise UnsupportedError(f"{flag}: {pipeline_class} artifacts edit a reference image; pass {flag} REF.png")
    if not adapter.reference_image and image is not None:
        raise UnsupportedError(f"{flag}: {pipeline_class} artifacts take no reference image")


def _open_engine(
    artifact_dir: Path,
    manifest: Manifest,
    name: str,
    backend: str,
    verifier: Verifier,
    threads: int | None = None,
    residency: Residency | None = None,
) -> tuple[Any, EngineEntry]:
    """The runner of component ``name``'s engine for this machine (its files checked first) and its entry;
    with a ``residency``, the runner it hands out (opened on first call under ``sequential``, with the
    component's weight-streaming budget where it has one)."""
    from dtcompile.backends import get_backend

    centry = manifest.component(name)
    entry = select_engine(manifest, name, backend, gpu_arch())
    path = verifier.check(entry)
    for extra in centry.onnx.external_data if centry.onnx and entry.backend == REFERENCE_BACKEND else []:
        verifier.check(extra)
    if residency is None:
        return get_backend(entry.backend).open_runner(path, entry.to_json(), threads=threads), entry
    record = residency.engine_record(name, entry.to_json())
    return residency.runner(
        name,
        functools.partial(get_backend(entry.backend).open_runner, path, record, threads=threads),
        backend_device(entry.backend),
    ), entry


def engine_call(pipeline_class: str, config: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The family's ``engine_call`` bound to the denoiser's config, for its stand-in (``ComponentStandIn.call_inputs``):
    the pipeline's keyword call turned into the graph's inputs (the call itself for most families)."""
    return functools.partial(adapter_for(pipeline_class).engine_call, config=config)


def denoiser_module(
    artifact_dir: Path,
    manifest: Manifest,
    name: str,
    backend: str,
    verifier: Verifier,
    threads: int | None = None,
    residency: Residency | None = None,
) -> tuple[Any, EngineEntry]:
    """The stand-in for a denoiser (one engine for the whole component) and its engine entry."""
    import torch

    from dtcompile.backends.standin import EngineModule

    centry = manifest.component(name)
    runner, entry = _open_engine(artifact_dir, manifest, name, backend, verifier, threads, residency)
    dtype = getattr(torch, manifest.dtype)
    module = EngineModule(
        runner, centry.config or {}, centry.input_names(), centry.output_name(), dtype, getattr(runner, "device", "cpu")
    )
    module.call_inputs = engine_call(manifest.source.pipeline_class, centry.config or {})
    fixed = getattr(adapter_for(manifest.source.pipeline_class), "fixed_inputs", None)  # Cosmos' padding_mask and fps
    module.fixed_inputs = dict(fixed(centry.config or {})) if fixed is not None else {}
    return module, entry


def aux_module(
    artifact_dir: Path,
    manifest: Manifest,
    name: str,
    backend: str,
    verifier: Verifier,
    threads: int | None = None,
    residency: Residency | None = None,
) -> Any:
    """The stand-in for an engine-backed text encoder, image encoder, VAE decoder or VAE encoder
    (``AuxEntry.role``)."""
    import torch

    from dtcompile.backends.standin import STANDINS, VaeDecoderModule

    centry = manifest.aux(name)  # the caller passes manifest.aux_names()
    runner, _ = _open_engine(artifact_dir, manifest, name, backend, verifier, threads, residency)
    module = STANDINS[centry.role](
        runner,
        centry.config or {},
        centry.input_names(),
        centry.output_names(),
        getattr(torch, centry.dtype or manifest.dtype),
        getattr(runner, "device", "cpu"),
    )
    if centry.tile is not None and isinstance(module, VaeDecoderModule):  # built for tiles: larger latents tile
        from dtcompile.core.tiles import TileSpec
        from dtcompile.runtime.tiling import tiler

        module.tiler = tiler(TileSpec.from_json(centry.tile))
    if centry.role == "vae_encoder":  # a video VAE's graph takes a fixed frame count (its input's axis 2)
        dims = centry.inputs[0].dims if centry.inputs else ()
        setattr(module, "frames", dims[2] if len(dims) == 5 and isinstance(dims[2], int) else None)  # noqa: B010
    return module
