"""Error metrics used by every parity, accuracy and benchmark report (torch imported by the caller's tensors)."""

from __future__ import annotations

import math
from typing import Any


def rel_l2(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| of two torch tensors, in float64 (||a - b|| itself where b is all zeros)."""
    a, b = a.double().flatten(), b.double().flatten()
    diff, ref = float((a - b).norm()), float(b.norm())
    return diff / ref if ref > 0 else diff


def rel_l1(a: Any, b: Any) -> float:
    """mean |a - b| / mean |b| of two torch tensors, in float32 (first-block-cache's change measure)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two torch tensors, flattened, in float64; where either is all zeros: 1.0 if both
    are, else 0.0."""
    a, b = a.double().flatten(), b.double().flatten()
    denom = float(a.norm() * b.norm())
    if denom == 0:
        return 1.0 if float((a - b).norm()) == 0 else 0.0
    return float(a @ b) / denom


#: The PSNR reports that go into JSON use for identical images (JSON has no infinity).
PSNR_IDENTICAL = 100.0


def psnr(a: Any, b: Any, *, peak: float = 1.0, cap: float | None = None) -> float:
    """PSNR in dB of two images of equal shape (torch tensors or arrays; ``peak`` is the largest value:
    1.0 for [0, 1] tensors, 255.0 for 8-bit images). Identical images give ``inf``, or ``cap`` when given
    (which also bounds every other value)."""
    import numpy as np

    x, y = (np.asarray(v.double().cpu() if hasattr(v, "double") else v, dtype=np.float64) for v in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"PSNR of images of different shapes {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    value = math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)
    return value if cap is None else min(cap, value)
