"""Small name -> "module:attr" registries resolved on first use (keeps heavy imports lazy)."""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

from dtcompile.core.errors import UnsupportedError

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries, each a "module:attr" path imported only when looked up."""

    def __init__(self, kind: str, entries: dict[str, str]) -> None:
        self.kind = kind
        self._paths = dict(entries)
        self._cache: dict[str, Any] = {}

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._paths)

    def path(self, name: str) -> str:
        """The "module:attr" path registered as ``name``."""
        return self._paths[self.check(name)]

    def check(self, name: str) -> str:
        """Raise UnsupportedError for an unknown name; return the name otherwise."""
        if name not in self._paths:
            raise UnsupportedError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self._paths)}")
        return name

    def get(self, name: str) -> T:
        """Import and return the entry registered as ``name``."""
        self.check(name)
        if name not in self._cache:
            module, _, attr = self._paths[name].partition(":")
            self._cache[name] = getattr(importlib.import_module(module), attr)
        return self._cache[name]
