"""FLUX.2 (dev): the ``transformer`` (Flux2Transformer2DModel) of a ``Flux2Pipeline``.

FLUX.2 keeps FLUX.1's packing (2x2 latent patches, one token each) and its double- then single-stream blocks,
but reads one text embedding: the Mistral-3 text encoder's hidden states of three layers stacked on the
feature axis (``joint_attention_dim`` = 3 x the encoder width), with no pooled projection. Position ids have
four axes (time, row, column, layer) and the pipeline passes them batched, ``(batch, tokens, 4)``; the
transformer reads the first row. Guidance is distilled into the model (``guidance_embeds``): no negative prompt.

The tiny built-in's tokenizer is a Mistral-style chat tokenizer built in code (``tiny_text``); FLUX.2-dev's
own is a ``PixtralProcessor``, which transformers loads only with torchvision installed.

Importing this module loads no torch, diffusers or transformers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.errors import UnsupportedError
from dtcompile.core.graph import ExportSpec, Shapes, TensorSpec
from dtcompile.models.base import ExampleSampler
from dtcompile.models.builtin import BuiltinModel, seeded_modules
from dtcompile.models.components import AuxGraph
from dtcompile.models.flux import _TINY_WORDS, FluxAdapter, img_tokens, validate_image_size
from dtcompile.models.tiny_text import MISTRAL_TOKENIZER_CODE, build_tiny_mistral_tokenizer

if TYPE_CHECKING:
    import torch

# Bump when build_tiny_flux2 changes what it writes: it is part of the built-in cache key.
TINY_FLUX2_VERSION = 1

# FLUX.2-dev's layout scaled down: head_dim 16 and widths multiples of 16 (fp8/int8/nvfp4 alignment). The text
# encoder has 30 layers because Flux2Pipeline stacks hidden states 10, 20 and 30 (``text_encoder_out_layers``).
TINY_FLUX2_CONFIG: dict[str, Any] = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 16,  # 4 VAE latent channels x 2x2 patch
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 96,  # 3 stacked layers x the text encoder's hidden_size
        "timestep_guidance_channels": 32,
        "mlp_ratio": 3.0,
        "axes_dims_rope": [4, 4, 4, 4],  # sums to attention_head_dim
        "rope_theta": 2000,
        "guidance_embeds": True,
    },
    "vae": {  # AutoencoderKLFlux2: latents are 2x2-patchified and batch-normalised by the pipeline
        "block_out_channels": [16, 32],  # vae_scale_factor 2: sizes must divide by 4
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    "text_encoder": {  # Mistral3Config: text_config (MistralConfig) and a tiny Pixtral vision tower
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 30,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 1024,
        },
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "patch_size": 4,
            "image_size": 32,
        },
        "spatial_merge_size": 1,
        "vision_feature_layer": -1,
    },
    "scheduler": {  # FLUX.2-dev's FlowMatchEulerDiscreteScheduler config
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "time_shift_type": "exponential",
    },
    "tokenizer_words": list(_TINY_WORDS),
    "tokenizer_max_length": 512,
}


def build_tiny_flux2(seed: int = 0, config: dict[str, Any] = TINY_FLUX2_CONFIG) -> Any:
    """A randomly initialised ``Flux2Pipeline`` from ``config``; the same seed gives the same weights (each
    component from its own seed inside a forked RNG, as ``flux.build_tiny_flux``)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tokenizer = build_tiny_mistral_tokenizer(config["tokenizer_words"], config["tokenizer_max_length"])
    te = config["text_encoder"]
    text_config = MistralConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **te["text_config"],
    )
    mistral_config = Mistral3Config(
        text_config=text_config,
        vision_config=PixtralVisionConfig(**te["vision_config"]),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=te["spatial_merge_size"],
        vision_feature_layer=te["vision_feature_layer"],
    )
    transformer_config = dict(config["transformer"], axes_dims_rope=tuple(config["transformer"]["axes_dims_rope"]))
    vae_config = {k: tuple(v) if isinstance(v, list) else v for k, v in config["vae"].items()}

    transformer, vae, text_encoder = seeded_modules(
        seed,
        lambda: Flux2Transformer2DModel(**transformer_config),
        lambda: AutoencoderKLFlux2(**vae_config),
        lambda: Mistral3ForConditionalGeneration(mistral_config),
    )
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def generate_tiny_flux2(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny FLUX.2 pipeline to ``out_dir`` in diffusers' layout; load it with ``from_pretrained``."""
    out_dir = Path(out_dir)
    build_tiny_flux2(seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


BUILTINS: dict[str, BuiltinModel] = {
    "tiny-flux2": BuiltinModel(
        "tiny-flux2",
        "flux2",
        "random-weight FLUX.2-dev lookalike (2+2 blocks, width 64, 30-layer tiny Mistral-3, ~4 MB) for offline tests",
        generate_tiny_flux2,
        TINY_FLUX2_CONFIG,
        TINY_FLUX2_VERSION,
        (*MISTRAL_TOKENIZER_CODE, build_tiny_flux2, generate_tiny_flux2),
    )
}


# --------------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------------

#: The transformer's graph inputs in order (``guidance`` only for guidance-distilled models).
GRAPH_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "guidance")
#: Why a cache section is refused for FLUX.2.
_NO_CACHE = (
    "cache: Flux2Pipeline artifacts are not split into block engines yet (FLUX.2's blocks share modulation "
    "tensors FLUX.1's split does not carry); remove the cache section"
)
#: Flux2Pipeline's default guidance_scale, used for example inputs.
GUIDANCE_SCALE_EXAMPLE = 4.0


def position_ids(rows: int, cols: int, batch: int, device: Any = None) -> torch.Tensor:
    """The (batch, rows x cols, 4) float32 latent ids Flux2Pipeline builds: (0, row, column, 0) per token."""
    import torch

    ids = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(cols), torch.arange(1))
    return ids.float().unsqueeze(0).expand(batch, -1, -1).contiguous().to(device)


