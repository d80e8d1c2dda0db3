"""The tiny built-in SDXL pipeline (``tiny-sdxl``): seeded random weights (``build_tiny_sdxl``) for CPU tests.

Input: a seed and a config. Output: a ``StableDiffusionXLPipeline``. The layout follows diffusers' own SDXL fast
tests (``get_dummy_components``: a two-level UNet with a cross-attention down block, two CLIP encoders of width
32, the second with a projection, ``addition_embed_type="text_time"``), a little wider so widths are multiples of
16. Importing this module loads no torch, diffusers or transformers.
"""

from __future__ import annotations

from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.sdxl import CLIP_TOKENS, TIME_IDS
from dtcompile.models.tiny_text import TOKENIZER_CODE, build_tiny_tokenizers, text_config

TINY_SDXL_VERSION = 1

_TINY_WORDS: tuple[str, ...] = (
    "a", "the", "of", "in", "on", "with", "and", "photo", "painting", "cat", "dog", "fox", "lighthouse", "tree",
    "mountain", "river", "sea", "city", "house", "sky", "sun", "moon", "night", "snow", "red", "blue", "green",
    "small", "big", "old", "detailed", "style", "dusk", "blur", "blurry", "ugly",
)  # fmt: skip

_CLIP: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": CLIP_TOKENS, "hidden_act": "gelu", "projection_dim": 32}  # fmt: skip
_ADD_TIME = 8  # addition_time_embed_dim (SDXL: 256)

TINY_SDXL_CONFIG: dict[str, Any] = {
    "unet": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],  # heads per level, as SDXL's config names them
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _ADD_TIME,
        "transformer_layers_per_block": [1, 2],
        "projection_class_embeddings_input_dim": TIME_IDS * _ADD_TIME + _CLIP["projection_dim"],  # 6 x 8 + 32
        "cross_attention_dim": 2 * _CLIP["hidden_size"],  # both CLIPs' penultimate states side by side
        "norm_num_groups": 8,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32],  # vae_scale_factor 2: 64 x 64 images from 32 x 32 latents
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.13025,  # SDXL's
        "force_upcast": True,
    },
    "text_encoder": dict(_CLIP),  # CLIP-L (CLIPTextModel: its hidden states only)
    "text_encoder_2": dict(_CLIP),  # OpenCLIP-G (CLIPTextModelWithProjection: also the pooled text_embeds)
    "scheduler": {  # SDXL base's EulerDiscreteScheduler
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
    },
    "tokenizer_words": list(_TINY_WORDS),
    "tokenizer_max_length": CLIP_TOKENS,
    "tokenizer_2_max_length": CLIP_TOKENS,
}


def build_tiny_sdxl(seed: int = 0, config: dict[str, Any] = TINY_SDXL_CONFIG) -> Any:
    """A randomly initialised ``StableDiffusionXLPipeline``; the same seed gives the same weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_tok, _ = build_tiny_tokenizers(config)
    clip_tok_2, _ = build_tiny_tokenizers(config)
    modules = seeded_components(
        seed,
        unet=lambda: UNet2DConditionModel(**config["unet"]),
        vae=lambda: AutoencoderKL(**config["vae"]),
        text_encoder=lambda: CLIPTextModel(text_config(CLIPTextConfig, clip_tok, **config["text_encoder"])),
        text_encoder_2=lambda: CLIPTextModelWithProjection(
            text_config(CLIPTextConfig, clip_tok, **config["text_encoder_2"])
        ),
    )
    scheduler = EulerDiscreteScheduler(**config["scheduler"])
    return StableDiffusionXLPipeline(scheduler=scheduler, tokenizer=clip_tok, tokenizer_2=clip_tok_2, **modules)


BUILTINS = by_name(
    BuiltinModel(
        "tiny-sdxl",
        "sdxl",
        "random-weight SDXL lookalike (two-level UNet, two CLIP encoders, text_time conditioning) for offline tests",
        build_tiny_sdxl,
        TINY_SDXL_CONFIG,
        TINY_SDXL_VERSION,
        TOKENIZER_CODE,
    )
)
