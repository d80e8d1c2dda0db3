"""The tiny built-in SD3 pipeline (``tiny-sd3``): seeded random weights (``build_tiny_sd3``) for CPU tests.

Input: a seed and a config. Output: a ``StableDiffusion3Pipeline``. Importing this module loads no torch,
diffusers or transformers.
"""

from __future__ import annotations

from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.sd3 import CLIP_TOKENS
from dtcompile.models.tiny_text import TOKENIZER_CODE, build_tiny_tokenizers, text_config, tiny_t5

TINY_SD3_VERSION = 1

_TINY_WORDS: tuple[str, ...] = (
    "a", "the", "of", "in", "on", "with", "and", "photo", "painting", "cat", "dog", "fox", "lighthouse", "tree",
    "mountain", "river", "sea", "city", "house", "sky", "sun", "moon", "night", "snow", "red", "blue", "green",
    "small", "big", "old", "detailed", "style", "dusk", "blur", "blurry", "ugly",
)  # fmt: skip

# SD3.5 Medium's layout scaled down (dual attention, qk RMSNorm): head_dim 16, widths multiples of 16; CLIP-L + CLIP-G pooled = 64,
# T5 d_model 64 (>= both CLIP widths side by side, as in SD3: 768 + 1280 <= 4096).
TINY_SD3_CONFIG: dict[str, Any] = {
    "transformer": {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "caption_projection_dim": 64,
        "pooled_projection_dim": 64,
        "out_channels": 4,
        "pos_embed_max_size": 48,
        "dual_attention_layers": [0],  # SD3.5 Medium's MMDiT-X: a second self-attention in the first block(s)
        "qk_norm": "rms_norm",  # SD3.5's query/key RMSNorm
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32],  # vae_scale_factor 2; with patch 2, sizes are multiples of 4
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 1.5305,  # SD3's values
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "text_encoder": {  # CLIP-L (CLIPTextModelWithProjection)
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": CLIP_TOKENS,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    "text_encoder_3": tiny_t5(64),  # T5 v1.1
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
    "tokenizer_words": list(_TINY_WORDS),
    "tokenizer_max_length": CLIP_TOKENS,
    "tokenizer_2_max_length": 256,
}
TINY_SD3_CONFIG["text_encoder_2"] = {**TINY_SD3_CONFIG["text_encoder"], "hidden_act": "gelu"}  # CLIP-G


def build_tiny_sd3(seed: int = 0, config: dict[str, Any] = TINY_SD3_CONFIG) -> Any:
    """A randomly initialised ``StableDiffusion3Pipeline``; the same seed gives the same weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = build_tiny_tokenizers(config)
    clip_tok_2, _ = build_tiny_tokenizers(config)

    t5_config = text_config(T5Config, t5_tok, **config["text_encoder_3"])
    modules = seeded_components(
        seed,
        transformer=lambda: SD3Transformer2DModel(**config["transformer"]),
        vae=lambda: AutoencoderKL(**config["vae"]),
        text_encoder=lambda: CLIPTextModelWithProjection(
            text_config(CLIPTextConfig, clip_tok, **config["text_encoder"])
        ),
        text_encoder_2=lambda: CLIPTextModelWithProjection(
            text_config(CLIPTextConfig, clip_tok, **config["text_encoder_2"])
        ),
        text_encoder_3=lambda: T5EncoderModel(t5_config),
    )
    tokenizers = {"tokenizer": clip_tok, "tokenizer_2": clip_tok_2, "tokenizer_3": t5_tok}
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    return StableDiffusion3Pipeline(scheduler=scheduler, **tokenizers, **modules)


BUILTINS = by_name(
    BuiltinModel(
        "tiny-sd3",
        "sd3",
        "random-weight SD3.5 lookalike (2 joint blocks, width 64, three text encoders) for offline tests",
        build_tiny_sd3,
        TINY_SD3_CONFIG,
        TINY_SD3_VERSION,
        TOKENIZER_CODE,
    )
)
