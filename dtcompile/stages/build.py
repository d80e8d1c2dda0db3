"""Stage `build`: an exported ONNX graph in, engines out: one per planned (TensorRT backend, target arch).

The onnxruntime artifact is the ONNX graph itself (recorded by the export stage). TensorRT-RTX builds on any
machine, one compute capability per build; datacenter TensorRT builds only for the GPU present. Targets the
plan found blocked are recorded as not built with the plan's reason; each build goes through the backend
registry (``dtcompile.backends``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.backends import get_backend
from dtcompile.backends.base import EngineJob
from dtcompile.core.errors import MissingDependencyError, UnsupportedError
from dtcompile.core.targets import REFERENCE_BACKEND

if TYPE_CHECKING:
    from dtcompile.core.graph import ShapeProfile
    from dtcompile.stages.plan import Plan

log = logging.getLogger("dtcompile.build")


@dataclass(frozen=True)
class BuildOutcome:
    """Engines written and targets not built (with the reason), for the manifest."""

    engines: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def engines_from_onnx(
    onnx_path: Path, profile: ShapeProfile, plan: Plan, out_dir: Path, component: str
) -> BuildOutcome:
    """Build every planned engine target from ``onnx_path`` into ``out_dir/<backend>/<arch>/<component>.engine``."""
    outcome = BuildOutcome()
    job = EngineJob(onnx_path, profile, out_dir, component)
    targets = [t for t in plan.targets if t.backend != REFERENCE_BACKEND]
    for i, planned in enumerate(targets, 1):
        reason = planned.reason
        if reason is None:
            log.info("[build] %d/%d %s %s ...", i, len(targets), planned.backend, planned.arch)
            try:
                entry = get_backend(planned.backend).build(job, planned.target, plan.settings_for(component))
            except (UnsupportedError, MissingDependencyError) as exc:
                reason = str(exc)
            else:
                log.info(
                    "[build] %s %s: %.1f MB in %.1fs",
                    planned.backend,
                    planned.arch,
                    entry["size"] / 2**20,
                    entry["build_s"],
                )
                outcome.engines.append(entry)
                continue
        log.warning("[build] NOT BUILT %s %s: %s", planned.backend, planned.arch, reason)
        outcome.skipped.append({"backend": planned.backend, "arch": planned.arch, "reason": reason})
    return outcome
