"""The build's stages as typed steps: each takes the frozen ``BuildState`` and returns a new one carrying its own
frozen product (``LoadedPipeline``, ``FusedLoras``, ``Quantized``, ``Exported``, ``Built``) and the paths it wrote.

``STAGES`` lists them in order, each ``Stage`` bound to its step function; ``dtcompile.stages.runner.run_build``
calls them and assembles the manifest from the products at the end (``manifest_of``). Heavy modules are imported
inside the steps, so importing this module (``dtc build --help`` does) loads nothing heavy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.targets import REFERENCE_BACKEND

if TYPE_CHECKING:
    from dtcompile.core.progress import StageStats
    from dtcompile.recipe import Recipe
    from dtcompile.stages.export import ExportedComponent
    from dtcompile.stages.load import LoadedPipeline, SourceFiles
    from dtcompile.stages.lora import FusedLoras, ResolvedLora
    from dtcompile.stages.plan import Plan
    from dtcompile.stages.quantize import QuantizedAux, QuantizedComponent

log = logging.getLogger("dtcompile")


@dataclass(frozen=True)
class Quantized:
    """The quantize stage's product: each quantized denoiser and each text encoder quantized on its own."""

    denoisers: Mapping[str, QuantizedComponent]
    aux: Mapping[str, QuantizedAux]


@dataclass(frozen=True)
class Exported:
    """The export stage's product: the graphs to build (component or part name, graph), each component's manifest
    entry, the pipeline files' record and, when LoRAs were fused, the manifest's ``lora`` section."""

    graphs: tuple[tuple[str, ExportedComponent], ...]
    components: Mapping[str, dict[str, Any]]
    pipeline: dict[str, Any]
    lora: dict[str, Any] | None

    @property
    def wrote(self) -> list[str]:
        """The graphs and the first pipeline file, as the stage's summary lists them."""
        onnx = [g.manifest["onnx"]["file"] for _, g in self.graphs]
        return onnx + [e["file"] for e in self.pipeline.get("files", [])[:1]]


@dataclass(frozen=True)
class Built:
    """The build stage's product: the engines of each graph and the targets not built (each once)."""

    engines: Mapping[str, tuple[dict[str, Any], ...]]
    skipped: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class BuildState:
    """What the steps hand each other: the inputs ``run_build`` computed before any stage ran, then each stage's
    product once it has run (None before)."""

    plan: Plan
    files: SourceFiles
    key: str
    versions: Mapping[str, str | None]
    weights_digest: str
    tmp: Path
    loras: tuple[ResolvedLora, ...] = ()
    aux_digests: Mapping[str, str] = field(default_factory=dict)  # further component -> sha256 of its source folder
    loaded: LoadedPipeline | None = None
    fused: FusedLoras | None = None
    quantized: Quantized | None = None
    exported: Exported | None = None
    built: Built | None = None
    stats: tuple[StageStats, ...] = ()

    @property
    def component(self) -> str:
        return self.files.adapter.component

    @property
    def pipeline(self) -> LoadedPipeline:
        """``loaded``, for the stages after load (which runs first: a RuntimeError here is a bug in the order)."""
        if self.loaded is None:
            raise RuntimeError("the load stage has not run")
        return self.loaded


Step = Callable[[BuildState], tuple[BuildState, list[str]]]


# --- the steps: each takes the state, returns it with its product and the paths it wrote ----------------------


def load_step(state: BuildState) -> tuple[BuildState, list[str]]:
    """load: the located pipeline files -> ``LoadedPipeline``."""
    from dtcompile.stages.load import load_pipeline

    return replace(state, loaded=load_pipeline(state.files, state.plan.recipe.dtype)), []


def lora_step(state: BuildState) -> tuple[BuildState, list[str]]:
    """lora: fuse the recipe's adapters into their denoisers -> ``FusedLoras``."""
    from dtcompile.stages.lora import fuse_lora

    return replace(state, fused=fuse_lora(state.pipeline, list(state.loras), state.plan.recipe.dtype)), []


def quantize_step(state: BuildState) -> tuple[BuildState, list[str]]:
    """quantize: ModelOpt PTQ of the denoisers on real denoising runs (calibration and accuracy), then each text
    encoder with its own ``quant``, on its own -> ``Quantized``."""
    from dtcompile.stages.quantize import quantize_aux, quantize_denoisers

    plan = state.plan
    recipe = plan.recipe
    denoisers: dict[str, QuantizedComponent] = {}
    if recipe.quant is not None:
        names = list(state.files.denoisers)
        denoisers = quantize_denoisers(state.pipeline, recipe, plan.base_dir, state.weights_digest, names)
    aux: dict[str, QuantizedAux] = {}
    for spec in recipe.quantized_components():  # after the denoisers: their runs see the unquantized encoders
        digest = state.aux_digests.get(spec.name, "")
        aux[spec.name] = quantize_aux(state.pipeline, recipe, plan.base_dir, spec, digest)
    return replace(state, quantized=Quantized(denoisers, aux)), []


