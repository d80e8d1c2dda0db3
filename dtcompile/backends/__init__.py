"""Backends: onnxruntime (the reference, any machine) and the two TensorRT flavours (one code path)."""

from __future__ import annotations

from dtcompile.registry import Registry

# name -> runner class; each runner takes (engine_or_onnx_path, entry) and maps feeds -> outputs.
RUNNERS: Registry[type] = Registry(
    "backend",
    {
        "onnxruntime": "dtcompile.backends.onnxruntime:OrtRunner",
        "tensorrt-rtx": "dtcompile.backends.tensorrt:TrtRunner",
        "tensorrt": "dtcompile.backends.tensorrt:TrtRunner",
    },
)
