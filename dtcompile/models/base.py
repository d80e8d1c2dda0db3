"""Contracts shared by model-family adapters, the export stage and the backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Range:
    """An inclusive min/opt/max range of one shape variable (batch, height, width, text_len)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Shapes:
    """Shape variables of a build: pixel height/width, batch and text length ranges."""

    batch: Range
    height: Range
    width: Range
    text_len: Range


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype name (numpy style) and dims (int or symbolic str)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class ExportSpec:
    """Everything the exporter needs: I/O specs, example inputs and the opset."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: dict[str, Any]  # name -> torch.Tensor, in the order of `inputs`
    opset: int = 19

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx-style dynamic axes: {tensor: {axis: symbolic name}} for str dims."""
        axes: dict[str, dict[int, str]] = {}
        for t in [*self.inputs, *self.outputs]:
            sym = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes


@dataclass(frozen=True)
class ShapeProfile:
    """Per-input min/opt/max concrete shapes for one TensorRT optimization profile."""

    min: dict[str, tuple[int, ...]] = field(default_factory=dict)
    opt: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {
            name: {"min": list(self.min[name]), "opt": list(self.opt[name]), "max": list(self.max[name])}
            for name in self.min
        }


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
