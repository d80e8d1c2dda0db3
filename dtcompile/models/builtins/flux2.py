"""The tiny built-in FLUX.2 pipeline (``tiny-flux2``): seeded random weights (``build_tiny_flux2``) and a
Mistral-style chat tokenizer built in code (``tiny_text``), for CPU tests.

Input: a seed and a config. Output: a ``Flux2Pipeline``. Importing this module loads no torch, diffusers or
transformers.
"""

from __future__ import annotations

from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.builtins.flux import _TINY_WORDS, FLUX_DEV_SCHEDULER
from dtcompile.models.tiny_text import MISTRAL_TOKENIZER_CODE, build_tiny_mistral_tokenizer

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
