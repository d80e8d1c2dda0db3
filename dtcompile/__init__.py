"""dtcompile: ahead-of-time compiler from diffusers pipelines to TensorRT engines.

The public API is ``dtcompile.build``, ``dtcompile.plan``, ``dtcompile.load_pipeline`` and ``dtcompile.refit``
(defined in ``dtcompile.api``, looked up on first use). Importing this package loads no torch, tensorrt,
modelopt, diffusers or onnx.
"""

from __future__ import annotations

from typing import Any

from dtcompile.core.versions import DTC_VERSION as __version__

_API = ("build", "plan", "load_pipeline", "refit")


def __getattr__(name: str) -> Any:
    if name in _API:
        from dtcompile import api

        return getattr(api, name)
    raise AttributeError(f"module 'dtcompile' has no attribute {name!r}")


__all__ = ["__version__", *_API]
