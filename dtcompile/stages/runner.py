"""Run a build: a ``Plan`` in, an artifact folder (engines, ONNX, pipeline files, manifest.json) out.

``run_build`` fingerprints the source before anything loads (an unchanged artifact key is a no-op rebuild),
then runs ``dtcompile.stages.STAGES`` in order into a temp folder next to the output and moves the finished
artifact into place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import DtcError, RecipeError
from dtcompile.stages.plan import Plan, make_plan
from dtcompile.stages.steps import STAGE_NAMES, STAGES, BuildState, manifest_of

if TYPE_CHECKING:
    from dtcompile.manifest import Manifest
    from dtcompile.recipe import Recipe
    from dtcompile.stages.load import SourceFiles
    from dtcompile.stages.lora import ResolvedLora

log = logging.getLogger("dtcompile")


@dataclass(frozen=True)
class BuildReport:
    """Where the artifact went and whether anything was (re)built."""

    artifact_dir: Path
    manifest: Manifest
    up_to_date: bool = False


def _existing_key(out_dir: Path) -> str | None:
    from dtcompile.manifest import read_manifest, verify_file

    try:
        manifest = read_manifest(out_dir)
        for entry in manifest.all_file_entries():
            verify_file(out_dir, entry, full=False)
    except DtcError:
        return None
    return None if manifest.stopped_after else manifest.key


def _artifact_key(
    plan: Plan, files: SourceFiles
) -> tuple[str, str, dict[str, Any], tuple[ResolvedLora, ...], dict[str, str]]:
    """(artifact key, weights digest, tool versions, the plan's LoRAs with hub ids fetched, each further
    component's folder digest) from files on disk; loads no weights."""
    from dtcompile.core.versions import tool_versions
    from dtcompile.manifest import artifact_key

    recipe = plan.recipe
    versions = tool_versions()
    weights_digest, loras = files.component_sha256, plan.loras
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
        from dtcompile.stages.lora import fetch_loras, lora_key_digest

        loras = fetch_loras(plan.loras)
        weights_digest = lora_key_digest(files.component_sha256, loras)
    if recipe.quant is not None or recipe.quantized_components():  # the calibration prompts' content, not their path
        from dtcompile.quant.calibration import load_prompts, prompts_sha256

        prompts_digest = prompts_sha256(load_prompts(recipe.calibration()[0], plan.base_dir))
        weights_digest = hashlib.sha256(f"{weights_digest}:{prompts_digest}".encode()).hexdigest()
    key = artifact_key(recipe.engine_fields(), weights_digest, versions)
    return key, weights_digest, versions, loras, digests


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
    from dtcompile.stages.load import locate_files

    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise RecipeError(f"--stop-after: unknown stage '{stop_after}'; choose one of: {', '.join(STAGE_NAMES)}")
    plan = recipe if isinstance(recipe, Plan) else make_plan(recipe, recipe_path)
    out_dir = plan.out_dir
    files = locate_files(plan.recipe, plan.source)
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
        state, stopped_after = _run_stages(state, stop_after)
        write_manifest(tmp, manifest_of(state, stopped_after))
        replace_dir(tmp, out_dir)
    log.info("artifact: %s", out_dir)
    manifest = read_manifest(out_dir)
    Verifier(out_dir).record_written(manifest.all_file_entries())  # hashed as written: a run need not re-hash
    return BuildReport(out_dir, manifest)


def _run_stages(state: BuildState, stop_after: str | None) -> tuple[BuildState, str | None]:
    """Each stage that applies, in order, timed: the state with every product made, and the stage the build
    stopped after (None: it ran to the end)."""
    from dtcompile.core.progress import stage

    for st in STAGES:
        if st.applies(state.plan.recipe):
            with stage(st.name, st.detail(state)) as stats:
                state, stats.wrote = st.step(state)
            state = replace(state, stats=(*state.stats, stats))
        if st.name == stop_after:
            return state, (st.name if st.name != STAGE_NAMES[-1] else None)
    return state, None
