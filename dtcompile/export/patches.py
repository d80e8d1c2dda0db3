"""Upstream patches the ONNX exporter applies, in one place.

The legacy TorchScript exporter (``dynamo=False``) has three traps for diffusers models; each is fixed for the
duration of one export only:

- ``aten::rms_norm`` has no symbolic: ``_rms_norm_symbolic`` registers one that decomposes it into
  Pow/ReduceMean/Add/Sqrt/Div/Mul (computed in fp32 for fp16/bf16 inputs, as torch does). Always applied.
- ``aten::gelu``'s own symbolic (opsets below 20) writes its constants in the input's type: in a bf16 graph
  the tanh form's sqrt(2/pi) becomes 0.796875 (-0.13%) and 0.044715 becomes 0.04468, while torch computes
  bf16 GELU in fp32 with exact constants. ``_gelu_symbolic`` computes fp16/bf16 GELU in fp32 and casts back,
  as torch does (found by the float32 parity check, ``quant.parity.float32_parity``). Always applied.
- diffusers' RoPE (``x.reshape(*x.shape[:-1], -1, 2)``) is traced with constant shapes, so the graph fails at
  any other batch or sequence size; ``_dynamic_rope`` swaps ``apply_rotary_emb`` for an ``unflatten`` version
  and restores it. Selectable: a model adapter names it in ``export_patches()`` (``FluxAdapter`` does).

A patch is a context-manager factory taking no arguments. ``PATCHES`` names the selectable ones, so that a
model adapter (a lower layer, which cannot import this package) can select them by name.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from dtcompile.core.errors import BuildError

logger = logging.getLogger("dtcompile.export")

#: A patch: called with no arguments, returns the context it is active in.
Patch = Callable[[], AbstractContextManager[Any]]


@contextlib.contextmanager
def _rms_norm_symbolic(opset: int) -> Iterator[None]:
    """Register a decomposed ``aten::rms_norm`` symbolic for ``opset`` for the duration of the export.

    Decomposed rather than opset-23 RMSNormalization: TensorRT-RTX and onnxruntime parse the primitive ops and
    TensorRT fuses them back into one normalization layer.
    """
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::rms_norm", opset)


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """ONNX symbolic of ``aten::rms_norm(input, normalized_shape, weight?, eps?)``.

    Follows torch's own kernel: fp16/bf16 inputs are normalized in fp32 and cast back before the weight is
    applied (squaring in fp16 overflows above 256).
    """
    import torch
    from torch.onnx import symbolic_helper as sh

    shape = sh._get_const(normalized_shape, "is", "normalized_shape")
    axes = torch.tensor(list(range(-len(shape), 0)), dtype=torch.int64)
    scalar_type = sh._type_utils.JitScalarType.from_value(x, sh._type_utils.JitScalarType.FLOAT)
    in_dtype = scalar_type.dtype()
    # torch's default when eps is None is the dtype's machine epsilon.
    eps_value = torch.finfo(in_dtype).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    upcast = in_dtype in (torch.float16, torch.bfloat16)
    xf = g.op("Cast", x, to_i=sh._type_utils.JitScalarType.FLOAT.onnx_type()) if upcast else x
    compute = torch.float32 if upcast else in_dtype
    two = g.op("Constant", value_t=torch.tensor(2.0, dtype=compute))
    mean_sq = g.op("ReduceMean", g.op("Pow", xf, two), g.op("Constant", value_t=axes), keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean_sq, g.op("Constant", value_t=torch.tensor(eps_value, dtype=compute))))
    y = g.op("Div", xf, denom)
    if upcast:
        y = g.op("Cast", y, to_i=scalar_type.onnx_type())
    if not sh._is_none(weight):
        y = g.op("Mul", y, weight)
    return y


@contextlib.contextmanager
def _gelu_symbolic(opset: int) -> Iterator[None]:
    """Register ``_gelu`` as ``aten::gelu``'s symbolic for ``opset`` for the duration of the export (below
    opset 20 only: from 20 on ONNX has a Gelu op)."""
    if opset >= 20:
        yield
        return
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic("aten::gelu", _gelu, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::gelu", opset)


def _gelu(g: Any, x: Any, approximate: Any) -> Any:
    """ONNX symbolic of ``aten::gelu(input, approximate)``: torch's own decomposition (opset 9), computed in
    fp32 for fp16/bf16 inputs and cast back, as torch's kernel does; float32 inputs get torch's graph as is."""
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset9

    mode = sh._maybe_get_const(approximate, "s")
    scalar_type = sh._type_utils.JitScalarType.from_value(x, sh._type_utils.JitScalarType.FLOAT)
    if scalar_type.dtype() not in (torch.float16, torch.bfloat16):
        return symbolic_opset9.gelu(g, x, mode)
    xf = g.op("Cast", x, to_i=sh._type_utils.JitScalarType.FLOAT.onnx_type())
    return g.op("Cast", symbolic_opset9.gelu(g, xf, mode), to_i=scalar_type.onnx_type())


_ROPE_PARAMS = ("x", "freqs_cis", "use_real", "use_real_unbind_dim", "sequence_dim")


@contextlib.contextmanager
def _dynamic_rope() -> Iterator[None]:
    """Swap diffusers' ``apply_rotary_emb`` for a version whose reshapes stay dynamic, then restore it.

    ``diffusers.models.embeddings.apply_rotary_emb`` splits the head dim with
    ``x.reshape(*x.shape[:-1], -1, 2)``; the tracer records ``x.shape[:-1]`` as constants, so the exported
    graph only runs at the example's batch and sequence length. ``unflatten(-1, (-1, 2))`` exports as a
    shape computation. Every loaded diffusers module that imported the function by name (e.g.
    ``diffusers.models.transformers.transformer_flux``) is patched.
    """
    try:
        from diffusers.models import embeddings
    except ImportError:  # not a diffusers model: nothing to patch
        yield
        return
    original = getattr(embeddings, "apply_rotary_emb", None)
    if original is None or tuple(inspect.signature(original).parameters) != _ROPE_PARAMS:
        logger.warning(
            "diffusers.models.embeddings.apply_rotary_emb is missing or has a new signature; not patching it "
            "(the exported graph may only run at the example shapes)"
        )
        yield
        return

    replacement = _make_dynamic_rope(original)
    patched: list[Any] = [  # diffusers modules (their patched attribute is not in their type)
        m
        for name, m in list(sys.modules.items())
        if (name == "diffusers" or name.startswith("diffusers.")) and getattr(m, "apply_rotary_emb", None) is original
    ]
    for m in patched:
        m.apply_rotary_emb = replacement
    logger.debug("patched apply_rotary_emb in %s", ", ".join(m.__name__ for m in patched))
    try:
        yield
    finally:
        for m in patched:
            m.apply_rotary_emb = original


def _make_dynamic_rope(original: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_rotary_emb`` with the same numerics, using ``unflatten`` instead of a shape-built reshape."""
    import torch

    def apply_rotary_emb(
        x: torch.Tensor,
        freqs_cis: Any,
        use_real: bool = True,
        use_real_unbind_dim: int = -1,
        sequence_dim: int = 2,
    ) -> torch.Tensor:
        if not use_real or use_real_unbind_dim not in (-1, -2) or sequence_dim not in (1, 2):
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = freqs_cis  # [S, D]
        if sequence_dim == 2:
            cos, sin = cos[None, None, :, :], sin[None, None, :, :]
        else:
            cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        cos, sin = cos.to(x.device), sin.to(x.device)
        if use_real_unbind_dim == -1:
            x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, H, S, D//2]
            x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        else:
            x_real, x_imag = x.unflatten(-1, (2, -1)).unbind(-2)
            x_rotated = torch.cat([-x_imag, x_real], dim=-1)
        return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)

    return apply_rotary_emb


