"""Stage `load`: ModelSpec -> LoadedPipeline (a diffusers pipeline, its source folder and weights hash).

Built-ins, local folders and hub ids all go through the same ``DiffusionPipeline.from_pretrained`` path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.dtypes import torch_dtype
from dtcompile.core.errors import DtcError, MissingDependencyError, RecipeError, UnsupportedError
from dtcompile.recipe import ModelSpec

if TYPE_CHECKING:
    from dtcompile.models.base import ModelAdapter

log = logging.getLogger("dtcompile.load")


@dataclass(frozen=True)
class ResolvedSource:
    """Where a pipeline's files are: a local folder, or a hub id to download."""

    spec: ModelSpec
    local_dir: Path | None  # None for a hub id not yet resolved
    kind: str  # "builtin" | "local" | "hub"

    @property
    def builtin_name(self) -> str | None:
        return self.spec.source.removeprefix("builtin:") if self.kind == "builtin" else None

    @property
    def adapter(self) -> ModelAdapter | None:
        """The family adapter, known without loading weights (None: a hub model not downloaded yet)."""
        from dtcompile.models import ADAPTERS, adapter_for_pipeline_class

        if self.spec.pipeline is not None:  # the recipe names the class to load the source as
            return ADAPTERS.get(adapter_for_pipeline_class(self.spec.pipeline))()
        if (name := self.builtin_name) is not None:  # a builtin source
            from dtcompile.models.builtin import builtin

            return ADAPTERS.get(builtin(name).family)()
        if self.local_dir is not None:
            return ADAPTERS.get(adapter_for_pipeline_class(pipeline_class_of(self.local_dir)))()
        index = cached_hub_file(self.spec, "model_index.json")  # a hub model already downloaded
        if index is not None:
            return ADAPTERS.get(adapter_for_pipeline_class(pipeline_class_of(index.parent)))()
        return None

    @property
    def denoisers(self) -> tuple[str, ...] | None:
        """The denoiser components, the adapter's first (Wan2.2: both experts), known without loading weights
        (None: a hub model not downloaded yet)."""
        adapter = self.adapter
        if adapter is None:
            return None
        if (name := self.builtin_name) is not None:  # a builtin source
            from dtcompile.models.builtin import builtin

            return builtin(name).denoisers or (adapter.component,)
        index = (
            self.local_dir / "model_index.json" if self.local_dir else cached_hub_file(self.spec, "model_index.json")
        )
        return tuple(adapter.denoisers(model_index(index.parent))) if index is not None else None


def cached_hub_file(spec: ModelSpec, filename: str) -> Path | None:
    """A file of a hub model from the local Hugging Face cache, or None (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(spec.source, filename, revision=spec.revision)
    return Path(cached) if isinstance(cached, str) else None


@dataclass(frozen=True)
class LoadedPipeline:
    """A loaded diffusers pipeline and what the later stages need to know about it."""

    pipe: Any
    source_dir: Path
    source_kind: str
    pipeline_class: str
    adapter: ModelAdapter
    component_sha256: str  # digest of the engine component's files (weights + config)
    pipe_config: dict[str, Any]


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or Path(source).exists()


def resolve_source(spec: ModelSpec) -> ResolvedSource:
    """Classify ``model.source`` without loading weights; local folders must exist and be pipelines."""
    source = spec.source
    if source.startswith("builtin:"):
        from dtcompile.models.builtin import builtins

        name = source.removeprefix("builtin:")
        known = builtins()
        if name not in known:
            raise RecipeError(
                f"model.source: unknown built-in '{name}'; choose one of: " + ", ".join(f"builtin:{n}" for n in known)
            )
        return ResolvedSource(spec, None, "builtin")
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise RecipeError(f"model.source: local model folder '{source}' does not exist")
        if not (path / "model_index.json").is_file():
            raise RecipeError(f"model.source: '{source}' is not a diffusers pipeline folder (no model_index.json)")
        return ResolvedSource(spec, path.resolve(), "local")
    return ResolvedSource(spec, None, "hub")


def _hub_dir(spec: ModelSpec) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingDependencyError("huggingface_hub", "torch") from None
    try:
        return Path(snapshot_download(spec.source, revision=spec.revision))
    except Exception as exc:  # the hub raises many types (offline, 401, 404, DNS)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DtcError(
            f"model.source: cannot fetch '{spec.source}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{reason}); download it where the hub is reachable and set model.source to that folder"
        ) from None


def source_dir(resolved: ResolvedSource) -> Path:
    """A local folder with the pipeline's files (generating built-ins, downloading hub ids)."""
    if resolved.kind == "builtin":
        from dtcompile.models.builtin import builtin_model_path

        return builtin_model_path(resolved.spec.source.removeprefix("builtin:"))
    if resolved.kind == "hub":
        return _hub_dir(resolved.spec)
    assert resolved.local_dir is not None
    return resolved.local_dir


