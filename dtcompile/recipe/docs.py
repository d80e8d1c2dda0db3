"""docs/recipes.md, generated from the schema: every section and field with its type, default and meaning.

``python -m dtcompile.recipe.docs > docs/recipes.md`` rewrites it; a test checks it is current.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from dtcompile.recipe import cache, quant, schema

#: (YAML path, model) in the order the page lists them.
SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("(top level)", schema.Recipe),
    ("model", schema.ModelSpec),
    ("export", schema.ExportSpecModel),
    ("export.shapes", schema.ShapesSpec),
    ("export.shapes.<variable> (a range, or one integer for a static size)", schema.RangeSpec),
    ("engine", schema.EngineSpec),
    ("output", schema.OutputSpec),
    ("components[]", schema.ComponentSpec),
    ("lora[]", schema.LoraSpec),
    ("quant (format: fp8)", quant.Fp8Spec),
    ("quant (format: int8)", quant.Int8Spec),
    ("quant (format: nvfp4)", quant.Nvfp4Spec),
    ("quant (format: svdquant)", quant.SvdquantSpec),
    ("quant.calib", quant.CalibSpec),
    ("quant.accuracy", quant.AccuracySpec),
    ("cache", cache.CacheSpec),
    ("cache.groups[]", cache.CacheGroupSpec),
)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{value!r}`" if value is not None else "null"


def render() -> str:
    """The whole page."""
    out = [
        "# Recipe reference",
        "",
        "Generated from `dtcompile/recipe/` by `python -m dtcompile.recipe.docs`; do not edit by hand.",
        "Unknown keys are errors; `--set a.b=value` overrides any field (values are YAML).",
        "",
    ]
    for path, model in SECTIONS:
        doc = (model.__doc__ or "").strip().splitlines()[0]
        out += [f"## `{path}`", "", doc, "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            meaning = " ".join((field.description or "").split())
            kind = _type_name(field.annotation).replace("|", r"\|")  # a bare | would end the table cell
            default = _default(field).replace("|", r"\|")
            out.append(f"| `{name}` | `{kind}` | {default} | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
