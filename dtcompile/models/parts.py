"""Base classes of the families' cache parts (``models/<family>.py``'s ``_cache_part_classes``).

This module imports torch: import it inside the function that builds the part classes, never at the top of an
adapter module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch


class TransformerPart(torch.nn.Module):
    """A prologue or epilogue: keeps the transformer's submodules its class lists in ``uses``."""

    uses: tuple[str, ...] = ()

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        for name in self.uses:
            setattr(self, name, getattr(transformer, name))

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            """The submodules named in ``uses`` (diffusers' own classes, whatever the family)."""


class BlockRun(torch.nn.Module):
    """A run of consecutive transformer blocks, as ``self.blocks``."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
