"""Stable Diffusion XL: the ``unet`` (a ``UNet2DConditionModel``) of a ``StableDiffusionXLPipeline``.

Graph: ``sample`` (the scaled VAE latents, batch x C x h x w), ``timestep`` (one per batch row), ``encoder_hidden_states``
(both CLIPs' penultimate hidden states side by side: 77 tokens), ``text_embeds`` (the second CLIP's projected
pooled output) and ``time_ids`` (SDXL's six size/crop conditions); output ``latent`` (the noise prediction, shaped
like ``sample``). diffusers passes the last two nested in ``added_cond_kwargs`` and the first two positionally,
with a 0-d timestep; the export wrapper takes all five flat, and the engine stand-in (``backends/standin.py``)
binds positional arguments, flattens the nested dict and broadcasts the 0-d timestep. SDXL runs classifier-free
guidance as one doubled batch (``guidance_scale > 1``), so the engine's batch range is twice the recipe's.

Image sizes are fixed per artifact (``export.shapes.height/width`` min = opt = max): the UNet decides with Python
integers whether its upsamplers need explicit sizes (``forward_upsample_size``), which the ONNX trace fixes.
SDXL-Turbo (``stabilityai/sdxl-turbo``) is the same pipeline run in one step with ``guidance_scale`` 0: the UNet
is then called on the prompt batch alone, inside the same batch range.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, Shapes, TensorSpec
from dtcompile.models.base import AdapterBase, GenerationRequest, check_one_size, check_size_multiple
from dtcompile.models.components import AuxGraph, TextEncoderGraph, VaeDecoderGraph
from dtcompile.models.examples import ExampleSampler, model_config

if TYPE_CHECKING:
    import torch

CLIP_TOKENS = 77  # both CLIP tokenizers' model_max_length: SDXL's prompt embeds are 77 tokens
TIME_IDS = 6  # original size (2) + crop top-left (2) + target size (2)

#: The UNet's graph inputs, in order (the first two are what diffusers passes positionally).
GRAPH_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
ADDED_COND = ("text_embeds", "time_ids")  # diffusers' ``added_cond_kwargs``


@functools.cache
def _unet_for_export_class() -> type:
    """The nn.Module class of ``SDXLAdapter.export_module`` (built on first use: needs torch)."""
    import torch

    class UNetForExport(torch.nn.Module):
        """The five graph inputs positionally -> the UNet's noise prediction (``added_cond_kwargs`` rebuilt)."""

        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            x = dict(zip(GRAPH_INPUTS, inputs, strict=True))
            added = {name: x.pop(name) for name in ADDED_COND}
            return self.unet(**x, added_cond_kwargs=added, return_dict=False)[0]

    return UNetForExport


def _vae_factor(config: Callable[[str], dict[str, Any] | None]) -> int:
    vae = config("vae") or {}
    return 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else 8


def _unet_factor(config: Callable[[str], dict[str, Any] | None]) -> int:
    """The UNet's overall downsampling (2 per level but the last)."""
    unet = config("unet") or {}
    return 2 ** (len(unet["block_out_channels"]) - 1) if "block_out_channels" in unet else 8


