"""How a tiled VAE decode cuts a latent and blends the tiles (diffusers' tiled-decode geometry, as data).

Shared by the build (``models/components.py`` records it in the manifest) and the runtime loop
(``runtime/tiling.py``). Depends on nothing above ``core``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dtcompile.core.errors import UnsupportedError

#: diffusers' AutoencoderKL overlap: a quarter of a tile.
KL_OVERLAP = 0.25


@dataclass(frozen=True)
class TileSpec:
    """How a latent is cut and blended: ``tile`` and ``stride`` in latents, ``blend`` and ``keep`` in pixels,
    ``factor`` pixels per latent, ``clamp`` the result to [-1, 1] (Wan), ``crop`` to the latent's size x factor."""

    layout: str
    tile: int
    stride: int
    blend: int
    keep: int
    factor: int
    clamp: bool = False

    @classmethod
    def kl(cls, tile_px: int, factor: int, flag: str = "tile") -> TileSpec:
        """``AutoencoderKL``'s tiling for tiles of ``tile_px`` pixels (its ``tile_sample_min_size``)."""
        check_tile(tile_px, factor, flag)
        tile = tile_px // factor
        blend = int(tile_px * KL_OVERLAP)
        return cls("kl", tile, int(tile * (1 - KL_OVERLAP)), blend, tile_px - blend, factor)

    @classmethod
    def wan(cls, tile_px: int, stride_px: int, factor: int) -> TileSpec:
        """``AutoencoderKLWan``'s tiling (``tile_sample_min_*`` and ``tile_sample_stride_*``, no patch size)."""
        return cls("wan", tile_px // factor, stride_px // factor, tile_px - stride_px, stride_px, factor, clamp=True)

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "tile": self.tile, "stride": self.stride, "blend": self.blend,
                "keep": self.keep, "factor": self.factor, "clamp": self.clamp}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TileSpec:
        return cls(**data)

    def needed(self, latent_h: int, latent_w: int) -> bool:
        """Whether a latent of this size is tiled (it exceeds one tile in either direction)."""
        return latent_h > self.tile or latent_w > self.tile

    def starts(self, n: int) -> list[int]:
        return list(range(0, n, self.stride))


def check_tile(tile_px: int, factor: int, flag: str = "tile") -> None:
    """A tile of ``tile_px`` pixels must be a whole number of latents divisible by 4, so that the quarter of it that
    overlaps the next tile is whole latents and lines up with the pixels diffusers blends (UnsupportedError)."""
    step = 4 * factor
    if tile_px <= 0 or tile_px % step:
        lower, upper = max(step, tile_px // step * step), (tile_px // step + 1) * step
        raise UnsupportedError(
            f"{flag} {tile_px}: tiled decode cannot make tiles of that size; with the VAE's factor {factor} a tile "
            f"is a multiple of {step} pixels (its 25% overlap whole latents): use {lower} or {upper}"
        )
