"""The build, as an ordered list of stages: load -> export -> build.

``run_build`` runs them for a recipe into a temp folder next to the output and moves the finished artifact
into place at the end, so a failure leaves nothing half-written. ``plan`` is the dry run: it checks every
requirement that can be checked before weights load.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtcompile.errors import DtcError, RecipeError, UnsupportedError
from dtcompile.recipe import Recipe

STAGES = ("load", "export", "build")
log = logging.getLogger("dtcompile")


@dataclass
class Plan:
    """What a build will do: source kind, per-target status, and the output folder."""

    recipe: Recipe
    source_kind: str
    out_dir: Path
    targets: list[dict[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        r = self.recipe
        out = [
            f"recipe {r.name}: {r.model.source} ({self.source_kind}), dtype {r.dtype}, opset {r.export.opset}",
            f"stages: {' -> '.join(STAGES)}; output {self.out_dir}",
        ]
        for t in self.targets:
            status = "build" if not t.get("reason") else f"will NOT build: {t['reason']}"
            out.append(f"  {t['backend']:<13} {t['arch']:<7} {status}")
        return out


def plan(recipe: Recipe) -> Plan:
    """Dry run: validate source, backends, dtype and arches without loading any weights."""
    from importlib.util import find_spec

    from dtcompile.stages.build import plan_targets, target_blocker
    from dtcompile.stages.load import resolve_source

    resolved = resolve_source(recipe.model)
    backends = recipe.engine.backends
    if "onnxruntime" in backends:
        if find_spec("onnxruntime") is None:
            raise RecipeError("engine.backends: onnxruntime is not installed (pip install 'dtcompile[onnx]')")
        if recipe.dtype == "bfloat16":
            raise UnsupportedError(
                "engine.backends: onnxruntime has no CPU kernels for bfloat16 graphs; "
                "set dtype: float32 or float16, or drop onnxruntime from engine.backends"
            )
    targets = [{"backend": "onnxruntime", "arch": "any"}] if "onnxruntime" in backends else []
    for t in plan_targets(recipe.engine):
        reason = target_blocker(t, recipe.engine.refittable)
        targets.append({"backend": t.backend, "arch": t.arch, **({"reason": reason} if reason else {})})
    out_dir = Path(recipe.output.dir) / recipe.name
    return Plan(recipe, resolved.kind, out_dir, targets)


@dataclass
class BuildReport:
    """Where the artifact went and whether anything was (re)built."""

    artifact_dir: Path
    manifest: dict[str, Any]
    up_to_date: bool = False


def _existing_key(out_dir: Path) -> str | None:
    from dtcompile.artifacts.manifest import all_file_entries, read_manifest, verify_file

    try:
        manifest = read_manifest(out_dir)
        for entry in all_file_entries(manifest):
            verify_file(out_dir, entry, full=False)
    except DtcError:
        return None
    if manifest.get("stopped_after"):
        return None
    return manifest.get("key")


def run_build(
    recipe: Recipe, *, stop_after: str | None = None, force: bool = False, recipe_path: str | None = None
) -> BuildReport:
    """Run the stages for ``recipe`` and move the finished artifact to ``output.dir/name``."""
    from dtcompile.artifacts.manifest import (
        SCHEMA_VERSION,
        artifact_key,
        read_manifest,
        tool_versions,
        write_manifest,
    )
    from dtcompile.progress import stage

    if stop_after is not None and stop_after not in STAGES:
        raise RecipeError(f"--stop-after: unknown stage '{stop_after}'; choose one of: {', '.join(STAGES)}")
    the_plan = plan(recipe)
    out_dir = the_plan.out_dir
    stats = []

    with stage("load", recipe.model.source) as st:
        from dtcompile.stages.load import load_pipeline

        loaded = load_pipeline(recipe.model, recipe.dtype)
    stats.append(st)
    versions = tool_versions()
    key = artifact_key(recipe.engine_fields(), loaded.component_sha256, versions)
    if not force and stop_after is None and _existing_key(out_dir) == key:
        log.info("artifact %s is up to date (key %s); use --force to rebuild", out_dir, key[:12])
        return BuildReport(out_dir, read_manifest(out_dir), up_to_date=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp is owner-only; artifacts are shared read-only
    try:
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": recipe.name,
            "key": key,
            "recipe": recipe.model_dump(mode="json"),
            "recipe_file": recipe_path,
            "versions": versions,
            "source": {
                "model": recipe.model.source,
                "revision": recipe.model.revision,
                "kind": loaded.source_kind,
                "pipeline_class": loaded.pipeline_class,
                "component_sha256": loaded.component_sha256,
            },
            "dtype": recipe.dtype,
            "precision": recipe.dtype,
            "shapes": recipe.export.shapes.model_dump(mode="json"),
            "components": {},
            "skipped": [],
        }
        if stop_after == "load":
            manifest["stopped_after"] = "load"
        else:
            from dtcompile.stages.export import export_component, export_pipeline_files

            comp = loaded.adapter.component
            with stage("export", f"{comp} -> ONNX opset {recipe.export.opset}") as st:
                exported = export_component(loaded, recipe, tmp)
                manifest["pipeline"] = export_pipeline_files(loaded, tmp) if recipe.output.include_pipeline else {}
                st.wrote = [e["file"] for e in [exported.manifest["onnx"], *manifest["pipeline"].get("files", [])[:1]]]
            stats.append(st)
            manifest["components"][comp] = exported.manifest
            if stop_after == "export":
                manifest["stopped_after"] = "export"
            else:
                from dtcompile.stages.build import engines_from_onnx

                n_trt = sum(t["backend"] != "onnxruntime" for t in the_plan.targets)
                with stage("build", f"{n_trt} TensorRT target(s)") as st:
                    outcome = engines_from_onnx(exported.onnx_path, exported.profile, recipe.engine, tmp, comp)
                    st.wrote = [e["file"] for e in outcome.engines]
                stats.append(st)
                engines = manifest["components"][comp]["engines"]
                engines.extend(outcome.engines)
                manifest["skipped"] = outcome.skipped
        manifest["stages"] = [s.to_json() for s in stats]
        write_manifest(tmp, manifest)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("artifact: %s", out_dir)
    return BuildReport(out_dir, manifest)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with ``tmp`` (rename; the old folder is removed only after the swap)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
