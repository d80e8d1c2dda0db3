"""Stage `build`: OnnxArtifact -> engines, one per (TensorRT backend, target arch).

The onnxruntime artifact is the ONNX graph itself. TensorRT-RTX builds on any machine, one compute
capability per build; datacenter TensorRT builds only for the GPU present and otherwise records why not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import MissingDependencyError, UnsupportedError
from dtcompile.core.targets import TRT_ARCHS
from dtcompile.recipe import EngineSpec

if TYPE_CHECKING:
    from dtcompile.core.graph import ShapeProfile

log = logging.getLogger("dtcompile.build")


@dataclass(frozen=True)
class Target:
    """One engine to build: a TensorRT backend and an arch."""

    backend: str
    arch: str


@dataclass
class BuildOutcome:
    """Engines written and targets not built (with the reason), for the manifest."""

    engines: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def plan_targets(engine: EngineSpec) -> list[Target]:
    """Every (TensorRT backend, arch) pair the recipe asks for, in recipe order."""
    return [
        Target(backend, arch)
        for backend in engine.backends
        if backend in TRT_ARCHS
        for arch in engine.targets
        if arch in TRT_ARCHS[backend]
    ]


def target_blocker(target: Target, refittable: bool) -> str | None:
    """Why ``target`` cannot be built on this machine (None when it can), without building anything."""
    from dtcompile.backends.tensorrt import check_build_target

    try:
        check_build_target(target.backend, target.arch, refittable=refittable)
    except (UnsupportedError, MissingDependencyError) as exc:
        return str(exc)
    return None


def engines_from_onnx(
    onnx_path: Path, profile: ShapeProfile, engine: EngineSpec, out_dir: Path, component: str
) -> BuildOutcome:
    """Build every planned target from ``onnx_path`` into ``out_dir/<backend>/<arch>/<component>.engine``."""
    from dtcompile.backends.tensorrt import engine_from_onnx

    outcome = BuildOutcome()
    targets = plan_targets(engine)
    for i, target in enumerate(targets, 1):
        reason = target_blocker(target, engine.refittable)
        if reason is None:
            path = out_dir / target.backend / target.arch / f"{component}.engine"
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("[build] %d/%d %s %s ...", i, len(targets), target.backend, target.arch)
            try:
                info = engine_from_onnx(
                    onnx_path,
                    profile,
                    target.arch,
                    target.backend,
                    path,
                    refittable=engine.refittable,
                    opt_level=engine.opt_level,
                )
            except (UnsupportedError, MissingDependencyError) as exc:
                reason = str(exc)
            else:
                log.info(
                    "[build] %s %s: %.1f MB in %.1fs", target.backend, target.arch, info.size / 2**20, info.build_s
                )
                outcome.engines.append({**info.to_manifest(out_dir), "build_s": round(info.build_s, 2)})
                continue
        log.warning("[build] NOT BUILT %s %s: %s", target.backend, target.arch, reason)
        outcome.skipped.append({"backend": target.backend, "arch": target.arch, "reason": reason})
    return outcome
