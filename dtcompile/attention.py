"""Attention in the exported graph: the ONNX ``Attention`` op, the fused-attention plugin, or MatMul-Softmax-MatMul.

Input: a recipe (``export.attention``, dtype, opset, ``quant.quantize_mha``) and the (backend, arch) of its
engines, from the caller. Output, at dry run: an ``AttentionChoice`` (the mode each engine gets, or an
UnsupportedError naming the backend, the arch and what it lacks); during export: a context
(``export_attention``) that routes diffusers' attention through ``attention()``, which emits the chosen form,
and counts what it emitted so the graph can be checked.

Modes (all take (B, heads, S, head_dim) q/k/v, as torch SDPA does):

- ``native``: one opset-23 ``Attention`` node per attention call (4-D inputs, heads read from the shape, no
  ``softmax_precision``: TensorRT refuses it). TensorRT maps it to its fused attention layer; onnxruntime runs it.
- ``plugin``: one ``dtc::FusedAttention`` node (``dtcompile.plugins.fused_attention``), which TensorRT's ONNX parser resolves
  to the plugin registered with the build; on the torch side it is the custom op ``dtc::fused_attention``.
- ``decomposed``: ``torch.nn.functional.scaled_dot_product_attention``, whose legacy ONNX symbolic is
  MatMul-Softmax-MatMul (scale split as sqrt(scale) on q and on k).
- ``auto`` (recipe only): ``native`` where every planned (backend, arch) and the dtype support it and the opset is
  at least 23, else ``decomposed``; the reason is logged and recorded.

fp8 attention (``quant.quantize_mha``): ModelOpt's quantized attention replaces
``torch.nn.functional.scaled_dot_product_attention`` while a quantized attention module runs. ``attention()``
then calls that replacement whatever the mode, so Q/K/V/softmax keep the fp8 Q/DQ MatMul-Softmax-MatMul form
TensorRT fuses into fp8 attention; the manifest records those calls as ``quantized``. The plugin refuses fp8.

``attention()`` is the single patch point: the export patch looks it up on this module at call time, so another
stage may wrap it (``dtcompile.attention.attention = wrapped``) for the duration of its own context.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import BuildError, UnsupportedError
from dtcompile.core.versions import dist_version, version_tuple

if TYPE_CHECKING:
    import torch

    from dtcompile.recipe import Recipe

log = logging.getLogger("dtcompile.attention")

MODES = ("native", "plugin", "decomposed")
#: The ONNX ``Attention`` op exists from this opset on (kept equal to recipe.ATTENTION_MIN_OPSET).
NATIVE_MIN_OPSET = 23
#: TensorRT versions whose ONNX parser maps ``Attention`` to the attention layer (datacenter flavour).
TRT_NATIVE_MIN_VERSION = (10, 14)
#: What TensorRT-RTX lacks for the plugin, as checked on tensorrt_rtx 1.7.1.116 (see docs/attention.md).
RTX_PLUGIN_REASON = (
    "tensorrt-rtx cannot run a Python-defined plugin: its INetworkDefinition has no add_plugin_v3/add_plugin_v2, "
    "its tensorrt_rtx.plugin module (trtp.register/aot_impl) imports tensorrt_rtx_bindings.plugin, which the "
    "wheel does not ship, and its ONNX parser aborts the process when a dtc::FusedAttention node resolves to a "
    "Python IPluginV3 creator; only a C++ plugin library built against the TensorRT-RTX SDK headers could serve "
    "it. Use export.attention: native (float16/bfloat16) or decomposed"
)
#: fp32 attention on TensorRT: no fused kernel, and the build fails (checked on tensorrt_rtx 1.7.1).
TRT_FP32_REASON = (
    "{backend} has fused attention kernels for float16/bfloat16 only: a float32 Attention layer fails to build "
    "('Attention operation was not supported by a dedicated kernel'); set dtype: float16 or bfloat16, or "
    "export.attention: decomposed"
)


# --- dry run: which mode each engine can take ------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionChoice:
    """The attention mode of a build: what the recipe asked, what it resolved to, and why (for ``auto``)."""

    requested: str
    mode: str
    reason: str | None = None

    def line(self) -> str:
        """One dry-run line."""
        if self.requested != "auto":
            return f"attention: {self.mode}"
        return f"attention: {self.mode} (auto{': ' + self.reason if self.reason else ''})"

    def to_json(self) -> dict[str, Any]:
        return {"requested": self.requested, "mode": self.mode, "reason": self.reason}


def mode_blocker(
    mode: str, backend: str, arch: str, dtype: str, *, opset: int, quantize_mha: bool = False
) -> str | None:
    """Why ``mode`` cannot be used for an engine of ``backend``/``arch``/``dtype`` (None when it can).

    Cheap (no weights, no build): reads installed versions at most.
    """
    if mode not in MODES:
        raise UnsupportedError(f"unknown attention mode '{mode}'; choose one of: {', '.join(MODES)}")
    if mode == "decomposed":
        return None
    if mode == "native":
        return _native_blocker(backend, arch, dtype, opset)
    return _plugin_blocker(backend, dtype, quantize_mha)


def _native_blocker(backend: str, arch: str, dtype: str, opset: int) -> str | None:
    """``mode_blocker`` for ``native`` (the ONNX ``Attention`` op)."""
    if opset < NATIVE_MIN_OPSET:
        return f"the ONNX Attention op needs opset >= {NATIVE_MIN_OPSET}, export.opset is {opset}"
    if backend == "onnxruntime":
        return None
    if dtype == "float32":
        return TRT_FP32_REASON.format(backend=backend)
    if dtype == "bfloat16" and arch == "sm_75":
        return "Turing (sm_75) has no bfloat16 attention kernels; use dtype: float16"
    if backend == "tensorrt":
        version = dist_version("tensorrt")
        if version is not None and version_tuple(version) < TRT_NATIVE_MIN_VERSION:
            need = ".".join(map(str, TRT_NATIVE_MIN_VERSION))
            return f"tensorrt {version} does not parse the ONNX Attention op (needs >= {need})"
    return None


def _plugin_blocker(backend: str, dtype: str, quantize_mha: bool) -> str | None:
    """``mode_blocker`` for ``plugin`` (the ``dtc::FusedAttention`` node)."""
    if quantize_mha:
        return (
            "the fused-attention plugin runs float16/bfloat16 only, and quant.quantize_mha asks for fp8 "
            "attention; use export.attention: native or decomposed, or set quant.quantize_mha: false"
        )
    if backend == "onnxruntime":
        return (
            "onnxruntime has no kernel for the dtc::FusedAttention plugin node; drop onnxruntime from "
            "engine.backends or use export.attention: native or decomposed"
        )
    if backend == "tensorrt-rtx":
        return RTX_PLUGIN_REASON
    if dtype == "float32":
        return "the fused-attention plugin takes float16/bfloat16; set dtype: float16 or bfloat16"
    if importlib.util.find_spec("triton") is None:
        return "the fused-attention plugin needs triton (pip install 'dtcompile[plugin]')"
    return None


def quantize_mha(recipe: Recipe) -> bool:
    """Whether the recipe quantizes attention to fp8 (``quant.quantize_mha``; False without a quant section)."""
    return bool(getattr(getattr(recipe, "quant", None), "quantize_mha", False))


def resolve_attention(recipe: Recipe, targets: Sequence[tuple[str, str]]) -> AttentionChoice:
    """The attention mode for ``recipe``; UnsupportedError when an explicit mode does not fit a target.

    ``targets``: (backend, arch) of every engine the build will make on this machine, blocked targets left out
    (``("onnxruntime", "any")`` for onnxruntime); the caller (the plan) computes them.
    """
    requested = recipe.export.attention
    fp8 = quantize_mha(recipe)

    def blockers(mode: str) -> list[tuple[str, str, str]]:
        out = []
        for backend, arch in targets:
            why = mode_blocker(mode, backend, arch, recipe.dtype, opset=recipe.export.opset, quantize_mha=fp8)
            if why:
                out.append((backend, arch, why))
        return out

    if requested != "auto":
        bad = blockers(requested)
        if bad:
            backend, arch, why = bad[0]
            where = backend if arch == "any" else f"{backend} {arch}"
            raise UnsupportedError(f"export.attention: '{requested}' cannot be used for {where}: {why}")
        return AttentionChoice(requested, requested)
    bad = blockers("native")
    if not bad:
        return AttentionChoice("auto", "native")
    backend, arch, why = bad[0]
    where = backend if arch == "any" else f"{backend} {arch}"
    return AttentionChoice("auto", "decomposed", f"native not used: {where}: {why.split(';')[0]}")


# --- export: emitting the chosen form ----------------------------------------------------------------------------


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


# --- the plugin: loading, registration with a TensorRT build, manifest records --------------------------------


def load_plugin() -> ModuleType:
    """The fused-attention plugin package (``dtcompile.plugins.fused_attention``) with its ``kernel``,
    ``reference``, ``torch_op``, ``trt_plugin`` and ``build`` submodules imported (none imports triton, torch or
    TensorRT before it is called; imported here, not at module level, so that importing this module stays light).
    """
    import dtcompile.plugins.fused_attention as plugin
    from dtcompile.plugins.fused_attention import build, kernel, reference, torch_op, trt_plugin  # noqa: F401

    return plugin


def graph_plugin_ops(onnx_path: Path) -> list[str]:
    """``domain::op`` of every node of ``onnx_path`` that needs a plugin (dtc domain), sorted and unique."""
    try:
        import onnx
    except ImportError:
        return []
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # not ONNX (protobuf raises several types): the TensorRT parser reports it
        return []
    return sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain == "dtc"})


def register_build_plugins(trt: Any, flavour: str, onnx_path: Path) -> list[dict[str, str]]:
    """Register the plugins ``onnx_path`` needs with ``trt`` before it is parsed; their manifest records.

    Raises UnsupportedError when the flavour cannot serve them (tensorrt-rtx: ``RTX_PLUGIN_REASON``; checked
    before parsing because the RTX parser aborts the process on a Python plugin).
    """
    ops = graph_plugin_ops(onnx_path)
    if not ops:
        return []
    plugin = load_plugin()
    known = f"{plugin.ONNX_DOMAIN}::{plugin.NAME}"
    unknown = [op for op in ops if op != known]
    if unknown:
        raise UnsupportedError(f"{onnx_path} has nodes {unknown} that no dtcompile plugin serves (known: {known})")
    if flavour == "tensorrt-rtx":
        raise UnsupportedError(f"{onnx_path} needs the {known} plugin: {RTX_PLUGIN_REASON}")
    if not plugin.trt_plugin.register(trt):
        raise BuildError(f"{flavour} {trt.__version__} refused to register the {known} plugin creator")
    return [plugin.plugin_record()]


__all__ = [
    "MODES",
    "RTX_PLUGIN_REASON",
    "AttentionChoice",
    "AttentionTrace",
    "attention",
    "export_attention",
    "graph_plugin_ops",
    "load_plugin",
    "mode_blocker",
    "register_build_plugins",
    "resolve_attention",
]
