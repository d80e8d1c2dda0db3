"""The tiny built-in FLUX.1 pipelines: ``tiny-flux`` (CPU tests) and ``flux-realwidth-1`` (FLUX.1-dev widths,
1+1 blocks), seeded random weights (``build_tiny_flux``), and FLUX.1-dev's widths shared with the benchmarks.

Input: a seed and a config. Output: a ``FluxPipeline``. Importing this module loads no torch, diffusers or
transformers.
"""

from __future__ import annotations

from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.tiny_text import TOKENIZER_CODE, build_tiny_tokenizers, text_config, tiny_t5

# Bump when build_tiny_flux changes what it writes: it is part of the built-in cache key.
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
#: FLUX.1-dev's FlowMatchEulerDiscreteScheduler config.
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
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
    "text_encoder_2": tiny_t5(32),  # T5Config (v1.1 style, like FLUX's T5-XXL)
    "scheduler": FLUX_DEV_SCHEDULER,
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
    clip_config = text_config(CLIPTextConfig, tokenizer, **config["text_encoder"])
    t5_config = text_config(T5Config, tokenizer_2, **config["text_encoder_2"])
    transformer_config = dict(config["transformer"], axes_dims_rope=tuple(config["transformer"]["axes_dims_rope"]))

    modules = seeded_components(
        seed,
        transformer=lambda: FluxTransformer2DModel(**transformer_config),
        vae=lambda: AutoencoderKL(**config["vae"]),
        text_encoder=lambda: CLIPTextModel(clip_config),
        text_encoder_2=lambda: T5EncoderModel(t5_config),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    return FluxPipeline(scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2, **modules)


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


BUILTINS = by_name(
    BuiltinModel(
        "tiny-flux",
        "flux",
        "random-weight FLUX.1-dev lookalike (2+2 blocks, width 64, ~3 MB) for offline tests",
        build_tiny_flux,
        TINY_FLUX_CONFIG,
        TINY_FLUX_VERSION,
        TOKENIZER_CODE,
    ),
    BuiltinModel(
        "flux-realwidth-1",
        "flux",
        "random-weight FLUX.1-dev transformer at real widths, 1+1 blocks, tiny encoders (~2.2 GB)",
        build_tiny_flux,
        REALWIDTH_FLUX_CONFIG,
        REALWIDTH_FLUX_VERSION,
        TOKENIZER_CODE,
    ),
)
