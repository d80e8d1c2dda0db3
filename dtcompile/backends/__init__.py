"""Backends: onnxruntime (the reference, any machine) and the two TensorRT flavours (one code path).

``BACKENDS`` maps a backend name (``engine.backends`` in a recipe) to its ``Backend`` class
(``dtcompile.backends.base``), imported on first use; ``get_backend(name)`` returns an instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtcompile.core.registry import Registry

if TYPE_CHECKING:
    from dtcompile.backends.base import Backend

BACKENDS: Registry[type[Backend]] = Registry(
    "backend",
    {
        "onnxruntime": "dtcompile.backends.onnxruntime:OnnxruntimeBackend",
        "tensorrt-rtx": "dtcompile.backends.tensorrt:TensorRTRtxBackend",
        "tensorrt": "dtcompile.backends.tensorrt:TensorRTBackend",
    },
)


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name`` (UnsupportedError naming the choices otherwise)."""
    return BACKENDS.get(name)()
