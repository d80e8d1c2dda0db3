"""Plan-time choice of the attention mode: which of ``native``, ``plugin``, ``decomposed`` each engine can take.

Input: a recipe (``export.attention``, dtype, opset, ``quant.quantize_mha``) and the (backend, arch) of its
engines, from the caller (the plan). Output: an ``AttentionChoice`` (the mode, and for ``auto`` why), or an
UnsupportedError naming the backend, the arch and what it lacks. Cheap: no weights, no build, no torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import UnsupportedError
from dtcompile.core.targets import REFERENCE_BACKEND, RTX_BACKEND, TRT_BACKEND
from dtcompile.core.versions import dist_version, version_tuple

if TYPE_CHECKING:
    from dtcompile.recipe import Recipe

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
    if backend == REFERENCE_BACKEND:
        return None
    if dtype == "float32":
        return TRT_FP32_REASON.format(backend=backend)
    if dtype == "bfloat16" and arch == "sm_75":
        return "Turing (sm_75) has no bfloat16 attention kernels; use dtype: float16"
    if backend == TRT_BACKEND:
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
    if backend == REFERENCE_BACKEND:
        return (
            "onnxruntime has no kernel for the dtc::FusedAttention plugin node; drop onnxruntime from "
            "engine.backends or use export.attention: native or decomposed"
        )
    if backend == RTX_BACKEND:
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
