"""INT8 with SmoothQuant: per-channel weights, per-tensor activations (ModelOpt's INT8_SMOOTHQUANT recipe).

SmoothQuant moves activation outliers into the weights with per-channel scales (``alpha`` is the migration
strength, 0.8 as in ModelOpt's diffusers example); the scales appear as a Mul before each input Q/DQ. The
exported graph is standard ONNX Q/DQ (int8 zero points), run by onnxruntime and TensorRT alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.quant import INT8_PER_CHANNEL, INT8_PER_TENSOR, QuantFormat

if TYPE_CHECKING:
    from dtcompile.recipe.quant import Int8Spec


class Int8Format(QuantFormat["Int8Spec"]):
    """int8: SmoothQuant W8A8 of every linear layer not excluded."""

    name: ClassVar[str] = "int8"
    description: ClassVar[str] = "INT8 per-channel weights, per-tensor activations, SmoothQuant"
    min_sm: ClassVar[int] = 80
    archs: ClassVar[dict[str, tuple[str, ...]]] = {
        # Turing (sm_75) is out: TensorRT-RTX lists no INT8 GEMM there.
        "tensorrt-rtx": ("sm_80", "sm_86", "sm_89", "sm_120", "sm_121"),
        "tensorrt": ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"),
    }
    # Measured (float32 check): tiny-flux 7.8e-5 (bf16), FLUX.1-dev widths 1+1 blocks 1.3e-4, 2+2 2.6e-4.
    parity_tolerance: ClassVar[float] = 5e-4
    fix_hint: ClassVar[str] = "build int8 for sm_80 or newer"

    def quantizer_entries(self, spec: Int8Spec) -> list[dict[str, Any]]:
        """Per-output-channel int8 weights, per-tensor int8 inputs."""
        return [
            {"quantizer_name": "*weight_quantizer", "cfg": dict(INT8_PER_CHANNEL)},
            {"quantizer_name": "*input_quantizer", "cfg": dict(INT8_PER_TENSOR)},
        ]

    def algorithm(self, spec: Int8Spec) -> dict[str, Any]:
        """SmoothQuant with the spec's ``alpha``."""
        return {"method": "smoothquant", "alpha": spec.alpha}
