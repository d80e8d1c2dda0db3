"""The tiny built-in Qwen-Image pipeline (``tiny-qwen-image``): seeded random weights (``build_tiny_qwen_image``)
and a Qwen-style chat tokenizer built in code, for CPU tests.

The configs follow diffusers' own Qwen-Image pipeline tests (tests/pipelines/qwenimage/test_qwenimage.py: a
2-block transformer with head dim 16 and RoPE axes (8, 4, 4), a 3-level AutoencoderKLQwenImage with z_dim 4, a
2-layer Qwen2.5-VL text encoder of width 16 with a 2-block vision tower), widened to 4 heads (width 64, a multiple
of 16 for fp8/int8 alignment). Their tokenizer comes from the hub; ours is built in code: a Unigram tokenizer whose
listed words (the pipeline's prompt template among them) are single pieces, with Qwen's chat control tokens.

Input: a seed and a config. Output: a ``QwenImagePipeline``. Importing this module loads no torch, diffusers or
transformers.
"""

from __future__ import annotations

from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.builtins.sd3 import _TINY_WORDS

# Bump when build_tiny_qwen_image changes what it writes: it is part of the built-in cache key.
TINY_QWEN_IMAGE_VERSION = 1

#: The words of QwenImagePipeline's prompt template (``prompt_template_encode``): single pieces, so the template
#: takes a few dozen tokens as with Qwen's own tokenizer (the pipeline drops the first 34).
_TEMPLATE_WORDS: tuple[str, ...] = (
    "system", "user", "assistant", "Describe", "image", "by", "detailing", "color", "shape", "size", "texture",
    "quantity", "text", "spatial", "relationships", "objects", "background",
)  # fmt: skip

#: Qwen2.5-VL's chat and vision control tokens (the text encoder's config names the vision ones by id).
_CONTROL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

TINY_QWEN_IMAGE_CONFIG: dict[str, Any] = {
    "transformer": {
        "patch_size": 2,
        "in_channels": 16,  # 4 VAE latent channels x 2x2 patch
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 16,  # the text encoder's hidden_size
        "guidance_embeds": False,
        "axes_dims_rope": [8, 4, 4],  # sums to attention_head_dim
    },
    "vae": {  # vae_scale_factor 2 ** len(temperal_downsample) = 4: sizes are multiples of 8 (x the 2x2 patch)
        "base_dim": 24,
        "z_dim": 4,
        "dim_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True],
        "latents_mean": [0.0] * 4,
        "latents_std": [1.0] * 4,
    },
    "text_encoder": {  # Qwen2_5_VLConfig, as diffusers' test
        "text_config": {
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        "hidden_size": 16,
    },
    "scheduler": {  # Qwen-Image's FlowMatchEulerDiscreteScheduler (dynamic shifting, exponential)
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "time_shift_type": "exponential",
    },
    "tokenizer_words": [*_TINY_WORDS, *_TEMPLATE_WORDS],
    "tokenizer_max_length": 1024,
}


def build_tiny_qwen_tokenizer(words: tuple[str, ...] | list[str], max_length: int) -> Any:
    """A tokenizer shaped like Qwen2.5-VL's for QwenImagePipeline's use (template-formatted text, padded batches):
    a Unigram model over ``words`` (single pieces) and printable characters, Qwen's control tokens, ``<|endoftext|>``
    as pad and end token. Built in code: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ("<unk>", "<|endoftext|>", *_CONTROL)
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in specials] + [("▁", -2.0), ("\n", -2.0)]
    pieces += [("▁" + w, -3.0 - i * 1e-3) for i, w in enumerate(dict.fromkeys(words))]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + c, -8.0) for c in chars] + [(c, -9.0) for c in chars]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.normalizer = normalizers.Replace("\n", " \n ")
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_CONTROL),
        model_max_length=max_length,
    )


def build_tiny_qwen_image(seed: int = 0, config: dict[str, Any] = TINY_QWEN_IMAGE_CONFIG) -> Any:
    """A randomly initialised ``QwenImagePipeline`` from ``config``; the same seed gives the same weights (each
    component from its own seed inside a forked RNG, ``seeded_components``)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tiny_qwen_tokenizer(config["tokenizer_words"], config["tokenizer_max_length"])
    te = config["text_encoder"]
    token = tokenizer.convert_tokens_to_ids
    text_config = dict(te["text_config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    qwen_config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=te["vision_config"],
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
    )
    transformer_config = dict(config["transformer"], axes_dims_rope=tuple(config["transformer"]["axes_dims_rope"]))
    modules = seeded_components(
        seed,
        transformer=lambda: QwenImageTransformer2DModel(**transformer_config),
        vae=lambda: AutoencoderKLQwenImage(**config["vae"]),
        text_encoder=lambda: Qwen2_5_VLForConditionalGeneration(qwen_config),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    return QwenImagePipeline(scheduler=scheduler, tokenizer=tokenizer, **modules)


BUILTINS = by_name(
    BuiltinModel(
        "tiny-qwen-image",
        "qwen-image",
        "random-weight Qwen-Image lookalike (2 blocks, width 64, 2-layer tiny Qwen2.5-VL) for offline tests",
        build_tiny_qwen_image,
        TINY_QWEN_IMAGE_CONFIG,
        TINY_QWEN_IMAGE_VERSION,
        (build_tiny_qwen_tokenizer,),
    )
)
