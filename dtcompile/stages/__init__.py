"""The build, as an ordered list of stages: load -> export -> build.

``run_build`` runs them for a recipe into a temp folder next to the output and moves the finished artifact
into place at the end, so a failure leaves nothing half-written. ``plan`` is the dry run: it checks every
requirement that can be checked before weights load.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtcompile.core.errors import DtcError, RecipeError, UnsupportedError
from dtcompile.recipe import Recipe

STAGES = ("load", "lora", "quantize", "export", "build")
log = logging.getLogger("dtcompile")


@dataclass
class Plan:
    """What a build will do: source kind, per-target status, and the output folder."""

    recipe: Recipe
    source_kind: str
    out_dir: Path
    targets: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # extra dry-run lines (e.g. the cache segments)

    def lines(self) -> list[str]:
        r = self.recipe
        out = [
            f"recipe {r.name}: {r.model.source} ({self.source_kind}), dtype {r.dtype}, opset {r.export.opset}",
            f"stages: {' -> '.join(STAGES)}; output {self.out_dir}",
        ]
        for t in self.targets:
            status = "build" if not t.get("reason") else f"will NOT build: {t['reason']}"
            out.append(f"  {t['backend']:<13} {t['arch']:<7} {status}")
        return out + self.notes


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
    if recipe.quant is not None:
        _plan_quant(recipe, resolved, targets)
    out_dir = Path(recipe.output.dir) / recipe.name
    notes: list[str] = []
    if recipe.cache is not None:
        notes = _plan_cache(recipe, resolved)
    if recipe.lora:  # local LoRA files must exist and be safetensors (hub ids are fetched at build)
        from dtcompile.stages.lora import resolve_loras

        for r in resolve_loras(recipe.lora, download=False):
            notes.append(f"lora: {r.path if r.sha256 else r.source} (scale {r.scale:g})")
    from dtcompile.attention import resolve_attention

    # export.attention per buildable (backend, arch): an explicit mode a target cannot take raises here
    buildable = [(t["backend"], t["arch"]) for t in targets if not t.get("reason")]
    notes.append(resolve_attention(recipe, buildable).line())
    return Plan(recipe, resolved.kind, out_dir, targets, notes)


def _plan_quant(recipe: Recipe, resolved: Any, targets: list[dict[str, str]]) -> None:
    """Quant rules before any weights load: format x backend x arch, SVDQuant rank vs width, no cache mix."""
    import json

    from dtcompile.quant import check_targets, get_format

    spec = recipe.quant
    if recipe.cache is not None:
        raise UnsupportedError(
            "quant and cache: block-cache artifacts are exported unquantized; drop one of the two sections"
        )
    check_targets(spec, [(t["backend"], t["arch"]) for t in targets if t["backend"] != "onnxruntime"])
    fmt = get_format(spec.format)
    for t in targets:
        if t["backend"] == "onnxruntime" and not t.get("reason"):
            reason = fmt.supports("onnxruntime")
            if reason:
                t["reason"] = reason
    config = resolved.local_dir / "transformer" / "config.json" if resolved.local_dir else None
    if config is not None and config.is_file():
        cfg = json.loads(config.read_text())
        width = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
        problem = fmt.check_width(spec, width) if width else None
        if problem:
            raise UnsupportedError(problem)


def component_config(resolved: Any, component: str) -> dict[str, Any] | None:
    """A component's config.json without loading weights (None: a hub model not downloaded yet)."""
    import json

    from dtcompile.stages.load import source_dir

    if resolved.kind == "builtin":
        from dtcompile.models.builtin import builtin

        config = builtin(resolved.builtin_name).config.get(component)
        if isinstance(config, dict):
            return dict(config)
    if resolved.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        spec = resolved.spec
        cached = try_to_load_from_cache(spec.source, f"{component}/config.json", revision=spec.revision)
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    path = source_dir(resolved) / component / "config.json"
    if not path.is_file():
        raise RecipeError(f"model.source: {path} not found; the pipeline has no {component} component")
    return json.loads(path.read_text())


def _plan_cache(recipe: Recipe, resolved: Any) -> list[str]:
    """Dry-run check of ``recipe.cache`` against the model's block names (no weights loaded); plan lines."""
    from dtcompile.recipe.cache import plan_lines, plan_segments

    spec = recipe.cache
    adapter = resolved.adapter
    config = component_config(resolved, adapter.component) if adapter is not None else None
    if config is None:
        return [f"cache {spec.mode}: block patterns are checked after the model downloads (not cached locally)"]
    return plan_lines(spec, plan_segments(spec, adapter.block_names(config)))


@dataclass
class BuildReport:
    """Where the artifact went and whether anything was (re)built."""

    artifact_dir: Path
    manifest: dict[str, Any]
    up_to_date: bool = False