def export_step(state: BuildState) -> tuple[BuildState, list[str]]:
    """export: ONNX graphs (one per denoiser, or one per cache part; then the further components) and the pipeline
    files -> ``Exported``."""
    from dtcompile.models.components import WRAPPING_ROLES
    from dtcompile.stages.export import export_aux, export_pipeline_files
    from dtcompile.stages.plan import aux_components

    recipe = state.plan.recipe
    quantized = state.quantized or Quantized({}, {})
    components: dict[str, dict[str, Any]] = {}
    with _aux_unquantized(state, quantized):  # a denoiser's parity runs the pipeline: with the encoders it was traced
        graphs = _export_denoisers(state, quantized, components)
    aux = aux_components(recipe, state.pipeline.adapter)
    aux_graphs: list[tuple[str, ExportedComponent]] = []
    for i, spec in enumerate(aux, 1):  # text encoders and the VAE decoder, after the denoiser
        log.info("[export] component %d/%d %s ...", i, len(aux), spec.name)
        graph = export_aux(state.pipeline, recipe, state.tmp, spec, quantized.aux.get(spec.name))
        aux_graphs.append((spec.name, graph))
    graphs += aux_graphs
    # a VAE encoder engine wraps the VAE the pipeline keeps (its decode stays torch unless vae_decoder is built)
    kept = [g.manifest.get("attr", name) for name, g in aux_graphs if g.manifest.get("role") not in WRAPPING_ROLES]
    attrs = [*state.files.extra_denoisers(), *kept]
    pipeline = export_pipeline_files(state.pipeline, state.tmp, attrs) if recipe.output.include_pipeline else {}
    components.update((name, g.manifest) for name, g in graphs)
    lora = _lora_section(state, components) if state.fused is not None else None
    exported = Exported(tuple(graphs), components, pipeline, lora)
    return replace(state, exported=exported), exported.wrote


def _export_denoisers(
    state: BuildState, quantized: Quantized, components: dict[str, dict[str, Any]]
) -> list[tuple[str, ExportedComponent]]:
    """Each denoiser's graph, or with a cache section its parts (their parent entries go into ``components``)."""
    from dtcompile.stages.export import export_component

    recipe, comp = state.plan.recipe, state.component
    attention = state.plan.attention
    if attention is None:  # make_plan resolves it for every plan it returns
        raise RuntimeError("the plan has no attention mode (not made by make_plan)")
    graphs: list[tuple[str, ExportedComponent]] = []
    if recipe.cache is not None:  # each denoiser: one graph per part (prologue, block segments, epilogue)
        from dtcompile.stages.cache_split import export_split

        for name in state.files.denoisers:
            if name != comp:
                log.info("[export] denoiser %s, split for caching ...", name)
            components[name], parts = export_split(
                state.pipeline, recipe, state.tmp, attention=attention, component=name
            )
            graphs += parts
        return graphs
    for name in state.files.denoisers:  # Wan2.2's second expert: a graph of its own, same shapes
        if name != comp:
            log.info("[export] denoiser %s ...", name)
        graph = export_component(
            state.pipeline, recipe, state.tmp, quantized.denoisers.get(name), attention=attention, component=name
        )
        graphs.append((name, graph))
    return graphs


def _aux_unquantized(state: BuildState, quantized: Quantized) -> contextlib.AbstractContextManager[Any]:
    """Every quantized text encoder computing unquantized (``quant.export.quantizers_off``), or nothing to do."""
    if not quantized.aux:
        return contextlib.nullcontext()
    from dtcompile.models.components import aux_attr
    from dtcompile.quant.export import quantizers_off

    return quantizers_off(*(getattr(state.pipeline.pipe, aux_attr(name)) for name in quantized.aux))


