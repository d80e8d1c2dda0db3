"""Stable Diffusion 3 / 3.5: the ``transformer`` (an ``SD3Transformer2DModel``) of a ``StableDiffusion3Pipeline``.

Graph: ``hidden_states`` (the VAE latents, batch x C x h x w), ``encoder_hidden_states`` (CLIP-L and CLIP-G
hidden states side by side, zero-padded to T5's width, followed by T5's tokens: 77 + text_len tokens),
``pooled_projections`` (both CLIPs' pooled outputs) and ``timestep``; output ``latent`` (the velocity, shaped
like ``hidden_states``). SD3 runs classifier-free guidance as one doubled batch (``guidance_scale > 1``), so
the engine's batch range is twice the recipe's.

Image sizes are fixed per artifact (``export.shapes.height/width`` min = opt = max): diffusers crops SD3's
position embedding with Python integers (``PatchEmbed.cropped_pos_embed``), which the ONNX tracer records as
constants. The batch stays dynamic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, Shapes, TensorSpec
from dtcompile.models.base import AdapterBase, SplitLayout, check_one_size, check_size_multiple
from dtcompile.models.components import AuxGraph, TextEncoderGraph, VaeDecoderGraph
from dtcompile.models.examples import ExampleSampler, model_config

if TYPE_CHECKING:
    import torch
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

CLIP_TOKENS = 77  # both CLIP tokenizers' model_max_length: SD3's prompt embeds start with 77 CLIP tokens
MAX_SEQUENCE_LENGTH = 512  # StableDiffusion3Pipeline refuses a longer T5 max_sequence_length

#: The transformer's graph inputs, in order.
GRAPH_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


@functools.cache
def _cache_part_classes() -> tuple[type, type, type]:
    """The nn.Module classes of SD3's three cache part kinds (built on first use: needs torch)."""
    import torch

    from dtcompile.models.parts import BlockRun, TransformerPart

    class SD3Prologue(TransformerPart):
        """SD3Transformer2DModel.forward up to the first block: patch + position embedding, time/text embedding,
        context embedder; ``grid`` (latent rows x columns / patch, zeros) carries the size to the epilogue."""

        uses = ("pos_embed", "time_text_embed", "context_embedder")

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__(transformer)
            self.patch = int(model_config(transformer)["patch_size"])

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = dict(zip(GRAPH_INPUTS, inputs, strict=True))
            latent = x["hidden_states"]
            hidden = self.pos_embed(latent).contiguous()
            temb = self.time_text_embed(x["timestep"], x["pooled_projections"])
            context = self.context_embedder(x["encoder_hidden_states"])
            grid = latent.new_zeros(latent.shape[-2] // self.patch, latent.shape[-1] // self.patch)
            return hidden, context, temb, grid

    class SD3Blocks(BlockRun):
        """A run of consecutive MMDiT blocks. The last block of the model updates only ``hidden`` (its context
        output is None): ``context`` passes through unchanged, and nothing after it reads it."""

        def forward(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            for block in self.blocks:
                new_context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
                context = context if new_context is None else new_context
            return hidden, context

    class SD3Epilogue(TransformerPart):
        """norm_out (modulated by temb), proj_out and the unpatchify back to latents of ``grid``'s size."""

        uses = ("norm_out", "proj_out")

        def __init__(self, transformer: SD3Transformer2DModel) -> None:
            super().__init__(transformer)
            self.patch = int(model_config(transformer)["patch_size"])
            self.out_channels = int(transformer.out_channels)

        def forward(self, hidden: torch.Tensor, temb: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            p, c = self.patch, self.out_channels
            h, w = grid.shape[0], grid.shape[1]
            x = self.proj_out(self.norm_out(hidden, temb))
            x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
            return x.reshape(x.shape[0], c, h * p, w * p)

    return SD3Prologue, SD3Blocks, SD3Epilogue


class SD3CacheLayout(SplitLayout):
    """The SD3 transformer split for block caching (``dtcompile.models.base.CacheLayout``): the MMDiT blocks
    update ``hidden`` and ``context``; ``temb`` is computed once per call and ``grid`` (the latent size, which
    the unpatchify needs) goes from the prologue straight to the epilogue."""

    streams = ("hidden", "context")
    shared = ("temb",)
    carried = ("grid",)
    epilogue_inputs = ("hidden", "temb", "grid")

    part_classes = staticmethod(_cache_part_classes)

    @staticmethod
    def _widths(module: torch.nn.Module) -> tuple[int, int, int]:
        cfg = model_config(module)
        inner = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        return inner, int(cfg.get("caption_projection_dim") or inner), int(cfg["patch_size"])

    def tensor_dims(
        self, module: torch.nn.Module, dims: dict[str, tuple[int | str, ...]], symbolic: bool
    ) -> dict[str, tuple[int | str, ...]]:
        inner, caption, p = self._widths(module)
        batch, _, lh, lw = dims["hidden_states"]
        h, w = int(lh) // p, int(lw) // p  # SD3 sizes are fixed per artifact
        return {
            "hidden": (batch, h * w, inner),
            "context": (batch, dims["encoder_hidden_states"][1], caption),
            "temb": (batch, inner),
            # symbolic, so the epilogue's graph reads its size (static dims would be folded and the input dropped)
            "grid": ("grid_height", "grid_width") if symbolic else (h, w),
        }


def _vae_factor(config: Callable[[str], dict[str, Any] | None]) -> int:
    vae = config("vae") or {}
    return 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else 8


def _patch(config: Callable[[str], dict[str, Any] | None]) -> int:
    return int((config("transformer") or {}).get("patch_size", 2))


class SD3Adapter(AdapterBase):
    """SD3 / SD3.5 (medium, large, large-turbo): the ``transformer`` of a ``StableDiffusion3Pipeline``."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    negative_prompt = True  # classifier-free guidance: a negative prompt is used
    prompt_embeds_extra_tokens = CLIP_TOKENS  # prompt_embeds are CLIP tokens + T5 tokens
    guidance_branches = "batched"  # one transformer call on [uncond, cond]
    graph_inputs = GRAPH_INPUTS
    block_lists = (("transformer_blocks", "num_layers"),)  # SD3.5's dual-attention blocks are among them
    cache_layout_class = SD3CacheLayout
    # High precision for the embedders and the output layers (as for FLUX).
    default_exclude = ("*pos_embed*", "*context_embedder*", "*time_text_embed*", "*norm_out*", "proj_out")

    # other components that can become engines (recipe ``components``), besides the transformer
    aux_components: ClassVar[dict[str, str]] = {
        "text_encoder": "clip", "text_encoder_2": "clip", "text_encoder_3": "t5", "vae_decoder": "vae",
    }  # fmt: skip

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        return {"vae_scale_factor": int(pipe.vae_scale_factor)}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        """StableDiffusion3Pipeline reads each CLIP's projected pooled output and its penultimate hidden state
        (``clip_skip`` unset; 77 tokens), T5's hidden states (``max_sequence_length`` tokens) and ``vae.decode``."""
        if name in ("text_encoder", "text_encoder_2"):
            return TextEncoderGraph(name, ("text_embeds", "penultimate_hidden_state"), CLIP_TOKENS)
        if name == "text_encoder_3":
            return TextEncoderGraph(name, ("last_hidden_state",))
        if name == "vae_decoder":
            return VaeDecoderGraph(int(pipe_config["vae_scale_factor"]))
        raise UnsupportedError(f"components: StableDiffusion3Pipeline has no component {name!r}")

    @staticmethod
    def _shapes_at(module: torch.nn.Module, vsf: int, batch: int, height: int, width: int, text_len: int) -> dict:
        cfg = model_config(module)
        latent = (batch, int(cfg["in_channels"]), height // vsf, width // vsf)
        return {
            "hidden_states": latent,
            "encoder_hidden_states": (batch, CLIP_TOKENS + text_len, int(cfg["joint_attention_dim"])),
            "pooled_projections": (batch, int(cfg["pooled_projection_dim"])),
            "timestep": (batch,),
        }

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        """Symbolic batch (CFG doubles it), everything else at the artifact's one size; examples at opt."""

        dt = dtype_name(dtype)
        opt = self.shapes_at(module, pipe_config, shapes, lambda r: r.opt)
        cfg = model_config(module)
        inputs = [
            TensorSpec("hidden_states", dt, ("batch", *opt["hidden_states"][1:])),
            TensorSpec("encoder_hidden_states", dt, ("batch", *opt["encoder_hidden_states"][1:])),
            TensorSpec("pooled_projections", dt, ("batch", *opt["pooled_projections"][1:])),
            TensorSpec("timestep", dt, ("batch",)),
        ]
        out_ch = int(cfg.get("out_channels") or cfg["in_channels"])
        outputs = [TensorSpec("latent", dt, ("batch", out_ch, *opt["hidden_states"][2:]))]
        sample = ExampleSampler(opt, module, dtype)
        example = {name: sample.randn(name) for name in GRAPH_INPUTS[:3]}
        # StableDiffusion3Pipeline passes the scheduler's timesteps (0..1000) in the latents' dtype.
        example["timestep"] = sample.rand("timestep", 1000)
        return ExportSpec(inputs=inputs, outputs=outputs, example_inputs=example)

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        """Batch from the recipe's min (no CFG) to twice its opt and max (CFG); one image size and text length."""
        b = shapes.batch
        batch = pick(Range(b.min, 2 * b.opt, 2 * b.max))
        vsf = int(pipe_config["vae_scale_factor"])
        return self._shapes_at(module, vsf, batch, shapes.height.opt, shapes.width.opt, shapes.text_len.opt)

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """One image size per artifact, a multiple of the VAE factor x the patch size; T5 length <= 512."""
        if shapes.text_len.max > MAX_SEQUENCE_LENGTH:
            raise RecipeError(
                f"export.shapes.text_len.max: {shapes.text_len.max} is above {MAX_SEQUENCE_LENGTH}, the longest "
                "prompt StableDiffusion3Pipeline encodes (max_sequence_length)"
            )
        if shapes.text_len.min != shapes.text_len.max:
            raise RecipeError("export.shapes.text_len: SD3 engines take one text length; give a single number")
        check_one_size(
            shapes, "SD3", "diffusers crops the position embedding with Python integers, which the ONNX trace fixes"
        )
        try:
            self.check_image_size(shapes.height.opt, shapes.width.opt, config)
        except UnsupportedError as exc:
            raise RecipeError(f"export.shapes: {exc}") from None

    @staticmethod
    def check_image_size(height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        check_size_multiple(height, width, _vae_factor(config) * _patch(config), "the VAE factor x SD3's patch size")
