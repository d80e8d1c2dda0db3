"""The fused-attention plugin on the build side: loading it, finding the plugin nodes of a graph, registering
the plugin with a TensorRT build and returning the manifest records.

Input: an ONNX file and the TensorRT module (and flavour) about to parse it. Output: the plugin records of the
engine (``register_build_plugins``), or UnsupportedError when the flavour cannot serve the graph's plugin nodes
(tensorrt-rtx: ``modes.RTX_PLUGIN_REASON``), raised before the parser runs.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from dtcompile.attention.modes import RTX_PLUGIN_REASON
from dtcompile.core.errors import BuildError, UnsupportedError
from dtcompile.core.targets import RTX_BACKEND


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
    if flavour == RTX_BACKEND:
        raise UnsupportedError(f"{onnx_path} needs the {known} plugin: {RTX_PLUGIN_REASON}")
    if not plugin.trt_plugin.register(trt):
        raise BuildError(f"{flavour} {trt.__version__} refused to register the {known} plugin creator")
    return [plugin.plugin_record()]
