"""Reference fused attention in PyTorch: the numbers the kernel and the TensorRT plugin must reproduce.

Input: q (B, H, Sq, D), k and v (B, H, Sk, D); output (B, H, Sq, D) in q's dtype.
Computed in float32 whatever the input dtype (scores, softmax and the weighted sum), then cast back once,
which is what the kernel does with its fp32 accumulators.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` in float32, returned in q's dtype; ``scale`` defaults to 1/sqrt(D)."""
    import torch

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
