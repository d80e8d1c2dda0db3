"""The contract of a model-family adapter (``ModelAdapter``); the graph types it speaks live in core.graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from dtcompile.core.graph import ExportSpec, ShapeProfile, Shapes

if TYPE_CHECKING:
    import torch


class ModelAdapter(Protocol):
    """One model family (FLUX, SD3, ...): what to load, export and how to shape it."""

    family: str
    pipeline_class: str  # diffusers class name, e.g. "FluxPipeline"
    component: str  # the component turned into an engine, e.g. "transformer"
    default_exclude: tuple[str, ...]  # module-name patterns never quantized

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        """I/O specs and example inputs (at the opt shapes) for exporting ``module``."""

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A wrapper taking the graph inputs positionally and returning the single output tensor."""

    def shape_profile(self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes) -> ShapeProfile:
        """Concrete min/opt/max shapes of every graph input for the recipe's shape ranges."""