class SDXLAdapter(AdapterBase):
    """SDXL base 1.0 and SDXL-Turbo: the ``unet`` of a ``StableDiffusionXLPipeline``."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    component = "unet"
    negative_prompt = True  # classifier-free guidance: a negative prompt is used
    guidance_branches = "batched"  # one UNet call on [uncond, cond]
    graph_inputs = GRAPH_INPUTS
    no_cache_reason = " (a UNet has no block-cache layout yet: issue 30's cache diffusion for UNets)"
    # High precision where ModelOpt's diffusers example keeps it for SDXL (quantize.py ``filter_func_default``):
    # the time and added-condition embeddings and the first and last convolutions and the shortcuts.
    default_exclude = (
        "*time_emb_proj*", "*time_embedding*", "*conv_in*", "*conv_out*", "*conv_shortcut*", "*add_embedding*",
    )  # fmt: skip

    aux_components: ClassVar[dict[str, str]] = {"text_encoder": "clip", "text_encoder_2": "clip", "vae_decoder": "vae"}

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        return {"vae_scale_factor": int(pipe.vae_scale_factor)}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        """StableDiffusionXLPipeline reads both CLIPs' penultimate hidden states (``clip_skip`` unset) and the
        second's projected pooled output, 77 tokens each, and ``vae.decode``."""
        if name == "text_encoder":
            return TextEncoderGraph(name, ("penultimate_hidden_state",), CLIP_TOKENS)
        if name == "text_encoder_2":
            return TextEncoderGraph(name, ("text_embeds", "penultimate_hidden_state"), CLIP_TOKENS)
        if name == "vae_decoder":
            return VaeDecoderGraph(int(pipe_config["vae_scale_factor"]))
        raise UnsupportedError(f"components: StableDiffusionXLPipeline has no component {name!r}")

    @staticmethod
    def hidden_width(config: dict[str, Any]) -> int:
        """The UNet's narrowest level (what quant formats check alignment on); 0 when unknown."""
        return min(int(c) for c in config.get("block_out_channels") or [0])

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _unet_for_export_class()(module)

    @staticmethod
    def _shapes_at(module: torch.nn.Module, vsf: int, batch: int, height: int, width: int) -> dict:
        cfg = model_config(module)
        text_embeds = int(cfg["projection_class_embeddings_input_dim"]) - TIME_IDS * int(cfg["addition_time_embed_dim"])
        return {
            "sample": (batch, int(cfg["in_channels"]), height // vsf, width // vsf),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, CLIP_TOKENS, int(cfg["cross_attention_dim"])),
            "text_embeds": (batch, text_embeds),
            "time_ids": (batch, TIME_IDS),
        }

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        """Batch from the recipe's min (no CFG: SDXL-Turbo) to twice its opt and max (CFG); one image size."""
        b = shapes.batch
        batch = pick(Range(b.min, 2 * b.opt, 2 * b.max))
        return self._shapes_at(module, int(pipe_config["vae_scale_factor"]), batch, shapes.height.opt, shapes.width.opt)

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        """Symbolic batch (CFG doubles it), everything else at the artifact's one size; examples at opt."""
        dt = dtype_name(dtype)
        opt = self.shapes_at(module, pipe_config, shapes, lambda r: r.opt)
        inputs = [TensorSpec(name, dt, ("batch", *opt[name][1:])) for name in GRAPH_INPUTS]
        cfg = model_config(module)
        out_ch = int(cfg.get("out_channels") or cfg["in_channels"])
        outputs = [TensorSpec("latent", dt, ("batch", out_ch, *opt["sample"][2:]))]
        sample = ExampleSampler(opt, module, dtype)
        example = {name: sample.randn(name) for name in ("sample", "encoder_hidden_states", "text_embeds")}
        example["timestep"] = sample.rand("timestep", 1000)  # the scheduler's timesteps (0..1000)
        # SDXL's size conditions: original size, crop corner, target size (pixels)
        h, w = shapes.height.opt, shapes.width.opt
        example["time_ids"] = sample.randn("time_ids").new_tensor([h, w, 0, 0, h, w]).repeat(opt["time_ids"][0], 1)
        return ExportSpec(inputs=inputs, outputs=outputs, example_inputs={n: example[n] for n in GRAPH_INPUTS})

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """As every family's, without ``max_sequence_length``: SDXL always encodes 77 CLIP tokens."""
        kwargs = super().call_kwargs(request)
        kwargs.pop("max_sequence_length", None)
        return kwargs

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """One image size per artifact, a multiple of the VAE factor x the UNet's downsampling; 77 text tokens."""
        if not shapes.text_len.min == shapes.text_len.max == CLIP_TOKENS:
            raise RecipeError(
                f"export.shapes.text_len: SDXL encodes every prompt to CLIP's {CLIP_TOKENS} tokens; set text_len: "
                f"{CLIP_TOKENS}"
            )
        check_one_size(
            shapes, "SDXL", "the UNet picks its upsampling sizes with Python integers, which the ONNX trace fixes"
        )
        try:
            self.check_image_size(shapes.height.opt, shapes.width.opt, config)
        except UnsupportedError as exc:
            raise RecipeError(f"export.shapes: {exc}") from None

    @staticmethod
    def check_image_size(height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        check_size_multiple(
            height, width, _vae_factor(config) * _unet_factor(config), "the VAE factor x the UNet's downsampling"
        )
