"""The build, as one ordered list of stages: load -> lora -> quantize -> export -> build.

Each ``Stage`` names its step (``dtcompile.stages.runner``, imported only when the stage runs), what it
produces, and when it applies. ``dtcompile.stages.plan.make_plan`` is the dry run; ``dtcompile.stages.runner.
run_build`` executes the plan. Importing this package loads nothing heavy (``dtc build --help`` uses it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtcompile.recipe import Recipe


@dataclass(frozen=True)
class Stage:
    """One build stage: its name, what it produces, its step ("module:function") and when it applies."""

    name: str
    produces: str
    step: str
    applies: Callable[[Recipe], bool] = lambda recipe: True

    def resolve(self) -> Callable[[Any], list[str] | None]:
        """Import and return the step function (it takes the runner's BuildState)."""
        module, _, attr = self.step.partition(":")
        return getattr(importlib.import_module(module), attr)

    def detail(self, state: Any) -> str:
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


_RUNNER = "dtcompile.stages.runner"
STAGES: tuple[Stage, ...] = (
    Stage("load", "the diffusers pipeline on the CPU (LoadedPipeline)", f"{_RUNNER}:load_step"),
    Stage(
        "lora", "LoRA adapters fused into the component (FusedLoras)", f"{_RUNNER}:lora_step", lambda r: bool(r.lora)
    ),
    Stage(
        "quantize",
        "calibrated fake-quant denoiser or text encoders and their accuracy (QuantizedComponent, QuantizedAux)",
        f"{_RUNNER}:quantize_step",
        lambda r: r.quant is not None or bool(r.quantized_components()),
    ),
    Stage("export", "ONNX graphs, pipeline files, parity (ExportedComponent)", f"{_RUNNER}:export_step"),
    Stage("build", "one engine per (backend, arch) target", f"{_RUNNER}:build_step"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

__all__ = ["STAGES", "STAGE_NAMES", "Stage"]
