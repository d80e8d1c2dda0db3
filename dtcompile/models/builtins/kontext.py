"""The tiny built-in FLUX.1 Kontext pipeline (``tiny-flux-kontext``): tiny-flux's components and weights as a
``FluxKontextPipeline``, for CPU tests.

Input: a seed and a config. Output: a ``FluxKontextPipeline``. Importing this module loads no torch or diffusers.
"""

from __future__ import annotations

from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name
from dtcompile.models.builtins.flux import TINY_FLUX_CONFIG, build_tiny_flux
from dtcompile.models.tiny_text import TOKENIZER_CODE

TINY_KONTEXT_VERSION = 1


def build_tiny_kontext(seed: int = 0, config: dict[str, Any] = TINY_FLUX_CONFIG) -> Any:
    """tiny-flux's components as a ``FluxKontextPipeline`` (same seeds, same weights)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**build_tiny_flux(seed, config).components)


BUILTINS = by_name(
    BuiltinModel(
        "tiny-flux-kontext",
        "flux-kontext",
        "tiny-flux's weights as a FluxKontextPipeline (reference-image editing) for offline tests",
        build_tiny_kontext,
        TINY_FLUX_CONFIG,
        TINY_KONTEXT_VERSION,
        (*TOKENIZER_CODE, build_tiny_flux),
    )
)
