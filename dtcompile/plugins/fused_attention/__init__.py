"""Fused-attention plugin for dtcompile: a Triton flash-attention kernel, its PyTorch reference, a torch custom op
(``dtc::fused_attention``) and a TensorRT IPluginV3 (``dtc::FusedAttention``, version 1).

Layout of this folder (each file states its own input and output):

- ``kernel.py``: the Triton kernel (online softmax) and its launcher ``flash_attention``.
- ``reference.py``: ``attention_reference``, the float32 PyTorch definition the kernel is tested against.
- ``build.py``: ahead-of-time compilation of the kernel to cubin for a GPU arch (no GPU needed).
- ``torch_op.py``: the torch custom op, its ONNX symbolic (a ``dtc::FusedAttention`` node) and the guarded
  Torch-TensorRT converter registration (the MutableTorchTensorRTModule path).
- ``trt_plugin.py``: the TensorRT IPluginV3 (Python) that serves ``dtc::FusedAttention`` nodes in datacenter
  TensorRT builds.

``dtcompile.attention.plugin.load_plugin()`` imports this subpackage with its submodules, shipped in the wheel;
importing it loads neither torch nor triton nor TensorRT.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: TensorRT plugin name, namespace and version; the ONNX node is ``<DOMAIN>::<NAME>`` with these as attributes.
NAME = "FusedAttention"
NAMESPACE = "dtc"
VERSION = "1"
ONNX_DOMAIN = "dtc"
#: The torch custom op (``torch.ops.dtc.fused_attention``).
TORCH_OP = "dtc::fused_attention"

HERE = Path(__file__).resolve().parent


def source_files() -> list[Path]:
    """The files that make up the plugin (what its sha256 covers), sorted."""
    return sorted(p for p in HERE.glob("*.py") if p.is_file())


def source_sha256() -> str:
    """sha256 over the plugin's source files (name and bytes of each): the plugin's identity in a manifest."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def plugin_record() -> dict[str, str]:
    """The manifest entry of an engine that uses this plugin."""
    return {
        "name": NAME,
        "namespace": NAMESPACE,
        "version": VERSION,
        "onnx_op": f"{ONNX_DOMAIN}::{NAME}",
        "kind": "python IPluginV3 + Triton kernel",
        "source": "dtcompile/plugins/fused_attention",
        "sha256": source_sha256(),
    }
