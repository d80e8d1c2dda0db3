"""Export-time attention: route diffusers' attention through ``attention()``, which emits the chosen form.

Input: the mode the plan chose (``dtcompile.attention.modes``). Output: a context (``export_attention``) that
routes diffusers' attention through ``attention()`` while a module is exported, and an ``AttentionTrace``
counting what it emitted so the graph can be checked (``AttentionTrace.check_graph``: the manifest's entry).

``attention()`` is the single patch point: the dispatch replacement looks it up on this module at call time, so
another stage may wrap it (``dtcompile.attention.router.attention = wrapped``) for the duration of its own context.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtcompile.attention.modes import MODES
from dtcompile.attention.plugin import load_plugin
from dtcompile.core.errors import BuildError, UnsupportedError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dtcompile.attention")


@dataclass
class AttentionTrace:
    """What the export patch emitted: calls per form and the calls it left to diffusers (with the reason)."""

    mode: str
    emitted: Counter[str] = field(default_factory=Counter)
    fallbacks: list[str] = field(default_factory=list)

    def check_graph(self, op_types: dict[str, int], model: str | None = None) -> dict[str, Any]:
        """Check the exported graph's node counts against what was emitted; the manifest's attention entry.

        ``model`` names the exported module; it must route at least one attention call (None: the graph may
        have none, e.g. a cache prologue). Raises BuildError when a ``native``/``plugin`` export does not hold
        exactly one node per attention call, or when ``model`` routed none.
        """
        nodes = {k: op_types.get(k, 0) for k in ("Attention", "FusedAttention", "Softmax")}
        expect = {"native": ("Attention", self.emitted["native"]), "plugin": ("FusedAttention", self.emitted["plugin"])}
        if self.mode in expect:
            op, n = expect[self.mode]
            if n == 0 and model is not None:
                raise BuildError(
                    f"export.attention '{self.mode}': {model} routed no attention call through dtcompile's "
                    "attention (its processors call neither dispatch_attention_fn nor "
                    "F.scaled_dot_product_attention); use export.attention: decomposed"
                )
            if self.fallbacks:
                raise BuildError(
                    f"export.attention '{self.mode}': {len(self.fallbacks)} attention call(s) could not take that "
                    f"form ({self.fallbacks[0]}); use export.attention: decomposed"
                )
            if nodes[op] != n:
                raise BuildError(
                    f"export.attention '{self.mode}': the graph holds {nodes[op]} {op} node(s) for {n} attention "
                    f"call(s); the export did not keep one node per attention layer"
                )
        return {"mode": self.mode, "calls": dict(sorted(self.emitted.items())), "nodes": nodes}


_ACTIVE: list[tuple[str, AttentionTrace, Any]] = []  # (mode, trace, SDPA at entry): innermost last


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, mode: str = "decomposed"
) -> torch.Tensor:
    """Attention of (B, H, S, D) tensors in the form ``mode`` exports to; returns (B, H, Sq, D).

    Numerically SDPA in every mode (the plugin's torch op runs its kernel or reference). When quantized
    attention has replaced ``F.scaled_dot_product_attention`` (fp8 quantize_mha), that replacement is called.
    """
    import torch.nn.functional as F

    trace = _ACTIVE[-1][1] if _ACTIVE else None
    baseline = _ACTIVE[-1][2] if _ACTIVE else F.scaled_dot_product_attention
    if F.scaled_dot_product_attention is not baseline:
        form = "quantized"
    elif mode in MODES:
        form = mode
    else:
        raise UnsupportedError(f"unknown attention mode '{mode}'; choose one of: {', '.join(MODES)}")
    if trace is not None:
        trace.emitted[form] += 1
    if form == "native":
        return _native_attention_fn().apply(q, k, v, scale)
    if form == "plugin":
        op = load_plugin().torch_op.register_op()
        return op(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


_DISPATCH_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
    "attention_kwargs",
    "backend",
    "parallel_config",
)


@contextlib.contextmanager
def export_attention(mode: str) -> Iterator[AttentionTrace]:
    """Route diffusers' attention through ``attention(..., mode=mode)`` for the duration; yields the trace.

    Every loaded diffusers module that imported ``dispatch_attention_fn`` by name (FLUX's processors call it
    from ``transformer_flux``) gets a replacement; calls it cannot express (masks, dropout, causal, grouped
    heads, context parallelism, backend kwargs) go to the original and are listed in ``trace.fallbacks``.
    For ``plugin`` the ONNX symbolic of ``dtc::fused_attention`` is registered too. Restored on exit.
    """
    import torch.nn.functional as F

    if mode not in MODES:
        raise UnsupportedError(f"unknown attention mode '{mode}'; choose one of: {', '.join(MODES)}")
    trace = AttentionTrace(mode)
    try:
        from diffusers.models import attention_dispatch

        original = getattr(attention_dispatch, "dispatch_attention_fn", None)
    except ImportError:  # not a diffusers model: nothing to route
        original = None
    patched: list[Any] = []  # diffusers modules (their patched attribute is not in their type)
    if original is not None and tuple(inspect.signature(original).parameters) == _DISPATCH_PARAMS:
        replacement = _make_dispatch(original, mode, trace)
        patched = [
            m
            for name, m in list(sys.modules.items())
            if (name == "diffusers" or name.startswith("diffusers."))
            and getattr(m, "dispatch_attention_fn", None) is original
        ]
        for m in patched:
            m.dispatch_attention_fn = replacement
    elif original is not None:
        log.warning("diffusers' dispatch_attention_fn has a new signature; attention is exported as diffusers emits it")
        trace.fallbacks.append("diffusers.models.attention_dispatch.dispatch_attention_fn has a new signature")
    symbolic = _plugin_symbolic() if mode == "plugin" else contextlib.nullcontext()
    _ACTIVE.append((mode, trace, F.scaled_dot_product_attention))
    try:
        with symbolic:
            yield trace
    finally:
        _ACTIVE.pop()
        for m in patched:
            m.dispatch_attention_fn = original
    log.info("attention %s: %s", mode, dict(trace.emitted) or "no calls")


def _make_dispatch(original: Any, mode: str, trace: AttentionTrace) -> Any:
    this = sys.modules[__name__]

    def dispatch_attention_fn(
        query: Any,
        key: Any,
        value: Any,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
    ) -> Any:
        why = _unsupported_call(query, key, attn_mask, dropout_p, is_causal, enable_gqa, attention_kwargs,
                                parallel_config)  # fmt: skip
        if why is not None:
            trace.fallbacks.append(why)
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            attention_kwargs, backend=backend, parallel_config=parallel_config)  # fmt: skip
        # diffusers passes (B, S, H, D); attention() takes (B, H, S, D) like SDPA.
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return this.attention(q, k, v, scale=scale, mode=mode).transpose(1, 2)

    return dispatch_attention_fn


def _unsupported_call(
    query: Any,
    key: Any,
    attn_mask: Any,
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
    attention_kwargs: Any,
    parallel_config: Any,
) -> str | None:
    if attn_mask is not None:
        return "an attention mask"
    if dropout_p or is_causal or enable_gqa:
        return "dropout, causal or grouped-query attention"
    if attention_kwargs:
        return f"backend kwargs {sorted(attention_kwargs)}"
    if parallel_config is not None:
        return "context parallelism"
    if query.dim() != 4 or query.shape[2] != key.shape[2]:
        return f"q {tuple(query.shape)} / k {tuple(key.shape)} are not (B, S, H, D) with equal heads"
    return None


def _native_attention_fn() -> Any:
    """The autograd Function whose legacy-exporter symbolic is one ONNX ``Attention`` (opset 23) node."""
    global _NATIVE_FN
    if _NATIVE_FN is None:
        import torch
        import torch.nn.functional as F

        sdpa = F.scaled_dot_product_attention  # the original: bound before any quantizer swaps it

        class OnnxAttention(torch.autograd.Function):
            """SDPA in torch; ``Attention(q, k, v)`` with (B, H, S, D) inputs in ONNX."""

            @staticmethod
            def forward(ctx: Any, q: Any, k: Any, v: Any, scale: float | None) -> Any:
                return sdpa(q, k, v, scale=scale)

            @staticmethod
            def symbolic(g: Any, q: Any, k: Any, v: Any, scale: float | None) -> Any:
                # q_num_heads/kv_num_heads are only for 3-D inputs; the scale default is 1/sqrt(D), as in SDPA.
                out = g.op("Attention", q, k, v, **({} if scale is None else {"scale_f": float(scale)}))
                out.setType(q.type())
                return out

        _NATIVE_FN = OnnxAttention
    return _NATIVE_FN


_NATIVE_FN: Any = None


@contextlib.contextmanager
def _plugin_symbolic() -> Iterator[None]:
    """Register the ONNX symbolic of ``dtc::fused_attention`` (every opset the legacy exporter uses)."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    plugin = load_plugin()
    plugin.torch_op.register_op()
    opsets = range(9, 24)
    for opset in opsets:
        register_custom_op_symbolic(plugin.TORCH_OP, plugin.torch_op.onnx_symbolic, opset)
    try:
        yield
    finally:
        for opset in opsets:
            unregister_custom_op_symbolic(plugin.TORCH_OP, opset)
