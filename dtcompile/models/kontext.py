"""FLUX.1 Kontext (image editing): the ``transformer`` of a ``FluxKontextPipeline``.

The transformer is FLUX.1's; the pipeline packs the reference image's latents after the generated latents on
the image-token axis (``hidden_states`` and ``img_ids``, the reference ids with channel 0 set to 1) and keeps
the first half of the output. The engine's image-token range therefore covers latent + reference tokens: the
reference is resized to the generation size, so a call has twice the latent tokens (the profile's min stays
at the latent tokens alone, for text-to-image calls without a reference).

Runs pass ``max_area = height x width`` and ``_auto_resize=False``, so FluxKontextPipeline keeps the requested
size instead of snapping to its preferred ~1 MP resolutions. The reference goes through ``vae.encode``: the
``vae_encoder`` component makes that an engine (one image a call, the generation's size range), and
``vae_decoder`` the decode, as for FLUX.1; without them the VAE stays in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.errors import UnsupportedError
from dtcompile.core.graph import ExportSpec, ShapeProfile, Shapes
from dtcompile.models.base import GenerationRequest
from dtcompile.models.flux import (
    FluxAdapter,
    img_tokens,
    latent_image_ids,
)

if TYPE_CHECKING:
    import torch

    from dtcompile.models.components import AuxGraph


def reference_ids(height: int, width: int, vae_scale_factor: int, device: Any = None) -> torch.Tensor:
    """``img_ids`` of a reference image the generation's size: latent ids with channel 0 set to 1."""
    ids = latent_image_ids(height, width, vae_scale_factor, device=device).clone()
    ids[:, 0] = 1
    return ids


def synthetic_reference(height: int, width: int) -> Any:
    """A fixed smooth RGB image (PIL) for calls that need a reference and were given none: calibration,
    accuracy evaluation and benchmarks. ``dtc run`` and the server refuse a missing reference instead."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 7.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


class KontextAdapter(FluxAdapter):
    """FLUX.1 Kontext: FLUX.1's transformer graph with latent + reference tokens on the image-token axis."""

    family = "flux-kontext"
    pipeline_class = "FluxKontextPipeline"
    reference_image = True
    ulysses = False  # the reference tokens' split is not tested yet: refused rather than assumed
    cache_layout_class = None
    # the reference is VAE-encoded: vae_encoder makes that an engine too
    aux_components: ClassVar[dict[str, str]] = {
        "text_encoder": "clip", "text_encoder_2": "t5", "vae_decoder": "vae", "vae_encoder": "vae_encoder",
    }  # fmt: skip

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        """FLUX.1's text encoders and VAE decoder, and the VAE encoder of the reference image."""
        if name == "vae_encoder":
            from dtcompile.models.components import VaeEncoderGraph

            return VaeEncoderGraph(self._vae_scale_factor(pipe_config))
        return super().aux_graph(name, pipe_config)

    @staticmethod
    def _img_tokens(height: int, width: int, vae_scale_factor: int) -> int:
        return 2 * img_tokens(height, width, vae_scale_factor)  # latents + the reference at the same size

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        import torch

        spec = super().export_spec(module, pipe_config, shapes, dtype)
        vsf = self._vae_scale_factor(pipe_config)
        h, w = shapes.height.opt, shapes.width.opt
        ids = spec.example_inputs["img_ids"]
        spec.example_inputs["img_ids"] = torch.cat([ids, reference_ids(h, w, vsf, device=ids.device)], dim=0)
        return spec

    def shape_profile(self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes) -> ShapeProfile:
        """FLUX's profile with latent + reference tokens; min keeps the latent tokens alone (no reference)."""
        profile = super().shape_profile(module, pipe_config, shapes)
        vsf = self._vae_scale_factor(pipe_config)
        alone = img_tokens(shapes.height.min, shapes.width.min, vsf)
        hidden = profile.min["hidden_states"]
        profile.min["hidden_states"] = (hidden[0], alone, hidden[2])
        profile.min["img_ids"] = (alone, 3)
        return profile

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """FluxKontextPipeline's arguments: the reference resized to the generation size, which is kept as
        asked (``max_area``, ``_auto_resize=False``)."""
        from PIL import Image

        kwargs = super().call_kwargs(request)
        ref = request.image if request.image is not None else synthetic_reference(request.height, request.width)
        if not isinstance(ref, Image.Image):
            raise UnsupportedError(f"image: a PIL image is expected, got {type(ref).__name__}")
        size = (request.width, request.height)
        kwargs["image"] = (
            ref.convert("RGB").resize(size, Image.Resampling.LANCZOS) if ref.size != size else ref.convert("RGB")
        )
        kwargs["max_area"] = request.height * request.width
        kwargs["_auto_resize"] = False
        return kwargs

    def adapt_call(self, arguments: dict[str, Any], given: set[str]) -> None:
        """A user's own call keeps the size it asks for (diffusers' default ``max_area`` and ``_auto_resize``
        pick about 1024 px, outside a smaller profile), and a PIL reference is resized to it as ``call_kwargs``
        does: the engine's image tokens are latents + a reference of the same size."""
        from PIL import Image

        height, width = arguments["height"], arguments["width"]
        if "max_area" not in given:
            arguments["max_area"] = height * width
        if "_auto_resize" not in given:
            arguments["_auto_resize"] = False
            ref = arguments.get("image")
            if isinstance(ref, Image.Image) and ref.size != (width, height):
                arguments["image"] = ref.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)


__all__ = ["KontextAdapter", "synthetic_reference"]
