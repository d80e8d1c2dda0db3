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
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from dtcompile.core.numerics import nvfp4_fake_quant
from dtcompile.quant import NVFP4, QuantFormat

if TYPE_CHECKING:
    import torch

    from dtcompile.recipe.quant import Nvfp4Spec, SvdquantSpec


#: (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) of NVFP4 in ModelOpt's op signature.
_NVFP4_BITS = (4, 2, 8, 4)


#: nvfp4's spec, or svdquant's (``SvdquantFormat`` is nvfp4 plus its low-rank branch).
NvSpecT = TypeVar("NvSpecT", bound="Nvfp4Spec | SvdquantSpec")


class Nvfp4Format(QuantFormat[NvSpecT]):
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
    # Checked on a copy with the FP4 ops emulated by standard ops; measured: tiny-flux 1.6e-7, FLUX.1-dev
    # widths 2+2 blocks 2.1e-3 (own noise 3.3e-3, so the gate is 6.5e-3).
    parity_tolerance: ClassVar[float] = 1e-3
    fix_hint: ClassVar[str] = "use quant.format fp8 (sm_89+) or int8"

    def quantizer_entries(self, spec: NvSpecT) -> list[dict[str, Any]]:
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
