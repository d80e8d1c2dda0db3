"""Tiled VAE decode through an engine built for one tile: any latent larger than the tile is decoded as
overlapping tiles blended together, with the semantics of diffusers' own tiled decode (our loop, their math).

Two layouts, as diffusers has them:

- ``kl`` (``AutoencoderKL.tiled_decode``: FLUX, SD3): tiles of ``tile`` latents (overlap included) every
  ``int(tile * 0.75)`` latents; a tile's decoded rows/columns blend linearly into the tile above/left over
  ``int(tile_px * 0.25)`` pixels, and each tile keeps its first ``tile_px - blend`` pixels.
- ``wan`` (``AutoencoderKLWan.tiled_decode``): tiles of ``tile_px / f`` latents every ``stride_px / f``; blend
  over ``tile_px - stride_px`` pixels; each tile keeps ``stride_px`` pixels; the result is cropped to the sample
  size and clamped to [-1, 1]. Latents are 5-D (batch, channels, frames, height, width): a tile covers every frame.

Input: a latent and a function decoding one tile (the engine). Output: the decoded sample, as diffusers' tiled
decode with the same tile settings computes it (checked against ``enable_tiling()`` in tests/test_lowmem.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dtcompile.core.tiles import TileSpec

if TYPE_CHECKING:
    import torch


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """diffusers' ``blend_v``/``blend_h`` along ``dim``: the first ``extent`` rows of ``b`` fade in from ``a``'s last."""
    import torch

    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    w = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1] * b.ndim
    shape[dim] = extent
    w = w.reshape(shape)
    head = b.narrow(dim, 0, extent)
    mixed = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w).to(b.dtype) + head * w.to(b.dtype)
    head.copy_(mixed)
    return b


def tiled_decode(z: torch.Tensor, spec: TileSpec, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``z`` (batch x C x [frames x] h x w) decoded tile by tile with ``decode`` and blended (module docstring)."""
    import torch

    h, w = int(z.shape[-2]), int(z.shape[-1])
    rows: list[list[torch.Tensor]] = []
    for i in spec.starts(h):
        rows.append([decode(z[..., i : i + spec.tile, j : j + spec.tile].contiguous()) for j in spec.starts(w)])
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, spec.blend, -2)
            if j > 0:
                tile = _blend(row[j - 1], tile, spec.blend, -1)
            kept.append(tile[..., : spec.keep, : spec.keep])
        out_rows.append(torch.cat(kept, dim=-1))
    out = torch.cat(out_rows, dim=-2)[..., : h * spec.factor, : w * spec.factor]
    return out.clamp(-1.0, 1.0) if spec.clamp else out


def tiler(spec: TileSpec) -> Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]:
    """What the VAE stand-in calls with a latent and its engine call: tiled where the latent exceeds a tile."""

    def run(z: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not spec.needed(int(z.shape[-2]), int(z.shape[-1])):
            return decode(z)
        return tiled_decode(z, spec, decode)

    return run
