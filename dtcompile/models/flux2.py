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

from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.components import AuxGraph
from dtcompile.models.examples import ExampleSampler
from dtcompile.models.flux import _TINY_WORDS, FLUX_DEV_SCHEDULER, FluxAdapter
from dtcompile.models.tiny_text import MISTRAL_TOKENIZER_CODE, build_tiny_mistral_tokenizer

if TYPE_CHECKING:
    from collections.abc import Callable

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
    "scheduler": {**FLUX_DEV_SCHEDULER, "time_shift_type": "exponential"},  # FLUX.2-dev's
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

    modules = seeded_components(
        seed,
        transformer=lambda: Flux2Transformer2DModel(**transformer_config),
        vae=lambda: AutoencoderKLFlux2(**vae_config),
        text_encoder=lambda: Mistral3ForConditionalGeneration(mistral_config),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    return Flux2Pipeline(scheduler=scheduler, tokenizer=tokenizer, **modules)


BUILTINS = by_name(
    BuiltinModel(
        "tiny-flux2",
        "flux2",
        "random-weight FLUX.2-dev lookalike (2+2 blocks, width 64, 30-layer tiny Mistral-3, ~4 MB) for offline tests",
        build_tiny_flux2,
        TINY_FLUX2_CONFIG,
        TINY_FLUX2_VERSION,
        MISTRAL_TOKENIZER_CODE,
    )
)


# --------------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------------

#: The transformer's graph inputs in order (``guidance`` only for guidance-distilled models).
GRAPH_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "guidance")
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


#: The hidden-state layers Flux2Pipeline stacks by default (its ``text_encoder_out_layers``), which dtc runs with.
TEXT_ENCODER_OUT_LAYERS = (10, 20, 30)


def check_out_layers(encoder_config: dict[str, Any] | None) -> None:
    """RecipeError when the text encoder has fewer layers than ``TEXT_ENCODER_OUT_LAYERS`` reads (its config
    unknown: nothing to check)."""
    if not isinstance(encoder_config, dict):
        return
    nested = encoder_config.get("text_config")
    text = nested if isinstance(nested, dict) else encoder_config
    layers = text.get("num_hidden_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers < max(TEXT_ENCODER_OUT_LAYERS):
        raise RecipeError(
            f"model.source: the text encoder has {layers} layers, but Flux2Pipeline stacks the hidden states of "
            f"layers {', '.join(map(str, TEXT_ENCODER_OUT_LAYERS))} (text_encoder_out_layers) and dtc runs it with "
            "that default; a model that needs another text_encoder_out_layers is not supported yet"
        )


class Flux2Adapter(FluxAdapter):
    """FLUX.2: FLUX.1's image-token layout and size rules; its own graph I/O (one text embedding, 4-axis batched
    ids, no pooled projection) and exclusions. Text-to-image: reference images (FLUX.2's multi-reference
    editing) and block caching are refused by name."""

    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    graph_inputs = GRAPH_INPUTS
    guidance_example = GUIDANCE_SCALE_EXAMPLE
    # Flux2Pipeline passes int64 ids; the transformer casts them to float32 first, so the graph takes float32
    # (exact for positions below 2**24) and the runtime casts the pipeline's ids on the way in.
    id_layout = (("batch",), 4)
    cache_layout_class = None
    no_cache_reason = " (FLUX.2's blocks share modulation tensors FLUX.1's split does not carry)"
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

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        raise UnsupportedError(
            f"components: {name} of a Flux2Pipeline cannot become an engine yet (the transformer only)"
        )

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """FLUX.1's rules, and a text encoder deep enough for the hidden states Flux2Pipeline stacks: dtc runs the
        pipeline with its default ``text_encoder_out_layers`` (10, 20, 30), so an encoder of fewer layers (a config
        that needs another setting) is refused here, naming it, instead of an IndexError at calibration or run."""
        super().check_shapes(shapes, config)
        check_out_layers(config("text_encoder"))

    def _examples(self, sample: ExampleSampler, vae_scale_factor: int, height: int, width: int) -> dict[str, Any]:
        batch, text_len = sample.opt["txt_ids"][:2]
        rows, cols = height // (2 * vae_scale_factor), width // (2 * vae_scale_factor)
        return {
            "hidden_states": sample.randn("hidden_states"),
            "encoder_hidden_states": sample.randn("encoder_hidden_states"),
            "timestep": sample.rand("timestep"),  # t / 1000 in [0, 1], in the latents' dtype
            "img_ids": position_ids(rows, cols, batch, device=sample.device),
            "txt_ids": text_ids(text_len, batch, device=sample.device),
        }


__all__ = ["BUILTINS", "GRAPH_INPUTS", "Flux2Adapter", "build_tiny_flux2"]
