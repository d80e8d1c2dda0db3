"""The tiny built-in Wan pipelines (Wan2.1 and Wan2.2 with two experts, tiny and real-width; text-to-video and
image-to-video): seeded random weights (``build_tiny_wan``, ``build_tiny_wan_i2v``) for CPU tests and benchmarks.

Input: a seed and a config. Output: a ``WanPipeline`` or a ``WanImageToVideoPipeline``. Importing this module loads no torch, diffusers or
transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.tiny_text import TOKENIZER_CODE, build_tiny_tokenizers, text_config, tiny_t5
from dtcompile.models.wan import MAX_SEQUENCE_LENGTH

TINY_WAN_VERSION = 1

_TINY_WORDS: tuple[str, ...] = (
    "a", "the", "of", "in", "on", "with", "and", "cat", "dog", "playing", "piano", "running", "beach", "city",
    "night", "snow", "rain", "red", "blue", "slow", "motion", "video", "blurry", "static", "ugly", "camera",
)  # fmt: skip

# Wan2.1-T2V-1.3B's layout scaled down: patch (1, 2, 2), head_dim 16, UMT5 width 32, a 4x temporal / 8x spatial
# causal VAE with 16 latent channels.
TINY_WAN_CONFIG: dict[str, Any] = {
    "transformer": {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 32,
        "ffn_dim": 64,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 64,
    },
    "vae": {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    "text_encoder": tiny_t5(32, relative_attention_max_distance=16),  # UMT5EncoderModel
    "scheduler": {"shift": 3.0},
    "tokenizer_words": list(_TINY_WORDS),
    "tokenizer_max_length": 77,
    "tokenizer_2_max_length": MAX_SEQUENCE_LENGTH,
}
#: Wan2.2 A14B's layout: the same expert twice (separately seeded), switched at ``boundary_ratio``.
TINY_WAN22_CONFIG: dict[str, Any] = {
    **TINY_WAN_CONFIG,
    "transformer_2": TINY_WAN_CONFIG["transformer"],
    "boundary_ratio": 0.875,
}

#: Wan2.1-I2V's layout scaled down (diffusers' tests/pipelines/wan/test_wan_image_to_video.py, and
#: Wan-AI/Wan2.1-I2V-14B-480P-Diffusers): 36 input channels (16 noise + 4 first-frame mask + 16 condition
#: latents), CLIP image embeddings (``image_dim``) through added key/value projections (``added_kv_proj_dim`` =
#: the inner width), a CLIP vision tower of 32 px in 4 px patches (65 tokens with the class token).
TINY_WAN21_I2V_CONFIG: dict[str, Any] = {
    **TINY_WAN_CONFIG,
    "transformer": {**TINY_WAN_CONFIG["transformer"], "in_channels": 36, "image_dim": 16, "added_kv_proj_dim": 32},
    "image_encoder": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 4,
        "projection_dim": 16,
    },
    "image_processor": {"crop_size": 32, "size": 32},
    "i2v": True,
}
#: Wan2.2-I2V-A14B's layout scaled down: two 36-channel experts, no image encoder, boundary 0.9 (its
#: model_index.json's ``boundary_ratio``).
TINY_WAN22_I2V_CONFIG: dict[str, Any] = {
    **TINY_WAN_CONFIG,
    "transformer": {**TINY_WAN_CONFIG["transformer"], "in_channels": 36},
    "transformer_2": {**TINY_WAN_CONFIG["transformer"], "in_channels": 36},
    "boundary_ratio": 0.9,
    "i2v": True,
}

#: Wan2.2-TI2V-5B's layout scaled down (diffusers' Wan225BImageToVideoPipelineFastTests, and
#: Wan-AI/Wan2.2-TI2V-5B-Diffusers): one 48-channel expert with per-token timesteps (``expand_timesteps``: the
#: conditioning frame's tokens at timestep 0), the Wan2.2 VAE (residual blocks, 2x2 patchified input of 12 channels,
#: 16x spatial / 4x temporal, 48 latent channels). The image enters as the first latent frame, no mask channels.
TINY_WAN22_TI2V_CONFIG: dict[str, Any] = {
    **TINY_WAN_CONFIG,
    "transformer": {**TINY_WAN_CONFIG["transformer"], "in_channels": 48, "out_channels": 48},
    "vae": {
        "base_dim": 8,
        "z_dim": 48,
        "in_channels": 12,
        "out_channels": 12,
        "is_residual": True,
        "patch_size": 2,
        "latents_mean": [0.0] * 48,
        "latents_std": [1.0] * 48,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
        "temperal_downsample": [False, True, True],
    },
    "expand_timesteps": True,
    "i2v": True,
}


#: Wan2.1-T2V-1.3B's transformer widths (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json) minus the depth.
WAN21_1_3B_WIDTHS: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


def realwidth_wan_config(blocks: int) -> dict[str, Any]:
    """Wan2.1-1.3B's transformer at its real widths with ``blocks`` of its 30 blocks, around a tiny UMT5 whose
    output width is the real 4096 and the tiny 4x/8x VAE (real token counts, little else)."""
    return {
        **TINY_WAN_CONFIG,
        "transformer": {**WAN21_1_3B_WIDTHS, "num_layers": blocks},
        "text_encoder": {
            **TINY_WAN_CONFIG["text_encoder"],
            "d_model": 4096,
            "d_kv": 64,
            "d_ff": 512,
            "num_heads": 8,
            "num_layers": 1,
        },  # fmt: skip
    }


#: Wan2.2-TI2V-5B's transformer widths (Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json) minus the depth.
WAN22_TI2V_5B_WIDTHS: dict[str, Any] = {
    **WAN21_1_3B_WIDTHS,
    "num_attention_heads": 24,
    "in_channels": 48,
    "out_channels": 48,
    "ffn_dim": 14336,
}


def realwidth_ti2v_config(blocks: int) -> dict[str, Any]:
    """Wan2.2-TI2V-5B's transformer at its real widths with ``blocks`` of its 30 blocks, around the tiny UMT5 of
    output width 4096 and the tiny Wan2.2-style VAE (16x spatial, 48 channels): real token counts, little else."""
    return {
        **TINY_WAN22_TI2V_CONFIG,
        "transformer": {**WAN22_TI2V_5B_WIDTHS, "num_layers": blocks},
        "text_encoder": realwidth_wan_config(blocks)["text_encoder"],
    }


def build_tiny_wan(seed: int = 0, config: dict[str, Any] = TINY_WAN_CONFIG) -> Any:
    """A randomly initialised ``WanPipeline`` from ``config`` (two experts when it has ``boundary_ratio``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    _, tokenizer = build_tiny_tokenizers(config)  # a T5-style Unigram tokenizer (UMT5's kind)
    umt5_config = text_config(UMT5Config, tokenizer, **config["text_encoder"])

    def expert(name: str) -> Callable[[], Any]:
        cfg = config[name]
        return lambda: WanTransformer3DModel(**dict(cfg, patch_size=tuple(cfg["patch_size"])))

    modules = seeded_components(
        seed,
        transformer=expert("transformer"),
        vae=lambda: AutoencoderKLWan(**config["vae"]),
        text_encoder=lambda: UMT5EncoderModel(umt5_config),
        transformer_2=expert("transformer_2") if config.get("boundary_ratio") is not None else None,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    return WanPipeline(tokenizer=tokenizer, scheduler=scheduler, boundary_ratio=config.get("boundary_ratio"), **modules)


def build_tiny_wan_i2v(seed: int = 0, config: dict[str, Any] = TINY_WAN21_I2V_CONFIG) -> Any:
    """A randomly initialised ``WanImageToVideoPipeline`` from ``config``: with a CLIP vision ``image_encoder``
    when it has one (Wan2.1 I2V), two experts when it has ``boundary_ratio`` (Wan2.2 I2V)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    _, tokenizer = build_tiny_tokenizers(config)
    umt5_config = text_config(UMT5Config, tokenizer, **config["text_encoder"])

    def expert(name: str) -> Callable[[], Any]:
        cfg = config[name]
        return lambda: WanTransformer3DModel(**dict(cfg, patch_size=tuple(cfg["patch_size"])))

    vision = config.get("image_encoder")
    modules = seeded_components(
        seed,
        transformer=expert("transformer"),
        vae=lambda: AutoencoderKLWan(**config["vae"]),
        text_encoder=lambda: UMT5EncoderModel(umt5_config),
        transformer_2=expert("transformer_2") if config.get("boundary_ratio") is not None else None,
        image_encoder=(lambda: CLIPVisionModel(CLIPVisionConfig(**vision))) if vision else None,
    )
    processor = CLIPImageProcessor(**config["image_processor"]) if vision else None
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        scheduler=scheduler,
        image_processor=processor,
        boundary_ratio=config.get("boundary_ratio"),
        expand_timesteps=bool(config.get("expand_timesteps", False)),
        **modules,
    )


def _builtin(name: str, description: str, config: dict[str, Any]) -> BuiltinModel:
    experts = ("transformer", "transformer_2") if config.get("boundary_ratio") is not None else ()
    build = build_tiny_wan_i2v if config.get("i2v") else build_tiny_wan
    family = "wan-i2v" if config.get("i2v") else "wan"
    return BuiltinModel(name, family, description, build, config, TINY_WAN_VERSION, TOKENIZER_CODE, experts)


BUILTINS = by_name(
    _builtin(
        "tiny-wan21",
        "random-weight Wan2.1 T2V lookalike (2 blocks, width 32) for offline tests",
        TINY_WAN_CONFIG,
    ),
    _builtin(
        "tiny-wan22",
        "random-weight Wan2.2 T2V A14B lookalike: two experts switched at boundary 0.875",
        TINY_WAN22_CONFIG,
    ),
    _builtin(
        "tiny-wan21-i2v",
        "random-weight Wan2.1 I2V lookalike: 36-channel transformer, CLIP vision image encoder (65 tokens)",
        TINY_WAN21_I2V_CONFIG,
    ),
    _builtin(
        "tiny-wan22-i2v",
        "random-weight Wan2.2 I2V A14B lookalike: two 36-channel experts switched at boundary 0.9, no image encoder",
        TINY_WAN22_I2V_CONFIG,
    ),
    _builtin(
        "tiny-wan22-ti2v",
        "random-weight Wan2.2 TI2V-5B lookalike: 48-channel expert, per-token timesteps, the 16x Wan2.2 VAE",
        TINY_WAN22_TI2V_CONFIG,
    ),
    *(
        _builtin(
            f"wan21-realwidth-{n}",
            f"random-weight Wan2.1-1.3B transformer at real widths, {n} of its 30 blocks, tiny encoders",
            realwidth_wan_config(n),
        )
        for n in (1, 2)
    ),
    _builtin(
        "wan22-ti2v-realwidth-1",
        "random-weight Wan2.2 TI2V-5B transformer at real widths, 1 of its 30 blocks, tiny encoders and VAE",
        realwidth_ti2v_config(1),
    ),
)  # fmt: skip
