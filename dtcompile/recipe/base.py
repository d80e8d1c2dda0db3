"""What every recipe section shares: frozen models that forbid unknown keys, and list-item errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors and a loaded recipe is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class ItemError(ValueError):
    """A validator error pointing into a list item (the loader reports it as ``<field>[index]: message``), or at
    a key of the item (``index`` a str, e.g. a shape range's ``max``)."""

    def __init__(self, index: int | str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.field = field
