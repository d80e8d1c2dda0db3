"""FP8 (E4M3): per-tensor weights and activations, max calibration (ModelOpt's diffusers fp8 preset).

Runs on fp8 tensor cores: Ada (sm_89), Hopper (sm_90) and Blackwell. The exported graph holds standard
ONNX QuantizeLinear/DequantizeLinear with float8e4m3fn zero points (weights stored as fp8 initializers), so
onnxruntime runs it as well as TensorRT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.quant import FP8, QuantFormat

if TYPE_CHECKING:
    from dtcompile.recipe.quant import Fp8Spec


class Fp8Format(QuantFormat["Fp8Spec"]):
    """fp8: E4M3 per-tensor weights and inputs of every linear layer not excluded."""

    name: ClassVar[str] = "fp8"
    description: ClassVar[str] = "FP8 E4M3 per-tensor weights and activations (max calibration)"
    min_sm: ClassVar[int] = 89
    archs: ClassVar[dict[str, tuple[str, ...]]] = {
        # TensorRT-RTX 1.7 refuses fp8 below sm_89 (checked: the sm_86 build fails).
        "tensorrt-rtx": ("sm_89", "sm_120", "sm_121"),
        "tensorrt": ("sm_89", "sm_90", "sm_100", "sm_120"),
    }
    # Both sides in float32 (bf16 models too). Measured with fp8 attention: tiny-flux 1.5e-7; FLUX.1-dev
    # widths 1+1 blocks 3.5e-4, 2+2 8.2e-4. A value on an fp8 rounding boundary rounds differently in
    # onnxruntime and torch, a noise that grows with width and depth: the gate is this or twice the model's
    # own measured noise, the larger (quant.parity.trace_noise).
    parity_tolerance: ClassVar[float] = 1e-3
    fix_hint: ClassVar[str] = "use quant.format int8 for Ampere and older"

    def quantizer_entries(self, spec: Fp8Spec) -> list[dict[str, Any]]:
        """E4M3 per-tensor on every weight and input quantizer."""
        return [
            {"quantizer_name": "*weight_quantizer", "cfg": dict(FP8)},
            {"quantizer_name": "*input_quantizer", "cfg": dict(FP8)},
        ]
