"""Run a build: a ``Plan`` in, an artifact folder (engines, ONNX, pipeline files, manifest.json) out.

``run_build`` fingerprints the source before anything loads (an unchanged artifact key is a no-op rebuild),
then runs ``dtcompile.stages.STAGES`` in order into a temp folder next to the output and moves the finished
artifact into place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import DtcError, RecipeError
from dtcompile.core.targets import REFERENCE_BACKEND
from dtcompile.stages import STAGE_NAMES, STAGES
from dtcompile.stages.plan import Plan, make_plan

if TYPE_CHECKING:
    from dtcompile.core.progress import StageStats
    from dtcompile.recipe import Recipe
    from dtcompile.stages.load import LoadedPipeline, SourceFiles

log = logging.getLogger("dtcompile")


@dataclass
class BuildReport:
    """Where the artifact went and whether anything was (re)built."""

    artifact_dir: Path
    manifest: Any
    up_to_date: bool = False


@dataclass
class BuildState:
    """What the stages hand each other during one build (each stage fills its own fields)."""

    plan: Plan
    files: SourceFiles
    key: str
    versions: dict[str, Any]
    weights_digest: str
    tmp: Path
    loras: list[Any] = field(default_factory=list)
    loaded: LoadedPipeline | None = None
    fused: Any = None  # stages.lora.FusedLoras
    quantized: dict[str, Any] = field(default_factory=dict)  # denoiser -> stages.quantize.QuantizedComponent
    quantized_aux: dict[str, Any] = field(default_factory=dict)  # text encoder -> stages.quantize.QuantizedAux
    aux_digests: dict[str, str] = field(default_factory=dict)  # further component -> sha256 of its source folder
    graphs: list[tuple[str, Any]] = field(default_factory=list)  # (component or part name, ExportedComponent)
    manifest: dict[str, Any] = field(default_factory=dict)
    stats: list[StageStats] = field(default_factory=list)

    @property
    def component(self) -> str:
        return self.files.adapter.component

    @property
    def pipeline(self) -> LoadedPipeline:
        """``loaded``, for the stages after load (which runs first: a RuntimeError here is a bug in the order)."""
        if self.loaded is None:
            raise RuntimeError("the load stage has not run")
        return self.loaded


def _existing_key(out_dir: Path) -> str | None:
    from dtcompile.manifest import read_manifest, verify_file

    try:
        manifest = read_manifest(out_dir)
        for entry in manifest.all_file_entries():
            verify_file(out_dir, entry, full=False)
    except DtcError:
        return None
    return None if manifest.stopped_after else manifest.key


def _artifact_key(plan: Plan, files: SourceFiles) -> tuple[str, str, dict[str, Any], list[Any], dict[str, str]]:
    """(artifact key, weights digest, tool versions, resolved LoRAs, each further component's folder digest)
    from files on disk; loads no weights."""
    from dtcompile.core.versions import tool_versions
    from dtcompile.manifest import artifact_key

    recipe = plan.recipe
    versions = tool_versions()
    weights_digest, loras = files.component_sha256, []
    # every further engine component's weights too: Wan2.2's second expert, engine-backed text encoders and VAE
    from dtcompile.models.components import aux_attr
    from dtcompile.stages.plan import aux_components

    folders = {d: files.folder / d for d in files.extra_denoisers()}
    folders |= {c.name: files.folder / aux_attr(c.name) for c in aux_components(recipe, files.adapter)}
    digests: dict[str, str] = {}
    if folders:
        from dtcompile.core.digests import sha256_json, sha256_tree

        digests = {n: sha256_tree(p) if p.is_dir() else "unknown" for n, p in folders.items()}
        weights_digest = sha256_json({"denoiser": weights_digest, **digests})
    if recipe.lora:  # the key covers each adapter's sha256 and scale
        from dtcompile.stages.lora import lora_key_digest, resolve_loras

        loras = resolve_loras(recipe.lora, base_dir=plan.base_dir)
        weights_digest = lora_key_digest(files.component_sha256, loras)
    if recipe.quant is not None or recipe.quantized_components():  # the calibration prompts' content, not their path
        from dtcompile.quant.calibration import load_prompts, prompts_sha256

        prompts_digest = prompts_sha256(load_prompts(recipe.calibration()[0], plan.base_dir))
        weights_digest = hashlib.sha256(f"{weights_digest}:{prompts_digest}".encode()).hexdigest()
    key = artifact_key(recipe.engine_fields(), weights_digest, versions)
    return key, weights_digest, versions, loras, digests


def _base_manifest(state: BuildState) -> dict[str, Any]:
    from dtcompile.manifest import SCHEMA_VERSION

    recipe, files = state.plan.recipe, state.files
    return {
        "schema_version": SCHEMA_VERSION,
        "name": recipe.name,
        "key": state.key,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": state.plan.recipe_path,
        "versions": state.versions,
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
        "components": {},
        "skipped": [],
    }


def run_build(
    recipe: Recipe | Plan,
    *,
    stop_after: str | None = None,
    force: bool = False,
    recipe_path: str | None = None,
) -> BuildReport:
    """Run the stages for ``recipe`` (or an already computed ``Plan``) and move the artifact to ``output.dir/name``."""
    from dtcompile.core.files import (
        check_replaceable,
        collect_stale,
        discarded_on_failure,
        make_temp_dir,
        replace_dir,
    )
    from dtcompile.manifest import Verifier, read_manifest, write_manifest
    from dtcompile.stages.load import check_denoisers, locate_source

    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise RecipeError(f"--stop-after: unknown stage '{stop_after}'; choose one of: {', '.join(STAGE_NAMES)}")
    plan = recipe if isinstance(recipe, Plan) else make_plan(recipe, recipe_path)
    out_dir = plan.out_dir
    files = locate_source(plan.recipe.model)
    check_denoisers(plan.recipe, files.denoisers)
    key, weights_digest, versions, loras, digests = _artifact_key(plan, files)
    check_replaceable(out_dir, "output.dir")  # a rebuild replaces an artifact, nothing else
    if not force and stop_after is None and _existing_key(out_dir) == key:
        log.info("artifact %s is up to date (key %s); use --force to rebuild", out_dir, key[:12])
        return BuildReport(out_dir, read_manifest(out_dir), up_to_date=True)
    for line in collect_stale(out_dir):
        log.warning("build: %s", line)
    tmp = make_temp_dir(out_dir, "tmp")
    state = BuildState(plan, files, key, versions, weights_digest, tmp, loras=loras, aux_digests=digests)
    with discarded_on_failure(tmp, out_dir):
        state.manifest = _base_manifest(state)
        _run_stages(state, stop_after)
        # targets the plan already knew could not be built (e.g. onnxruntime for an nvfp4 graph)
        state.manifest["skipped"] += [t.skipped() for t in plan.blocked() if t.backend == REFERENCE_BACKEND]
        state.manifest["stages"] = [s.to_json() for s in state.stats]
        write_manifest(tmp, state.manifest)
        replace_dir(tmp, out_dir)
    log.info("artifact: %s", out_dir)
    manifest = read_manifest(out_dir)
    Verifier(out_dir).record_written(manifest.all_file_entries())  # hashed as written: a run need not re-hash
    return BuildReport(out_dir, manifest)


def _run_stages(state: BuildState, stop_after: str | None) -> None:
    """Each stage that applies, in order, timed; ``stop_after`` marks the manifest and ends the run."""
    from dtcompile.core.progress import stage

    for st in STAGES:
        if st.applies(state.plan.recipe):
            with stage(st.name, st.detail(state)) as stats:
                stats.wrote = st.resolve()(state) or []
            state.stats.append(stats)
        if st.name == stop_after:
            if st.name != STAGE_NAMES[-1]:
                state.manifest["stopped_after"] = st.name
            return


# --- the stage steps (STAGES names them): each takes the BuildState, fills its part, returns the paths it wrote ---


def load_step(state: BuildState) -> list[str]:
    """load: the located pipeline files -> ``state.loaded``."""
    from dtcompile.stages.load import load_pipeline

    state.loaded = load_pipeline(state.files, state.plan.recipe.dtype)
    return []


def lora_step(state: BuildState) -> list[str]:
    """lora: fuse the recipe's adapters into the engine component -> ``state.fused``."""
    from dtcompile.stages.lora import fuse_lora

    state.fused = fuse_lora(state.pipeline, state.loras, state.plan.recipe.dtype)
    state.manifest["lora"] = {"adapters": state.fused.adapters}
    return []


def quantize_step(state: BuildState) -> list[str]:
    """quantize: ModelOpt PTQ on real denoising runs -> ``state.quantized`` (calibration and accuracy); then each
    text encoder with its own ``quant``, on its own -> ``state.quantized_aux``."""
    from dtcompile.stages.quantize import quantize_aux, quantize_denoisers

    plan = state.plan
    recipe = plan.recipe
    if recipe.quant is not None:
        names = list(state.files.denoisers)
        state.quantized = quantize_denoisers(state.loaded, recipe, plan.base_dir, state.weights_digest, names)
    for spec in recipe.quantized_components():  # after the denoisers: their runs see the unquantized encoders
        digest = state.aux_digests.get(spec.name, "")
        state.quantized_aux[spec.name] = quantize_aux(state.loaded, recipe, plan.base_dir, spec, digest)
    return []


def export_step(state: BuildState) -> list[str]:
    """export: ONNX graphs (one, or one per cache part) + pipeline files -> ``state.graphs`` and the manifest."""
    from dtcompile.models.components import WRAPPING_ROLES
    from dtcompile.stages.export import export_aux, export_component, export_pipeline_files
    from dtcompile.stages.plan import aux_components

    recipe, comp, manifest = state.plan.recipe, state.component, state.manifest
    attention = state.plan.attention
    if attention is None:  # make_plan resolves it for every plan it returns
        raise RuntimeError("the plan has no attention mode (not made by make_plan)")
    extra = state.files.extra_denoisers()  # Wan2.2's second expert: a graph (or parts) of its own, same shapes
    graphs: list[tuple[str, Any]] = []
    with _aux_unquantized(state):  # a denoiser's parity runs the pipeline: with the encoders it was traced with
        if recipe.cache is not None:  # each denoiser: one graph per part (prologue, block segments, epilogue)
            from dtcompile.stages.cache_split import export_split

            for name in state.files.denoisers:
                if name != comp:
                    log.info("[export] denoiser %s, split for caching ...", name)
                manifest["components"][name], parts = export_split(
                    state.pipeline, recipe, state.tmp, attention=attention, component=name
                )
                graphs += parts
        else:
            quantized = state.quantized.get(comp)
            graphs.append((comp, export_component(state.pipeline, recipe, state.tmp, quantized, attention=attention)))
            for name in extra:
                log.info("[export] denoiser %s ...", name)
                graphs.append((name, export_component(state.pipeline, recipe, state.tmp, state.quantized.get(name),
                                                      attention=attention, component=name)))  # fmt: skip
    aux = aux_components(recipe, state.pipeline.adapter)
    aux_graphs = []
    for i, spec in enumerate(aux, 1):  # text encoders and the VAE decoder, after the denoiser
        log.info("[export] component %d/%d %s ...", i, len(aux), spec.name)
        aux_graphs.append(
            (spec.name, export_aux(state.pipeline, recipe, state.tmp, spec, state.quantized_aux.get(spec.name)))
        )
    graphs += aux_graphs
    # a VAE encoder engine wraps the VAE the pipeline keeps (its decode stays torch unless vae_decoder is built)
    attrs = [*extra, *(g.manifest.get("attr", name) for name, g in aux_graphs if g.manifest.get("role") not in
                       WRAPPING_ROLES)]  # fmt: skip
    manifest["pipeline"] = (
        export_pipeline_files(state.pipeline, state.tmp, attrs) if recipe.output.include_pipeline else {}
    )
    manifest["components"].update((name, g.manifest) for name, g in graphs)
    if state.fused is not None:  # base weights of the LoRA-touched tensors, for a later `dtc refit`
        manifest["lora"] = _lora_section(state, comp, manifest["components"])
    state.graphs = graphs
    onnx_entries = [g.manifest["onnx"] for _, g in graphs]
    return [e["file"] for e in [*onnx_entries, *manifest["pipeline"].get("files", [])[:1]]]


def _aux_unquantized(state: BuildState) -> Any:
    """Every quantized text encoder computing unquantized (``quant.export.quantizers_off``), or nothing to do."""
    import contextlib

    if not state.quantized_aux:
        return contextlib.nullcontext()
    from dtcompile.models.components import aux_attr
    from dtcompile.quant.export import quantizers_off

    return quantizers_off(*(getattr(state.pipeline.pipe, aux_attr(name)) for name in state.quantized_aux))


def _lora_section(state: BuildState, main: str, components: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``lora`` section after the export: the adapters, and per denoiser they touched its LoRA
    state (``touched``, ``base_store``): the main denoiser's at the top, other experts' under ``components``."""
    from dtcompile.weights.weight_map import record_build_loras

    fused = state.fused
    section: dict[str, Any] = {"adapters": fused.adapters, "built_with": fused.adapters, "touched": []}
    for name, base in fused.bases.items():
        recorded = record_build_loras(state.tmp, name, components[name], base)
        if name == main:
            section.update(recorded)
        else:
            section.setdefault("components", {})[name] = recorded
    return section


def build_step(state: BuildState) -> list[str]:
    """build: one engine per (TensorRT backend, arch) target per graph, recorded in the manifest."""
    from dtcompile.stages import build as build_stage

    wrote: list[str] = []
    skipped = state.manifest["skipped"]
    for name, exported in state.graphs:
        outcome = build_stage.engines_from_onnx(exported.onnx_path, exported.profile, state.plan, state.tmp, name)
        wrote += [e["file"] for e in outcome.engines]
        state.manifest["components"][name]["engines"].extend(outcome.engines)
        skipped += [s for s in outcome.skipped if s not in skipped]  # parts share targets: report each once
    return wrote