def text_ids(text_len: int, batch: int, device: Any = None) -> torch.Tensor:
    """The (batch, text_len, 4) float32 text ids Flux2Pipeline builds: (0, 0, 0, position) per token."""
    import torch

    ids = torch.zeros(text_len, 4)
    ids[:, 3] = torch.arange(text_len)
    return ids.unsqueeze(0).expand(batch, -1, -1).contiguous().to(device)


@functools.cache
def _export_wrapper_class() -> type:
    """The nn.Module class wrapping a Flux2Transformer2DModel for export (built on first use: needs torch)."""
    import torch

    class Flux2TransformerForExport(torch.nn.Module):
        """Takes the graph inputs positionally and returns the transformer's noise prediction tensor."""

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(GRAPH_INPUTS, inputs, strict=False))
            return self.transformer(**kwargs, return_dict=False)[0]

    return Flux2TransformerForExport


class Flux2Adapter(FluxAdapter):
    """FLUX.2: FLUX.1's image-token layout and size rules; its own graph I/O (one text embedding, 4-axis batched
    ids, no pooled projection) and exclusions. Text-to-image: reference images (FLUX.2's multi-reference
    editing) and block caching are refused by name."""

    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    # ModelOpt's FLUX practice applied to FLUX.2's names: embedders, the shared modulation MLPs, output layers.
    default_exclude = (
        "*x_embedder*",
        "*context_embedder*",
        "*time_guidance_embed*",
        "*_modulation*",
        "*norm_out*",
        "proj_out",
    )
    # vae_decoder: the pipeline reads vae.bn's running statistics, which an engine stand-in does not carry;
    # text_encoder: Mistral-3's hidden states of three layers, not a graph output yet.
    aux_components: ClassVar[dict[str, str]] = {}

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        return {"vae_scale_factor": int(pipe.vae_scale_factor), "tokenizer_max_length": int(pipe.tokenizer_max_length)}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        raise UnsupportedError(
            f"components: {name} of a Flux2Pipeline cannot become an engine yet (the transformer only)"
        )

    @staticmethod
    def _channels(module: torch.nn.Module) -> dict[str, Any]:
        cfg = module.config
        return {
            "in": int(cfg["in_channels"]),
            "out": int(cfg.get("out_channels") or cfg["in_channels"]) * int(cfg.get("patch_size", 1)) ** 2,
            "joint": int(cfg["joint_attention_dim"]),
            "guidance": bool(cfg.get("guidance_embeds", False)),
        }

    def _shapes_at(
        self, module: torch.nn.Module, vae_scale_factor: int, batch: int, height: int, width: int, text_len: int
    ) -> dict[str, tuple[int, ...]]:
        ch = self._channels(module)
        tokens = img_tokens(height, width, vae_scale_factor)
        shapes = {
            "hidden_states": (batch, tokens, ch["in"]),
            "encoder_hidden_states": (batch, text_len, ch["joint"]),
            "timestep": (batch,),
            "img_ids": (batch, tokens, 4),
            "txt_ids": (batch, text_len, 4),
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
        dt, f32 = str(dtype).removeprefix("torch."), "float32"
        inputs = [
            TensorSpec("hidden_states", dt, ("batch", "img_tokens", ch["in"])),
            TensorSpec("encoder_hidden_states", dt, ("batch", text, ch["joint"])),
            TensorSpec("timestep", dt, ("batch",)),
            # Flux2Pipeline passes int64 ids; the transformer casts them to float32 first, so the graph takes
            # float32 (exact for positions below 2**24) and the runtime casts the pipeline's ids on the way in.
            TensorSpec("img_ids", f32, ("batch", "img_tokens", 4)),
            TensorSpec("txt_ids", f32, ("batch", text, 4)),
        ]
        if ch["guidance"]:
            inputs.append(TensorSpec("guidance", f32, ("batch",)))
        outputs = [TensorSpec("latent", dt, ("batch", "img_tokens", ch["out"]))]

        b, h, w, t = shapes.batch.opt, shapes.height.opt, shapes.width.opt, shapes.text_len.opt
        opt = self._shapes_at(module, vsf, b, h, w, t)
        sample = ExampleSampler(opt, module, dtype)
        validate_image_size(h, w, vsf)
        rows, cols = h // (2 * vsf), w // (2 * vsf)
        example: dict[str, Any] = {
            "hidden_states": sample.randn("hidden_states"),
            "encoder_hidden_states": sample.randn("encoder_hidden_states"),
            "timestep": sample.rand("timestep"),  # t / 1000 in [0, 1], in the latents' dtype
            "img_ids": position_ids(rows, cols, b, device=sample.device),
            "txt_ids": text_ids(t, b, device=sample.device),
        }
        if ch["guidance"]:
            example["guidance"] = torch.full(opt["guidance"], GUIDANCE_SCALE_EXAMPLE, device=sample.device)
        return ExportSpec(inputs=inputs, outputs=outputs, example_inputs=example)

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _export_wrapper_class()(module)

    @staticmethod
    def output_media(output: Any) -> list[Any]:
        """Flux2Pipeline returns images (``Flux2PipelineOutput.images``)."""
        return list(output.images)

    @staticmethod
    def block_names(config: dict[str, Any]) -> list[str]:
        raise UnsupportedError(_NO_CACHE)

    @staticmethod
    def cache_layout() -> Any:
        raise UnsupportedError(_NO_CACHE)


__all__ = ["BUILTINS", "GRAPH_INPUTS", "Flux2Adapter", "build_tiny_flux2", "generate_tiny_flux2"]
