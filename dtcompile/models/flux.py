"""FLUX.1 family: the transformer's graph I/O, shape profiles and exclusions, plus a tiny built-in model.

Input: a diffusers ``FluxPipeline`` (its ``transformer`` component and ``vae_scale_factor``).
Output: ``ExportSpec`` / ``ShapeProfile`` for the export and build stages, and ``generate_tiny_flux``, which
writes a randomly initialised, seeded FLUX pipeline small enough for CPU tests.

Importing this module loads no torch, diffusers or transformers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, ShapeProfile, Shapes, TensorSpec
from dtcompile.models.base import ExampleSampler, GenerationRequest, SplitLayout, attention_dims
from dtcompile.models.builtin import BuiltinModel, seeded_modules
from dtcompile.models.components import AuxGraph, TextEncoderGraph, VaeDecoderGraph
from dtcompile.models.tiny_text import TOKENIZER_CODE, build_tiny_tokenizers

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------------------------------
# Tiny built-in pipeline
# --------------------------------------------------------------------------------------------------

# Bump when generate_tiny_flux changes what it writes: it is part of the built-in cache key.
TINY_FLUX_VERSION = 1

# Words that get whole-word tokens in both tokenizers; anything else falls back to characters (CLIP: bytes).
_TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "photo", "painting", "picture", "portrait",
    "cat", "dog", "bird", "horse", "fox", "robot", "astronaut", "man", "woman", "child", "tree", "forest",
    "mountain", "river", "sea", "ocean", "city", "street", "house", "castle", "car", "boat", "sky", "sun",
    "moon", "star", "night", "day", "snow", "rain", "red", "green", "blue", "yellow", "black", "white",
    "small", "big", "old", "young", "cute", "happy", "beautiful", "detailed", "high", "quality", "style",
    "oil", "watercolor", "digital", "art", "cinematic", "lighting", "sitting", "riding", "standing", "flying",
)  # fmt: skip

# Configs of every component, as plain data (hashed into the cache key). Shapes mirror FLUX.1-dev, scaled
# down: head_dim 16 and every width a multiple of 16 so fp8/int8/nvfp4 paths see realistic alignment.
TINY_FLUX_CONFIG: dict[str, Any] = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 16,  # 4 VAE latent channels x 2x2 packed patch
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 32,  # = T5 d_model
        "pooled_projection_dim": 32,  # = CLIP hidden_size (FluxPipeline pools CLIP's pooler_output)
        "guidance_embeds": True,  # like FLUX.1-dev
        "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32],  # 2 blocks -> vae_scale_factor 2: sizes must divide by 4
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 0.3611,  # FLUX.1's values
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    },
    "text_encoder": {  # CLIPTextConfig; vocab_size and special token ids are filled in from the tokenizer
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    "text_encoder_2": {  # T5Config (v1.1 style, like FLUX's T5-XXL)
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
    },
    "scheduler": {  # FLUX.1-dev's FlowMatchEulerDiscreteScheduler config
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "tokenizer_words": list(_TINY_WORDS),
    "tokenizer_max_length": 77,
    "tokenizer_2_max_length": 512,
}


def build_tiny_flux(seed: int = 0, config: dict[str, Any] = TINY_FLUX_CONFIG) -> Any:
    """A randomly initialised ``FluxPipeline`` from ``config``; the same seed gives the same weights.

    Every component is initialised from its own seed (``seed``, ``seed + 1``, ...) inside a forked RNG, so
    the result depends neither on construction order elsewhere nor on the caller's global RNG state.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_tiny_tokenizers(config)
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config["text_encoder"],
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        **config["text_encoder_2"],
    )
    transformer_config = dict(config["transformer"], axes_dims_rope=tuple(config["transformer"]["axes_dims_rope"]))

    transformer, vae, text_encoder, text_encoder_2 = seeded_modules(
        seed,
        lambda: FluxTransformer2DModel(**transformer_config),
        lambda: AutoencoderKL(**config["vae"]),
        lambda: CLIPTextModel(clip_config),
        lambda: T5EncoderModel(t5_config),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def generate_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny FLUX pipeline to ``out_dir`` in diffusers' layout; load it with ``from_pretrained``."""
    out_dir = Path(out_dir)
    build_tiny_flux(seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# FLUX.1-dev's transformer at its real widths but with 1 double + 1 single block, around tiny text encoders
# (whose output widths match what the transformer reads: T5 4096, CLIP pooled 768) and a tiny 4-level VAE
# (scale factor 8 and 16 latent channels, like FLUX.1's): real per-block cost and real token counts, ~2.2 GB.
REALWIDTH_FLUX_VERSION = 1
#: FLUX.1-dev transformer widths (everything but the block counts), shared by the built-in and the benchmarks.
FLUX_DEV_WIDTHS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
REALWIDTH_FLUX_CONFIG: dict[str, Any] = {
    **TINY_FLUX_CONFIG,
    "transformer": {
        **TINY_FLUX_CONFIG["transformer"],
        **FLUX_DEV_WIDTHS,
        "num_layers": 1,
        "num_single_layers": 1,
    },
    "vae": {
        **TINY_FLUX_CONFIG["vae"],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "latent_channels": 16,
    },
    "text_encoder": {
        **TINY_FLUX_CONFIG["text_encoder"],
        "hidden_size": 768,
        "num_hidden_layers": 1,
        "num_attention_heads": 12,
    },
    "text_encoder_2": {**TINY_FLUX_CONFIG["text_encoder_2"], "d_model": 4096, "d_kv": 64, "num_layers": 1},
}


def generate_flux_realwidth(out_dir: Path, seed: int = 0) -> Path:
    """Write the real-width FLUX pipeline (1+1 blocks, tiny text encoders and VAE) to ``out_dir``."""
    out_dir = Path(out_dir)
    build_tiny_flux(seed, REALWIDTH_FLUX_CONFIG).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# Functions every built-in's files depend on (their source is part of the cache key).
_GENERATOR_CODE = (*TOKENIZER_CODE, build_tiny_flux)


def _builtin(
    name: str, description: str, generate: Callable[[Path], Path], config: dict[str, Any], version: int
) -> BuiltinModel:
    return BuiltinModel(name, "flux", description, generate, config, version, (*_GENERATOR_CODE, generate))


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        _builtin(
            "tiny-flux",
            "random-weight FLUX.1-dev lookalike (2+2 blocks, width 64, ~3 MB) for offline tests",
            generate_tiny_flux,
            TINY_FLUX_CONFIG,
            TINY_FLUX_VERSION,
        ),
        _builtin(
            "flux-realwidth-1",
            "random-weight FLUX.1-dev transformer at real widths, 1+1 blocks, tiny encoders (~2.2 GB)",
            generate_flux_realwidth,
            REALWIDTH_FLUX_CONFIG,
            REALWIDTH_FLUX_VERSION,
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------------

#: The two block lists of a FluxTransformer2DModel, in execution order.
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
#: FluxPipeline refuses a longer ``max_sequence_length`` (its T5 encoder's limit).
MAX_SEQUENCE_LENGTH = 512
GUIDANCE_SCALE_EXAMPLE = 3.5  # FLUX.1-dev's default guidance_scale, used for example inputs


def validate_image_size(height: int, width: int, vae_scale_factor: int) -> None:
    """Raise UnsupportedError unless height and width divide by ``2 * vae_scale_factor``.

    FLUX packs 2x2 latent patches into one token, so pixel sizes must be multiples of twice the VAE's
    downsampling factor (16 for FLUX.1); FluxPipeline would otherwise silently round the size down.
    """
    multiple = 2 * vae_scale_factor
    for what, size in (("height", height), ("width", width)):
        if size <= 0 or size % multiple:
            lower = max(multiple, size // multiple * multiple)
            raise UnsupportedError(
                f"image {what} {size} is not a positive multiple of {multiple} (FLUX packs 2x2 latent patches "
                f"and the VAE downsamples by {vae_scale_factor}); use e.g. {lower} or {lower + multiple}"
            )


def _vae_factor(config: Callable[[str], dict[str, Any] | None]) -> int:
    """FluxPipeline.vae_scale_factor from the VAE's config; FLUX.1's (8) when the config is not at hand."""
    vae = config("vae") or {}
    return 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else 8


def img_tokens(height: int, width: int, vae_scale_factor: int) -> int:
    """Number of image tokens FluxPipeline feeds the transformer for a ``height`` x ``width`` image."""
    validate_image_size(height, width, vae_scale_factor)
    patch = 2 * vae_scale_factor
    return (height // patch) * (width // patch)


def latent_image_ids(height: int, width: int, vae_scale_factor: int, device: Any = None) -> torch.Tensor:
    """The (img_tokens, 3) float32 position ids FluxPipeline builds: (0, row, column) per packed patch."""
    import torch

    validate_image_size(height, width, vae_scale_factor)
    rows, cols = height // (2 * vae_scale_factor), width // (2 * vae_scale_factor)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: The transformer's graph inputs in order (``guidance`` only for guidance-distilled models).
GRAPH_INPUTS = (
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
)


def graph_kwargs(inputs: tuple[Any, ...]) -> dict[str, Any]:
    """The transformer's keyword arguments for graph inputs given positionally, in ``GRAPH_INPUTS`` order."""
    if not len(GRAPH_INPUTS) - 1 <= len(inputs) <= len(GRAPH_INPUTS):
        raise TypeError(f"FLUX graph takes {len(GRAPH_INPUTS) - 1} or {len(GRAPH_INPUTS)} inputs, got {len(inputs)}")
    return dict(zip(GRAPH_INPUTS, inputs, strict=False))


@functools.cache
def _export_wrapper_class() -> type:
    """The nn.Module class wrapping a FluxTransformer2DModel for export (built on first use: needs torch)."""
    import torch

    class FluxTransformerForExport(torch.nn.Module):
        """Takes the graph inputs positionally and returns the transformer's noise prediction tensor."""

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.transformer(**graph_kwargs(inputs), return_dict=False)[0]

    return FluxTransformerForExport


@functools.cache
def _cache_part_classes() -> tuple[type, type, type]:
    """The nn.Module classes of the three cache part kinds (built on first use: needs torch)."""
    import torch

    class FluxPrologue(torch.nn.Module):
        """FluxTransformer2DModel.forward up to the first block: embedders and rotary embedding."""

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.x_embedder = transformer.x_embedder
            self.time_text_embed = transformer.time_text_embed
            self.context_embedder = transformer.context_embedder
            self.pos_embed = transformer.pos_embed

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = graph_kwargs(inputs)
            hidden = self.x_embedder(x["hidden_states"])
            timestep = x["timestep"].to(hidden.dtype) * 1000
            pooled, guidance = x["pooled_projections"], x.get("guidance")
            if guidance is None:
                temb = self.time_text_embed(timestep, pooled)
            else:
                temb = self.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
            context = self.context_embedder(x["encoder_hidden_states"])
            rope_cos, rope_sin = self.pos_embed(torch.cat((x["txt_ids"], x["img_ids"]), dim=0))
            return hidden, context, temb, rope_cos, rope_sin

    class FluxBlocks(torch.nn.Module):
        """A run of consecutive transformer blocks (double- and/or single-stream; both take and return both streams)."""

        def __init__(self, blocks: list[torch.nn.Module]) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(blocks)

        def forward(
            self,
            hidden: torch.Tensor,
            context: torch.Tensor,
            temb: torch.Tensor,
            rope_cos: torch.Tensor,
            rope_sin: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            for block in self.blocks:
                context, hidden = block(
                    hidden_states=hidden,
                    encoder_hidden_states=context,
                    temb=temb,
                    image_rotary_emb=(rope_cos, rope_sin),
                )
            return hidden, context

    class FluxEpilogue(torch.nn.Module):
        """The output norm (modulated by temb) and projection."""

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.norm_out = transformer.norm_out
            self.proj_out = transformer.proj_out

        def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
            return self.proj_out(self.norm_out(hidden, temb))

    return FluxPrologue, FluxBlocks, FluxEpilogue


class FluxCacheLayout(SplitLayout):
    """The FLUX transformer split for block caching (``dtcompile.models.base.CacheLayout``).

    The prologue runs the embedders (``hidden`` from x_embedder, ``context`` from context_embedder, ``temb``
    from time_text_embed of timestep, guidance and pooled projections) and the rotary embedding of the text +
    image ids (``rope_cos``/``rope_sin``); every block updates both streams; the epilogue is norm_out + proj_out.
    """

    streams = ("hidden", "context")
    shared = ("temb", "rope_cos", "rope_sin")
    carried: tuple[str, ...] = ()
    epilogue_inputs = ("hidden", "temb")

    part_classes = staticmethod(_cache_part_classes)

    def intermediate_specs(self, module: torch.nn.Module, mono: ExportSpec, dtype: str) -> dict[str, TensorSpec]:
        width, head = attention_dims(module.config)
        text = next(t for t in mono.inputs if t.name == "encoder_hidden_states").dims[1]
        return {
            "hidden": TensorSpec("hidden", dtype, ("batch", "img_tokens", width)),
            "context": TensorSpec("context", dtype, ("batch", text, width)),
            "temb": TensorSpec("temb", dtype, ("batch", width)),
            "rope_cos": TensorSpec("rope_cos", "float32", ("rope_tokens", head)),
            "rope_sin": TensorSpec("rope_sin", "float32", ("rope_tokens", head)),
        }

    def intermediate_shapes(
        self, module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        width, head = attention_dims(module.config)
        batch, img, _ = shapes["hidden_states"]
        text = shapes["encoder_hidden_states"][1]
        return {
            "hidden": (batch, img, width),
            "context": (batch, text, width),
            "temb": (batch, width),
            "rope_cos": (text + img, head),
            "rope_sin": (text + img, head),
        }


class FluxAdapter:
    """FLUX.1 (dev/schnell and fine-tunes): the ``transformer`` of a ``FluxPipeline`` becomes the engine.

    Graph inputs follow NVIDIA's TensorRT diffusion demo: hidden_states, encoder_hidden_states,
    pooled_projections, timestep, img_ids, txt_ids and, for guidance-distilled models, guidance.
    dtypes: ids and guidance are float32 (the transformer turns ids into RoPE in float32/64 anyway, and
    FluxPipeline passes guidance as float32); everything else is the build dtype.
    """

    family = "flux"
    pipeline_class = "FluxPipeline"
    component = "transformer"
    reference_image = False
    video = False
    negative_prompt = False  # guidance-distilled: FluxPipeline's negative prompt needs true_cfg_scale, not used
    # Modules ModelOpt's FLUX example keeps in high precision: embedders, the output norm and projection.
    default_exclude = ("*x_embedder*", "*context_embedder*", "*time_text_embed*", "*norm_out*", "proj_out")

    @staticmethod
    def block_names(config: dict[str, Any]) -> list[str]:
        """Block names of a FLUX transformer config, in execution order (double-stream, then single-stream)."""
        if "num_layers" not in config or "num_single_layers" not in config:
            raise UnsupportedError(
                "cache: only FLUX transformers (transformer_blocks + single_transformer_blocks; config keys "
                "num_layers and num_single_layers) can be split into block engines; remove the cache section"
            )
        n_double, n_single = int(config["num_layers"]), int(config["num_single_layers"])
        return [f"{DOUBLE}.{i}" for i in range(n_double)] + [f"{SINGLE}.{i}" for i in range(n_single)]

    @staticmethod
    def hidden_width(config: dict[str, Any]) -> int:
        """The transformer's hidden width (heads x head dim) from its config; 0 when the config lacks them."""
        return int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))

    # other components that can become engines (recipe ``components``), besides the transformer
    aux_components: ClassVar[dict[str, str]] = {"text_encoder": "clip", "text_encoder_2": "t5", "vae_decoder": "vae"}

    def denoisers(self, model_index: dict[str, Any]) -> tuple[str, ...]:
        return (self.component,)

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        """The pipeline facts the adapter needs (``pipe_config`` of the other methods) from a FluxPipeline."""
        return {"vae_scale_factor": int(pipe.vae_scale_factor), "tokenizer_max_length": int(pipe.tokenizer_max_length)}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        """FluxPipeline reads CLIP's ``pooler_output`` (77 tokens), T5's hidden states (``max_sequence_length``
        tokens) and ``vae.decode``."""
        if name == "text_encoder":
            return TextEncoderGraph(name, ("last_hidden_state", "pooler_output"), pipe_config["tokenizer_max_length"])
        if name == "text_encoder_2":
            return TextEncoderGraph(name, ("last_hidden_state",))
        if name == "vae_decoder":
            return VaeDecoderGraph(self._vae_scale_factor(pipe_config))
        raise UnsupportedError(f"components: FluxPipeline has no component {name!r}")

    @staticmethod
    def _channels(module: torch.nn.Module) -> dict[str, Any]:
        cfg = module.config
        return {
            "in": int(cfg["in_channels"]),
            "out": int(cfg.get("out_channels") or cfg["in_channels"]) * int(cfg.get("patch_size", 1)) ** 2,
            "joint": int(cfg["joint_attention_dim"]),
            "pooled": int(cfg["pooled_projection_dim"]),
            "guidance": bool(cfg.get("guidance_embeds", False)),
        }

    @staticmethod
    def _vae_scale_factor(pipe_config: dict[str, Any]) -> int:
        if "vae_scale_factor" not in pipe_config:
            raise UnsupportedError("FLUX pipe_config needs 'vae_scale_factor' (FluxPipeline.vae_scale_factor)")
        return int(pipe_config["vae_scale_factor"])

    def _shapes_at(
        self,
        module: torch.nn.Module,
        vae_scale_factor: int,
        batch: int,
        height: int,
        width: int,
        text_len: int,
    ) -> dict[str, tuple[int, ...]]:
        ch = self._channels(module)
        tokens = img_tokens(height, width, vae_scale_factor)
        shapes = {
            "hidden_states": (batch, tokens, ch["in"]),
            "encoder_hidden_states": (batch, text_len, ch["joint"]),
            "pooled_projections": (batch, ch["pooled"]),
            "timestep": (batch,),
            "img_ids": (tokens, 3),
            "txt_ids": (text_len, 3),
        }
        if ch["guidance"]:
            shapes["guidance"] = (batch,)
        return shapes

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        """I/O specs with symbolic batch/img_tokens (and text_len when it varies), example inputs at opt."""
        import torch

        vsf = self._vae_scale_factor(pipe_config)
        ch = self._channels(module)
        text: int | str = "text_len" if shapes.text_len.min != shapes.text_len.max else shapes.text_len.opt
        dt, f32 = _dtype_name(dtype), "float32"
        inputs = [
            TensorSpec("hidden_states", dt, ("batch", "img_tokens", ch["in"])),
            TensorSpec("encoder_hidden_states", dt, ("batch", text, ch["joint"])),
            TensorSpec("pooled_projections", dt, ("batch", ch["pooled"])),
            TensorSpec("timestep", dt, ("batch",)),
            TensorSpec("img_ids", f32, ("img_tokens", 3)),
            TensorSpec("txt_ids", f32, (text, 3)),
        ]
        if ch["guidance"]:
            inputs.append(TensorSpec("guidance", f32, ("batch",)))
        outputs = [TensorSpec("latent", dt, ("batch", "img_tokens", ch["out"]))]

        b, h, w, t = shapes.batch.opt, shapes.height.opt, shapes.width.opt, shapes.text_len.opt
        opt = self._shapes_at(module, vsf, b, h, w, t)
        sample = ExampleSampler(opt, module, dtype)
        device = sample.device
        example: dict[str, Any] = {
            "hidden_states": sample.randn("hidden_states"),
            "encoder_hidden_states": sample.randn("encoder_hidden_states"),
            "pooled_projections": sample.randn("pooled_projections"),
            # FluxPipeline passes sigma-like timesteps (t / 1000, in [0, 1]) in the latents' dtype.
            "timestep": sample.rand("timestep"),
            "img_ids": latent_image_ids(h, w, vsf, device=device),
            "txt_ids": torch.zeros(opt["txt_ids"], device=device),  # FluxPipeline's text ids are all zero
        }
        if ch["guidance"]:
            example["guidance"] = torch.full(opt["guidance"], GUIDANCE_SCALE_EXAMPLE, device=device)
        return ExportSpec(inputs=inputs, outputs=outputs, example_inputs=example)

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Wrap the transformer: positional graph inputs in, the ``latent`` tensor out."""
        return _export_wrapper_class()(module)

    def shape_profile(self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes) -> ShapeProfile:
        """Concrete min/opt/max shapes of every input (image tokens follow from height x width)."""
        vsf = self._vae_scale_factor(pipe_config)

        # img_tokens() validates each of height/width's min, opt and max.
        def at(pick: Callable[[Range], int]) -> dict[str, tuple[int, ...]]:
            return self._shapes_at(
                module,
                vsf,
                pick(shapes.batch),
                pick(shapes.height),
                pick(shapes.width),
                pick(shapes.text_len),
            )

        return ShapeProfile.over_ranges(at)

    def export_patches(self) -> tuple[str, ...]:
        """Upstream patches the ONNX export needs, by name (``dtcompile.export.patches.PATCHES``): diffusers'
        ``apply_rotary_emb`` traces its reshape with constant shapes, ``dynamic_rope`` keeps it dynamic."""
        return ("dynamic_rope",)

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Pixel sizes must be multiples of 2 x the VAE's factor (FluxPipeline would round them down silently);
        the text length at most FluxPipeline's ``max_sequence_length`` limit (512)."""
        text = shapes.text_len
        if text.max > MAX_SEQUENCE_LENGTH:
            raise RecipeError(
                f"export.shapes.text_len.max: {text.max} is above {MAX_SEQUENCE_LENGTH}, the longest prompt "
                "FluxPipeline encodes (max_sequence_length)"
            )
        vsf = _vae_factor(config)
        for var in ("height", "width"):
            r = getattr(shapes, var)
            for which in ("min", "opt", "max"):
                try:
                    validate_image_size(getattr(r, which), getattr(r, which), vsf)
                except UnsupportedError as exc:
                    raise RecipeError(
                        f"export.shapes.{var}.{which}: {str(exc).removeprefix('image height ')}"
                    ) from None

    @staticmethod
    def check_image_size(height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        validate_image_size(height, width, _vae_factor(config))

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """FluxPipeline's keyword arguments (``max_sequence_length`` is the T5 text length)."""
        kwargs: dict[str, Any] = {
            "prompt": request.prompt,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "generator": request.generator,
            "num_images_per_prompt": request.images_per_prompt,
            "output_type": request.output_type,
        }
        if request.guidance is not None:
            kwargs["guidance_scale"] = request.guidance
        if request.text_len is not None:
            kwargs["max_sequence_length"] = request.text_len
        if request.callback is not None:
            kwargs["callback_on_step_end"] = request.callback
        return kwargs

    @staticmethod
    def output_media(output: Any) -> list[Any]:
        """FluxPipeline returns images (``FluxPipelineOutput.images``)."""
        return list(output.images)

    @staticmethod
    def cache_layout() -> FluxCacheLayout:
        return FluxCacheLayout()