_WAN_PROCESSOR_PARAMS = ("self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb")


@contextlib.contextmanager
def _wan_rope() -> Iterator[None]:
    """Run ``WanAttnProcessor``'s text-to-video path with RoPE written as ``stack`` + ``flatten``, then restore it.

    Upstream rotates queries and keys by strided in-place writes (``out[..., 0::2] = ...``), which the tracer
    records as an ``Expand`` to the example's shape: the graph fails at any other frame count or size. The
    replacement computes the same products and calls ``dispatch_attention_fn`` through the module (so the
    attention router still sees every call); image-conditioned (I2V) attention keeps the original.
    """
    try:
        from diffusers.models.transformers import transformer_wan as tw
    except ImportError:
        yield
        return
    cls = getattr(tw, "WanAttnProcessor", None)
    original = cls.__dict__.get("__call__") if cls is not None else None
    if cls is None or original is None or tuple(inspect.signature(original).parameters) != _WAN_PROCESSOR_PARAMS:
        logger.warning("diffusers' WanAttnProcessor has a new signature; not patching it (the graph may be static)")
        yield
        return
    import torch

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2], sin[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)

    def call(self: Any, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
             attention_mask: Any = None, rotary_emb: Any = None) -> Any:  # fmt: skip
        if attn.add_k_proj is not None:
            return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = tw._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        out = tw.dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                       backend=self._attention_backend, parallel_config=None)  # fmt: skip
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = original


#: Selectable patches by name (what ``ModelAdapter.export_patches()`` may return instead of the factories).
PATCHES: dict[str, Patch] = {"dynamic_rope": lambda: _dynamic_rope(), "wan_rope": lambda: _wan_rope()}
#: What ``export_onnx`` applies when the caller selects none (``patches=None``): every patch, as before
#: adapters chose their own.
DEFAULT_PATCHES: tuple[str, ...] = ("dynamic_rope",)


def resolve_patches(patches: Sequence[str | Patch] | None) -> list[Patch]:
    """Factories for ``patches`` (names in ``PATCHES`` or factories); ``None`` means ``DEFAULT_PATCHES``.

    Raises:
        BuildError: a name that is not in ``PATCHES``.
    """
    out: list[Patch] = []
    for p in DEFAULT_PATCHES if patches is None else patches:
        if isinstance(p, str):
            if p not in PATCHES:
                raise BuildError(f"unknown export patch '{p}'; known: {', '.join(sorted(PATCHES))}")
            out.append(PATCHES[p])
        else:
            out.append(p)
    return out


__all__ = ["DEFAULT_PATCHES", "PATCHES", "Patch", "resolve_patches"]
