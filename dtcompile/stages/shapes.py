"""The recipe's shape ranges as the adapters' ``Shapes``: what the export, quantize and cache-split stages share.

Input: a recipe ``ShapesSpec`` (``export.shapes``). Output: a ``dtcompile.core.graph.Shapes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtcompile.core.graph import Range, Shapes

if TYPE_CHECKING:
    from dtcompile.recipe.schema import ShapesSpec


def shapes_from_recipe(shapes: ShapesSpec) -> Shapes:
    """Recipe ShapesSpec -> the adapters' Shapes."""
    return Shapes(**{k: Range(v.min, v.opt, v.max) for k, v in shapes if v is not None})
