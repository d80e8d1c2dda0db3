"""NVFP4: E2M1 values with one FP8 (E4M3) scale per 16 elements and a per-tensor FP32 scale (Blackwell).

Weights and activations of every linear layer not excluded are quantized; activations dynamically (the
block scales are computed at run time from the calibrated per-tensor range). The exported graph keeps
TensorRT's ``trt::TRT_FP4DynamicQuantize`` for activations (ONNX has no dynamic block quantize op), so
onnxruntime cannot run it; weights are stored packed as FLOAT4E2M1 with FP8 block scales (opset 23).

ModelOpt's fake quantization of NVFP4 only has CUDA kernels. ``cpu_fake_quant`` stands in a pure-torch
implementation for CPU tensors (``nvfp4_fake_quant``: bit-identical to ModelOpt's own ``NVFP4QTensor``
quantize/dequantize, which a test checks, and ~40x faster), so calibration and accuracy checks run without a
GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.quant import NVFP4, QuantFormat

if TYPE_CHECKING:
    import torch

    from dtcompile.quant.spec import Nvfp4Spec


#: (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) of NVFP4 in ModelOpt's op signature.
_NVFP4_BITS = (4, 2, 8, 4)


class Nvfp4Format(QuantFormat):
    """nvfp4: dynamic E2M1 block quantization (block 16, E4M3 scales) of linear weights and inputs."""

    name: ClassVar[str] = "nvfp4"
    description: ClassVar[str] = "NVFP4 E2M1 weights and activations, FP8 scales per 16 elements (max calibration)"
    min_sm: ClassVar[int] = 100
    archs: ClassVar[dict[str, tuple[str, ...]]] = {
        # TensorRT-RTX 1.7 refuses FP4 for sm_89 (checked); it has no sm_100 target.
        "tensorrt-rtx": ("sm_120", "sm_121"),
        "tensorrt": ("sm_100", "sm_120"),
    }
    onnxruntime_runnable: ClassVar[bool] = False
    custom_ops: ClassVar[tuple[str, ...]] = ("trt::TRT_FP4DynamicQuantize",)
    # Checked on a copy with the FP4 ops emulated by standard ops; measured on tiny-flux: 1.6e-7 (fp32).
    parity_tolerance: ClassVar[float] = 1e-2
    fix_hint: ClassVar[str] = "use quant.format fp8 (sm_89+) or int8"

    def quantizer_entries(self, spec: Nvfp4Spec) -> list[dict[str, Any]]:
        """Dynamic NVFP4 blocks on every weight and input quantizer."""
        return [
            {"quantizer_name": "*weight_quantizer", "cfg": _nvfp4()},
            {"quantizer_name": "*input_quantizer", "cfg": _nvfp4()},
        ]


def _nvfp4() -> dict[str, Any]:
    return {**NVFP4, "block_sizes": dict(NVFP4["block_sizes"])}


@contextlib.contextmanager
def cpu_fake_quant(*, exporting: bool = False) -> Iterator[None]:
    """Let NVFP4 fake quantization run on CPU tensors for the duration of the block.

    ModelOpt's dynamic block quantize op asserts CUDA tensors; for CPU tensors in NVFP4 this stands in
    ``nvfp4_fake_quant`` (same numbers: per-tensor amax / (6 * 448), per-block E4M3 scales, E2M1 rounding).
    CUDA tensors and other formats go to the original op.

    ``exporting``: during ``torch.onnx.export`` the op's ONNX symbolic replaces it, but the tracer still
    runs its forward; the pure-torch version would be traced into the graph (the exporter then fails with
    ``unordered_map::at``), so the forward returns a copy of its input instead.

    Not thread-safe: it swaps a module attribute of ModelOpt for the whole process.
    """
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant.dynamic_block_quantize_op

    def standin(
        inputs: torch.Tensor,
        block_size: int,
        amax: torch.Tensor | None,
        num_bits: int,
        exponent_bits: int,
        scale_num_bits: int,
        scale_exponent_bits: int,
    ) -> torch.Tensor:
        bits = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        if inputs.is_cuda or bits != _NVFP4_BITS or amax is None:
            return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        if exporting:
            return inputs.clone()
        return nvfp4_fake_quant(inputs, block_size, amax)

    tensor_quant.dynamic_block_quantize_op = standin
    try:
        yield
    finally:
        tensor_quant.dynamic_block_quantize_op = original


E2M1_MAX = 6.0
E4M3_MAX = 448.0
#: E2M1 magnitudes by code (the sign is bit 3) and the midpoints between neighbours.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def nvfp4_fake_quant(x: torch.Tensor, block_size: int, amax: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` to NVFP4 blocks along its last dim and back (pure torch, any device).

    Bit-identical to ModelOpt's ``NVFP4QTensor`` quantize/dequantize (a test checks), without the packing.
    """
    import torch

    scale_2 = amax.detach().float().abs().amax() / (E2M1_MAX * E4M3_MAX)
    if float(scale_2) == 0.0:
        return torch.zeros_like(x)
    xf = x.float()
    pad = -xf.shape[-1] % block_size
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    codes, block_scale = nvfp4_encode(xf, block_size, scale_2)
    values = torch.tensor(E2M1_VALUES, device=x.device)[(codes & 7).long()]
    values = torch.where(codes >= 8, -values, values)
    scale = block_scale.float() * scale_2
    out = (values.reshape(*xf.shape[:-1], -1, block_size) * scale.unsqueeze(-1)).reshape(xf.shape)
    if pad:
        out = out[..., : x.shape[-1]]
    return out.to(x.dtype)


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
    block_scale = scale.clamp(2**-9, E4M3_MAX).to(torch.float8_e4m3fn)
    y = blocks / (block_scale.float() * scale_2).unsqueeze(-1)
    a = y.abs()
    idx = torch.bucketize(a, torch.tensor(_E2M1_BOUNDS, device=x.device))  # a on a midpoint goes down ...
    ties_up = (a == 0.75) | (a == 1.75) | (a == 3.5)  # ... except where the upper neighbour is even
    idx = (idx + ties_up.to(idx.dtype)).clamp(max=len(E2M1_VALUES) - 1).to(torch.uint8)
    codes = torch.where(y < 0, idx | 8, idx)  # sign bit, -0 included (as ModelOpt packs it)
    return codes.reshape(x.shape), block_scale
