"""Model families: one adapter per family, looked up by name or by the diffusers pipeline class.

Importing this package loads no torch or diffusers; an adapter's module is imported on first lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtcompile.core.errors import UnsupportedError
from dtcompile.core.registry import Registry

if TYPE_CHECKING:
    from dtcompile.models.base import ModelAdapter

# diffusers pipeline class (model_index.json's "_class_name") -> its model family and that family's adapter.
_FAMILIES: dict[str, tuple[str, str]] = {
    "FluxPipeline": ("flux", "dtcompile.models.flux:FluxAdapter"),
    "StableDiffusion3Pipeline": ("sd3", "dtcompile.models.sd3:SD3Adapter"),
    "FluxKontextPipeline": ("flux-kontext", "dtcompile.models.kontext:KontextAdapter"),
    "WanPipeline": ("wan", "dtcompile.models.wan:WanAdapter"),
    "WanImageToVideoPipeline": ("wan-i2v", "dtcompile.models.wan:WanI2VAdapter"),
    "Flux2Pipeline": ("flux2", "dtcompile.models.flux2:Flux2Adapter"),
    "QwenImagePipeline": ("qwen-image", "dtcompile.models.qwen_image:QwenImageAdapter"),
    "StableDiffusionXLPipeline": ("sdxl", "dtcompile.models.sdxl:SDXLAdapter"),
    "Cosmos2TextToImagePipeline": ("cosmos2-t2i", "dtcompile.models.cosmos:Cosmos2T2IAdapter"),
    "Cosmos2VideoToWorldPipeline": ("cosmos2-v2w", "dtcompile.models.cosmos:Cosmos2V2WAdapter"),
}
ADAPTERS: Registry[type[ModelAdapter]] = Registry("model family", dict(_FAMILIES.values()))
PIPELINE_FAMILIES: dict[str, str] = {cls: family for cls, (family, _) in _FAMILIES.items()}


def adapter_for_pipeline_class(name: str) -> str:
    """The model family of diffusers pipeline class ``name``; UnsupportedError for any other class."""
    if name not in PIPELINE_FAMILIES:
        raise UnsupportedError(
            f"unsupported pipeline class '{name}'; supported pipeline classes: {', '.join(PIPELINE_FAMILIES)}"
        )
    return PIPELINE_FAMILIES[name]


def adapter_for(pipeline_class: str) -> ModelAdapter:
    """An adapter instance for diffusers pipeline class ``pipeline_class`` (UnsupportedError for others)."""
    return ADAPTERS.get(adapter_for_pipeline_class(pipeline_class))()


__all__ = ["ADAPTERS", "PIPELINE_FAMILIES", "adapter_for", "adapter_for_pipeline_class"]