def _existing_key(out_dir: Path) -> str | None:
    from dtcompile.manifest import all_file_entries, read_manifest, verify_file

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
    from dtcompile.core.files import replace_dir
    from dtcompile.core.progress import stage
    from dtcompile.core.versions import tool_versions
    from dtcompile.manifest import SCHEMA_VERSION, artifact_key, read_manifest, write_manifest

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
    weights_digest, loras, fused = loaded.component_sha256, [], None
    if recipe.lora:  # the key covers each adapter's sha256 and scale
        from dtcompile.stages.lora import lora_key_digest, resolve_loras

        loras = resolve_loras(recipe.lora)
        weights_digest = lora_key_digest(loaded.component_sha256, loras)
    base_dir = Path(recipe_path).resolve().parent if recipe_path else None
    if recipe.quant is not None:  # the key covers the calibration prompts' content, not just their path
        from dtcompile.stages.quantize import load_prompts, prompts_sha256

        prompts_digest = prompts_sha256(load_prompts(recipe.quant.calib, base_dir))
        weights_digest = hashlib.sha256(f"{weights_digest}:{prompts_digest}".encode()).hexdigest()
    key = artifact_key(recipe.engine_fields(), weights_digest, versions)
    if not force and stop_after is None and _existing_key(out_dir) == key:
        log.info("artifact %s is up to date (key %s); use --force to rebuild", out_dir, key[:12])
        return BuildReport(out_dir, read_manifest(out_dir), up_to_date=True)
    if loras and stop_after != "load":
        with stage("lora", f"{len(loras)} adapter(s) into {loaded.adapter.component}") as st:
            from dtcompile.stages.lora import fuse_lora

            fused = fuse_lora(loaded, loras, recipe.dtype)
        stats.append(st)
    quantized = None
    if recipe.quant is not None and stop_after not in ("load", "lora"):
        with stage("quantize", f"{recipe.quant.format} on {loaded.adapter.component}") as st:
            from dtcompile.stages.quantize import quantize_component

            quantized = quantize_component(loaded, recipe, base_dir, weights_digest)
        stats.append(st)

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
        if fused is not None:
            manifest["lora"] = {"adapters": fused.adapters}
        if quantized is not None:
            manifest["precision"] = f"{recipe.quant.format} ({recipe.dtype} compute)"
        if stop_after in ("load", "lora", "quantize"):
            manifest["stopped_after"] = stop_after
        else:
            from dtcompile.stages.export import export_component, export_pipeline_files

            comp = loaded.adapter.component
            with stage("export", f"{comp} -> ONNX opset {recipe.export.opset}") as st:
                if recipe.cache is not None:  # one graph per part (prologue, block segments, epilogue)
                    from dtcompile.stages.cache_split import export_split

                    manifest["components"][comp], graphs = export_split(loaded, recipe, tmp)
                else:
                    graphs = [(comp, export_component(loaded, recipe, tmp, quantized))]
                manifest["pipeline"] = export_pipeline_files(loaded, tmp) if recipe.output.include_pipeline else {}
                onnx_entries = [g.manifest["onnx"] for _, g in graphs]
                st.wrote = [e["file"] for e in [*onnx_entries, *manifest["pipeline"].get("files", [])[:1]]]
            stats.append(st)
            manifest["components"].update((name, g.manifest) for name, g in graphs)
            if fused is not None:  # base weights of the LoRA-touched tensors, for a later `dtc refit`
                from dtcompile.tools.refit import record_build_loras

                manifest["lora"] = record_build_loras(tmp, comp, manifest["components"][comp], fused)
            if stop_after == "export":
                manifest["stopped_after"] = "export"
            else:
                from dtcompile.stages.build import engines_from_onnx

                n_trt = sum(t["backend"] != "onnxruntime" for t in the_plan.targets)
                with stage("build", f"{n_trt} TensorRT target(s)") as st:
                    for name, exported in graphs:
                        outcome = engines_from_onnx(exported.onnx_path, exported.profile, recipe.engine, tmp, name)
                        st.wrote += [e["file"] for e in outcome.engines]
                        manifest["components"][name]["engines"].extend(outcome.engines)
                        # parts share the targets: each unbuilt target is reported once
                        manifest["skipped"] += [s for s in outcome.skipped if s not in manifest["skipped"]]
                stats.append(st)
        # targets the plan already knew could not be built (e.g. onnxruntime for an nvfp4 graph)
        manifest["skipped"] += [
            {k: t[k] for k in ("backend", "arch", "reason")}
            for t in the_plan.targets
            if t["backend"] == "onnxruntime" and t.get("reason")
        ]
        manifest["stages"] = [s.to_json() for s in stats]
        write_manifest(tmp, manifest)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("artifact: %s", out_dir)
    return BuildReport(out_dir, manifest)
