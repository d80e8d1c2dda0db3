"""Quantization numerics: fp8/int8/fp4 constants and the weight quantizers every stage shares.

torch is imported inside the functions (callers hand in torch tensors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Largest finite float8 E4M3 value (QuantizeLinear saturates there).
FP8_E4M3_MAX = 448.0
#: Largest int8 magnitude of symmetric quantization.
INT8_MAX = 127.0
#: Quantized dtype name (as in ONNX/torch) -> the amax a scale maps to.
QMAX: dict[str, float] = {"int8": INT8_MAX, "float8_e4m3fn": FP8_E4M3_MAX}
#: E2M1 (fp4) magnitudes by code (the sign is bit 3), the midpoints between neighbours, and the largest value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
#: NVFP4's block size (elements per E4M3 block scale).
NVFP4_BLOCK = 16


def broadcast_scale(scale: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """``scale`` shaped to broadcast against an ``ndim`` tensor quantized per tensor (axis None) or along ``axis``."""
    if axis is None or scale.ndim == 0:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """DequantizeLinear with a zero zero-point, in float32."""
    return q.float() * broadcast_scale(scale.float(), axis, q.ndim)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, qdtype: str, axis: int | None) -> torch.Tensor:
    """QuantizeLinear with a zero zero-point: int8 rounds half to even and saturates at -128..127, fp8
    saturates at +-448 (as ONNX does); computed in float32."""
    import torch

    x = w.float() / broadcast_scale(scale.float(), axis, w.ndim)
    if qdtype == "int8":
        return torch.round(x).clamp(-128, 127).to(torch.int8)
    if qdtype == "float8_e4m3fn":
        return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    raise ValueError(f"no symmetric quantizer for {qdtype!r}; choose one of: {', '.join(QMAX)}")


def quantize_weight(w: torch.Tensor, qdtype: str, axis: int | None, scale_dtype: torch.dtype) -> tuple[Any, Any]:
    """Symmetric weight quantization with a recomputed scale: ``amax / QMAX`` per tensor (``axis`` None) or per
    channel along ``axis``. Returns (quantized tensor, scale in ``scale_dtype``)."""
    import torch

    w = w.float()
    amax = w.abs().amax() if axis is None else w.abs().amax(dim=[d for d in range(w.ndim) if d != axis])
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))  # an all-zero channel keeps scale 1/qmax
    scale = (amax / QMAX[qdtype]).to(scale_dtype)
    return quantize_with_scale(w, scale, qdtype, axis), scale


def fp8_fake_quant(x: torch.Tensor, amax: float) -> torch.Tensor:
    """Fake-quantize ``x`` to fp8 E4M3 the way ONNX QuantizeLinear/DequantizeLinear do (scale amax/448)."""
    import torch

    scale = torch.tensor(amax / FP8_E4M3_MAX, dtype=x.dtype, device=x.device)
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor float32 scale: amax / (6 * 448)."""
    return amax.detach().float().abs().amax() / (E2M1_MAX * FP8_E4M3_MAX)


def nvfp4_encode(x: torch.Tensor, block_size: int, scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes (uint8, sign in bit 3) and E4M3 block scales of a float32 ``x`` [..., K], K % block == 0.

    ModelOpt's NVFP4 definition: block scale = block amax / (6 * ``scale_2``) (0 -> 1), clamped to
    [2^-9, 448] and rounded to E4M3; values divided by block scale * ``scale_2`` round half to even onto the
    E2M1 grid, saturating at 6.
    """
    import torch

    blocks = x.reshape(*x.shape[:-1], -1, block_size)
    scale = blocks.abs().amax(dim=-1) / (E2M1_MAX * scale_2)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    block_scale = scale.clamp(2**-9, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    y = blocks / (block_scale.float() * scale_2).unsqueeze(-1)
    a = y.abs()
    idx = torch.bucketize(a, torch.tensor(E2M1_BOUNDS, device=x.device))  # a on a midpoint goes down ...
    ties_up = (a == 0.75) | (a == 1.75) | (a == 3.5)  # ... except where the upper neighbour is even
    idx = (idx + ties_up.to(idx.dtype)).clamp(max=len(E2M1_VALUES) - 1).to(torch.uint8)
    codes = torch.where(y < 0, idx | 8, idx)  # sign bit, -0 included (as ModelOpt packs it)
    return codes.reshape(x.shape), block_scale


def nvfp4_decode(codes: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor, block_size: int) -> Any:
    """float32 values of E2M1 ``codes`` [..., K] with E4M3 ``block_scale`` [..., K / block] and ``scale_2``."""
    import torch

    values = torch.tensor(E2M1_VALUES, device=codes.device)[(codes & 7).long()]
    values = torch.where(codes >= 8, -values, values)
    scale = block_scale.float() * scale_2
    return (values.reshape(*codes.shape[:-1], -1, block_size) * scale.unsqueeze(-1)).reshape(codes.shape)


def nvfp4_fake_quant(x: torch.Tensor, block_size: int, amax: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` to NVFP4 blocks along its last dim and back (pure torch, any device).

    Bit-identical to ModelOpt's ``NVFP4QTensor`` quantize/dequantize (a test checks), without the packing.
    """
    import torch

    scale_2 = nvfp4_global_scale(amax)
    if float(scale_2) == 0.0:
        return torch.zeros_like(x)
    xf = x.float()
    pad = -xf.shape[-1] % block_size
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    codes, block_scale = nvfp4_encode(xf, block_size, scale_2)
    out = nvfp4_decode(codes, block_scale, scale_2, block_size)
    if pad:
        out = out[..., : x.shape[-1]]
    return out.to(x.dtype)
