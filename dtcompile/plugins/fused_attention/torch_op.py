"""The torch side of the plugin: custom op ``dtc::fused_attention``, its ONNX symbolic, its Torch-TensorRT converter.

Input: q, k, v (B, H, S, D) and a float scale. Output: (B, H, Sq, D) in q's dtype.

- ``register_op()`` defines ``torch.ops.dtc.fused_attention`` once per process: the Triton kernel on CUDA
  tensors (or on the CPU under ``TRITON_INTERPRET=1``), the PyTorch reference otherwise, and a fake (meta)
  implementation so torch.export / Dynamo see its shape.
- ``onnx_symbolic`` turns the op into one ``dtc::FusedAttention`` node (attributes ``scale``, ``plugin_version``,
  ``plugin_namespace``), which TensorRT's ONNX parser resolves to the registered IPluginV3 by name.
- ``register_torch_tensorrt_converter()`` makes Torch-TensorRT (MutableTorchTensorRTModule) convert the op to a
  TensorRT plugin layer. It needs ``torch_tensorrt`` on a CUDA build of torch; it is never called on import.
"""

from __future__ import annotations

import math
from typing import Any

from . import NAME, NAMESPACE, ONNX_DOMAIN, TORCH_OP, VERSION


def _op_exists() -> bool:
    import torch

    try:
        torch.ops.dtc.fused_attention  # noqa: B018 - the lookup is the check
    except (AttributeError, RuntimeError):
        return False
    return True


def register_op() -> Any:
    """Define ``torch.ops.dtc.fused_attention`` (idempotent) and return it."""
    import torch

    if _op_exists():
        return torch.ops.dtc.fused_attention

    from .kernel import HEAD_DIMS, flash_attention, interpreting
    from .reference import attention_reference

    # An explicit schema: annotations are strings here (``from __future__ import annotations``).
    @torch.library.custom_op(TORCH_OP, mutates_args=(), schema="(Tensor q, Tensor k, Tensor v, float scale) -> Tensor")
    def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        use_kernel = (q.device.type == "cuda" or interpreting()) and q.shape[-1] in HEAD_DIMS
        return flash_attention(q, k, v, scale) if use_kernel else attention_reference(q, k, v, scale)

    @fused_attention.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.empty_like(q)

    return torch.ops.dtc.fused_attention


def fused_attention(q: Any, k: Any, v: Any, scale: float | None = None) -> Any:
    """Call the custom op; ``scale`` defaults to 1/sqrt(D)."""
    op = register_op()
    return op(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))


def onnx_symbolic(g: Any, q: Any, k: Any, v: Any, scale: Any) -> Any:
    """Legacy-exporter symbolic of ``dtc::fused_attention``: one ``dtc::FusedAttention`` node, q's type."""
    from torch.onnx import symbolic_helper as sh

    out = g.op(
        f"{ONNX_DOMAIN}::{NAME}",
        q,
        k,
        v,
        scale_f=sh._get_const(scale, "f", "scale"),
        plugin_version_s=VERSION,
        plugin_namespace_s=NAMESPACE,
    )
    out.setType(q.type())
    return out


def register_torch_tensorrt_converter() -> None:
    """Let Torch-TensorRT convert ``dtc::fused_attention`` to a TensorRT plugin layer (needs torch_tensorrt).

    Uses Torch-TensorRT's generator for custom ops (``torch_tensorrt.dynamo.conversion.plugins.custom_op``),
    which registers a TensorRT plugin that runs the op's CUDA implementation (the Triton kernel) and a converter
    that inserts it. Raises ImportError naming what is missing.
    """
    register_op()
    try:
        import torch_tensorrt
    except Exception as exc:  # torch_tensorrt raises more than ImportError without CUDA
        raise ImportError(
            f"torch_tensorrt is needed to convert {TORCH_OP} for MutableTorchTensorRTModule "
            f"(it needs a CUDA build of torch): {exc}"
        ) from exc
    torch_tensorrt.dynamo.conversion.plugins.custom_op(TORCH_OP, supports_dynamic_shapes=True)