def _lora_section(state: BuildState, components: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``lora`` section after the export: the adapters, and per denoiser they touched its LoRA
    state (``touched``, ``base_store``): the main denoiser's at the top, other experts' under ``components``."""
    from dtcompile.weights.weight_map import record_build_loras

    fused = state.fused
    if fused is None:
        raise RuntimeError("the lora stage has not run")
    section: dict[str, Any] = {"adapters": fused.adapters, "built_with": fused.adapters, "touched": []}
    for name, base in fused.bases.items():
        recorded = record_build_loras(state.tmp, name, components[name], base)
        if name == state.component:
            section.update(recorded)
        else:
            section.setdefault("components", {})[name] = recorded
    return section


def build_step(state: BuildState) -> tuple[BuildState, list[str]]:
    """build: one engine per (TensorRT backend, arch) target per graph -> ``Built``."""
    from dtcompile.stages.build import engines_from_onnx

    if state.exported is None:
        raise RuntimeError("the export stage has not run")
    engines: dict[str, tuple[dict[str, Any], ...]] = {}
    skipped: list[dict[str, str]] = []
    for name, exported in state.exported.graphs:
        outcome = engines_from_onnx(exported.onnx_path, exported.profile, state.plan, state.tmp, name)
        engines[name] = tuple(outcome.engines)
        skipped += [s for s in outcome.skipped if s not in skipped]  # parts share targets: report each once
    built = Built(engines, tuple(skipped))
    return replace(state, built=built), [e["file"] for es in engines.values() for e in es]


# --- the manifest, from the products -------------------------------------------------------------------------


def manifest_of(state: BuildState, stopped_after: str | None) -> dict[str, Any]:
    """The artifact's manifest from the build's inputs and whatever products the stages made (``write_manifest``
    validates it through ``dtcompile.manifest.Manifest`` before it is written)."""
    from dtcompile.manifest import SCHEMA_VERSION

    plan, files = state.plan, state.files
    recipe = plan.recipe
    components = {name: dict(entry) for name, entry in (state.exported.components if state.exported else {}).items()}
    skipped = []
    if state.built is not None:
        for name, engines in state.built.engines.items():
            components[name]["engines"] = [*components[name].get("engines", []), *engines]
        skipped += list(state.built.skipped)
    # targets the plan already knew could not be built (e.g. onnxruntime for an nvfp4 graph)
    skipped += [t.skipped() for t in plan.blocked() if t.backend == REFERENCE_BACKEND]
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": recipe.name,
        "key": state.key,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": plan.recipe_path,
        "versions": dict(state.versions),
        "source": {
            "model": recipe.model.source,
            "revision": recipe.model.revision,
            "kind": files.resolved.kind,
            "pipeline_class": files.pipeline_class,
            "component_sha256": files.component_sha256,
        },
        "dtype": recipe.dtype,
        "precision": recipe.dtype if recipe.quant is None else f"{recipe.quant.format} ({recipe.dtype} compute)",
        "shapes": recipe.export.shapes.model_dump(mode="json", exclude_none=True),
        "components": components,
        "skipped": skipped,
        "stages": [s.to_json() for s in state.stats],
    }
    if state.exported is not None:
        manifest["pipeline"] = state.exported.pipeline
    if state.exported is not None and state.exported.lora is not None:
        manifest["lora"] = state.exported.lora
    elif state.fused is not None:
        manifest["lora"] = {"adapters": state.fused.adapters}
    if stopped_after is not None:
        manifest["stopped_after"] = stopped_after
    return manifest


# --- the ordered list ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One build stage: its name, what it produces, its step function and when it applies."""

    name: str
    produces: str
    step: Step
    applies: Callable[[Recipe], bool] = lambda recipe: True

    def detail(self, state: BuildState) -> str:
        """The stage's one-line start message."""
        recipe = state.plan.recipe
        comp = state.component
        return {
            "load": recipe.model.source,
            "lora": f"{len(state.loras)} adapter(s) into {comp}",
            "quantize": "; ".join(
                ([f"{recipe.quant.format} on {comp}"] if recipe.quant else [])
                + [f"{c.quant} on {c.name}" for c in recipe.quantized_components()]
            ),
            "export": f"{comp} -> ONNX opset {recipe.export.opset}",
            "build": f"{len(state.plan.buildable(engines_only=True))} TensorRT target(s)",
        }.get(self.name, "")


STAGES: tuple[Stage, ...] = (
    Stage("load", "the diffusers pipeline on the CPU (LoadedPipeline)", load_step),
    Stage("lora", "LoRA adapters fused into their denoisers (FusedLoras)", lora_step, lambda r: bool(r.lora)),
    Stage(
        "quantize",
        "calibrated fake-quant denoisers or text encoders and their accuracy (Quantized)",
        quantize_step,
        lambda r: r.quant is not None or bool(r.quantized_components()),
    ),
    Stage("export", "ONNX graphs, pipeline files, parity (Exported)", export_step),
    Stage("build", "one engine per (backend, arch) target (Built)", build_step),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
