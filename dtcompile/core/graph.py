"""Graph contracts shared by model-family adapters, the exporter and the backends: shape variables,
tensor specs, export specs and TensorRT shape profiles (plain dataclasses, no torch at import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Range:
    """An inclusive min/opt/max range of one shape variable (batch, height, width, text_len)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Shapes:
    """Shape variables of a build: pixel height/width, batch and text length ranges; pixel frames for video."""

    batch: Range
    height: Range
    width: Range
    text_len: Range
    frames: Range | None = None


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

    @classmethod
    def over_ranges(cls, at: Any) -> ShapeProfile:
        """The profile whose min/opt/max are ``at(pick)`` with ``pick`` taking each ``Range``'s min/opt/max."""
        return cls(min=at(lambda r: r.min), opt=at(lambda r: r.opt), max=at(lambda r: r.max))

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {
            name: {"min": list(self.min[name]), "opt": list(self.opt[name]), "max": list(self.max[name])}
            for name in self.min
        }
