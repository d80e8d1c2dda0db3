"""Recipes: the typed schema (``schema``, with the ``quant`` and ``cache`` sections) and the YAML loader.

Every recipe field, its type, default and meaning: docs/recipes.md (generated from this schema).
"""

from dtcompile.recipe.base import ItemError, Strict
from dtcompile.recipe.cache import CacheGroupSpec, CacheSpec, Segment
from dtcompile.recipe.loader import load_recipe, parse_overrides
from dtcompile.recipe.quant import FORMAT_NAMES, CalibSpec, QuantSpec, parse_quant_spec
from dtcompile.recipe.schema import (
    ATTENTION_MIN_OPSET,
    PICKLE_SUFFIXES,
    EngineSpec,
    ExportSpecModel,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    RangeSpec,
    Recipe,
    ShapesSpec,
)

__all__ = [
    "ATTENTION_MIN_OPSET",
    "FORMAT_NAMES",
    "PICKLE_SUFFIXES",
    "CacheGroupSpec",
    "CacheSpec",
    "CalibSpec",
    "EngineSpec",
    "ExportSpecModel",
    "ItemError",
    "LoraSpec",
    "ModelSpec",
    "OutputSpec",
    "QuantSpec",
    "RangeSpec",
    "Recipe",
    "Segment",
    "ShapesSpec",
    "Strict",
    "load_recipe",
    "parse_overrides",
    "parse_quant_spec",
]