def aux_module(loaded: LoadedPipeline, recipe: Any, spec: Any) -> tuple[Any, Any, str]:
    """(graph, module, dtype name) of the text encoder or VAE decoder ``spec`` (a ``ComponentSpec``) names: its
    ``ModelAdapter.aux_graph`` and the pipeline's module cast to the component's dtype (``spec.dtype`` or the
    recipe's), in place: the saved pipeline leaves an engine-backed module out, and a quantized one is
    calibrated in the dtype it is exported in."""
    dtype = spec.dtype or recipe.dtype
    graph = loaded.adapter.aux_graph(spec.name, loaded.pipe_config)
    if getattr(spec, "tile", None) is not None:  # a tiled VAE decoder (the schema allows tile on vae_decoder only)
        import dataclasses

        graph = dataclasses.replace(graph, tile=spec.tile)  # type: ignore[type-var]
    module = graph.module(loaded.pipe).eval()
    if module.dtype != torch_dtype(dtype):
        module.to(torch_dtype(dtype))
    return graph, module, dtype


def pipeline_class_of(folder: Path, index: dict[str, Any] | None = None) -> str:
    """The ``_class_name`` recorded in a pipeline folder's model_index.json (``index``: that file, already read)."""
    index = model_index(folder) if index is None else index
    if not isinstance(index.get("_class_name"), str):
        raise RecipeError(f"{folder / 'model_index.json'}: cannot read the pipeline class (no _class_name)")
    return index["_class_name"]


@dataclass(frozen=True)
class SourceFiles:
    """A pipeline's files located on disk and fingerprinted, before any weights load."""

    resolved: ResolvedSource
    folder: Path
    pipeline_class: str
    adapter: ModelAdapter
    component_sha256: str  # digest of the engine component's files (weights + config)
    denoisers: tuple[str, ...]  # every denoiser engine component, adapter.component first (Wan2.2: two)

    def extra_denoisers(self) -> tuple[str, ...]:
        """Denoisers besides ``adapter.component`` (Wan2.2's ``transformer_2``)."""
        return tuple(d for d in self.denoisers if d != self.adapter.component)


def model_index(folder: Path) -> dict[str, Any]:
    """A pipeline folder's model_index.json (RecipeError naming the file when unreadable)."""
    try:
        data = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{folder / 'model_index.json'}: cannot read the pipeline class ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{folder / 'model_index.json'}: not a JSON object")
    return data


def check_denoisers(recipe: Any, denoisers: tuple[str, ...]) -> None:
    """Each LoRA names one of ``denoisers`` (``lora[i].component``, default the first); quant takes each denoiser
    in turn, with every calibration step."""
    for i, spec in enumerate(recipe.lora or []):
        if spec.component is not None and spec.component not in denoisers:
            raise RecipeError(
                f"lora[{i}].component: {spec.component!r} is not a denoiser of this pipeline (it has: "
                f"{', '.join(denoisers)})"
            )
    if len(denoisers) < 2:
        return
    if recipe.quant is not None and recipe.quant.calib.percentile < 1:
        raise UnsupportedError(
            "quant.calib.percentile: with several denoisers every calibration step is needed (the later experts run "
            "only the late steps); set it to 1.0"
        )


def locate_files(recipe: Any, resolved: ResolvedSource) -> SourceFiles:
    """Find (generate, download) the files of the plan's resolved source, hash the engine component's folder and
    check the recipe's per-denoiser fields against the denoisers found; loads no weights.

    The artifact key is computed from this, so an up-to-date artifact is recognised without loading the model.
    """
    from dtcompile.core.digests import sha256_tree
    from dtcompile.models import ADAPTERS, adapter_for_pipeline_class

    folder = source_dir(resolved)
    index = model_index(folder)
    class_name = resolved.spec.pipeline or pipeline_class_of(folder, index)
    adapter = ADAPTERS.get(adapter_for_pipeline_class(class_name))()
    component_dir = folder / adapter.component
    digest = sha256_tree(component_dir) if component_dir.is_dir() else "unknown"
    denoisers = tuple(adapter.denoisers(index))
    check_denoisers(recipe, denoisers)
    return SourceFiles(resolved, folder, class_name, adapter, digest, denoisers)


def load_pipeline(files: SourceFiles, dtype: str) -> LoadedPipeline:
    """Load the located pipeline in ``dtype`` on the CPU through diffusers' ``from_pretrained``."""
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError("diffusers", "torch") from None
    pipe_cls = getattr(diffusers, files.pipeline_class)
    diffusers.utils.logging.disable_progress_bar()  # stages log their own progress and timings
    log.info("loading %s from %s (%s)", files.pipeline_class, files.folder, dtype)
    try:
        pipe = pipe_cls.from_pretrained(files.folder, dtype=torch_dtype(dtype), use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # diffusers' loaders: a missing or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RecipeError(
            f"model.source: diffusers cannot load {files.folder} as a {files.pipeline_class} with safetensors "
            f"weights ({first}); dtc reads safetensors only: convert .bin/.ckpt weights first"
        ) from None
    return LoadedPipeline(
        pipe=pipe,
        source_dir=files.folder,
        source_kind=files.resolved.kind,
        pipeline_class=files.pipeline_class,
        adapter=files.adapter,
        component_sha256=files.component_sha256,
        pipe_config=files.adapter.pipe_config(pipe),
    )
