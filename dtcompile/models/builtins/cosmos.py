"""The tiny built-in Cosmos-Predict2 pipelines (Text2Image and Video2World): seeded random weights
(``build_tiny_cosmos2``) for CPU tests and benchmarks, with a pass-through safety checker.

Input: a seed and a config. Output: a ``Cosmos2TextToImagePipeline`` or a ``Cosmos2VideoToWorldPipeline``.
Importing this module loads no torch, diffusers or transformers.

Padding mask: diffusers' tests and the real checkpoints set ``concat_padding_mask`` (the all-zero padding mask
resized to the latent grid by ``torchvision.transforms`` and concatenated as a channel). torchvision's CPU build
cannot be installed beside this project's CPU torch here, and diffusers imports it for that resize only, so the
tiny built-ins leave it off (the engines still take ``padding_mask``: the graph is the same for both).

Safety checker: the Cosmos pipelines refuse to run without one and default to NVIDIA's Cosmos Guardrail
(``cosmos_guardrail``: a multi-GB set of models). A random-weight lookalike makes noise, not content, so the
built-ins save ``dtcompile.models.cosmos.PassThroughSafetyChecker`` (diffusers' own fast tests pass the same kind of dummy,
``tests/pipelines/cosmos/cosmos_guardrail.py``); real checkpoints keep the Guardrail, as diffusers loads it.
"""

from __future__ import annotations

from typing import Any

from dtcompile.models.builtin import BuiltinModel, by_name, seeded_components
from dtcompile.models.cosmos import safety_checker_class
from dtcompile.models.tiny_text import TOKENIZER_CODE, build_tiny_tokenizers, tiny_t5

TINY_COSMOS_VERSION = 1

_TINY_WORDS: tuple[str, ...] = (
    "a", "the", "of", "in", "on", "with", "and", "cat", "dog", "playing", "piano", "robot", "arm", "warehouse",
    "street", "night", "car", "driving", "red", "blue", "slow", "motion", "video", "blurry", "static", "ugly",
)  # fmt: skip

#: diffusers' Cosmos2TextToImagePipelineFastTests components (tests/pipelines/cosmos/test_cosmos2_text2image.py):
#: Cosmos-Predict2-2B's layout scaled down (patch (1, 2, 2), AdaLN-LoRA, the padding mask concatenated to the
#: latents, learnable extra position embeddings), the 4x/8x Wan VAE with 16 latent channels, a T5 encoder.
TINY_COSMOS2_T2I_CONFIG: dict[str, Any] = {
    "transformer": {
        "in_channels": 16,
        "out_channels": 16,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "mlp_ratio": 2,
        "text_embed_dim": 32,
        "adaln_lora_dim": 4,
        "max_size": [4, 32, 32],
        "patch_size": [1, 2, 2],
        "rope_scale": [2.0, 1.0, 1.0],
        "concat_padding_mask": False,  # True in diffusers' test and the checkpoints: needs torchvision (see above)
        "extra_pos_embed_type": "learnable",
    },
    "vae": {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    "text_encoder": tiny_t5(32),  # T5EncoderModel (T5-11B's encoder in the real checkpoints)
    "scheduler": {"use_karras_sigmas": True},
    "tokenizer_words": list(_TINY_WORDS),
    "tokenizer_max_length": 77,
    "tokenizer_2_max_length": 512,
}
#: diffusers' Cosmos2VideoToWorldPipelineFastTests: the same with 17 input channels (16 latent + the condition
#: mask channel the pipeline concatenates).
TINY_COSMOS2_V2W_CONFIG: dict[str, Any] = {
    **TINY_COSMOS2_T2I_CONFIG,
    "transformer": {**TINY_COSMOS2_T2I_CONFIG["transformer"], "in_channels": 17},
    "v2w": True,
}


def build_tiny_cosmos2(seed: int = 0, config: dict[str, Any] = TINY_COSMOS2_T2I_CONFIG) -> Any:
    """A randomly initialised Cosmos-Predict2 pipeline from ``config``: Video2World when it has ``v2w``, else
    Text2Image; with the pass-through safety checker."""
    from diffusers import (
        AutoencoderKLWan,
        Cosmos2TextToImagePipeline,
        Cosmos2VideoToWorldPipeline,
        CosmosTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import T5Config, T5EncoderModel

    from dtcompile.models.tiny_text import text_config

    _, tokenizer = build_tiny_tokenizers(config)
    t5_config = text_config(T5Config, tokenizer, **config["text_encoder"])
    tr = config["transformer"]
    tuples = {k: tuple(tr[k]) for k in ("max_size", "patch_size", "rope_scale")}
    modules = seeded_components(
        seed,
        transformer=lambda: CosmosTransformer3DModel(**{**tr, **tuples}),
        vae=lambda: AutoencoderKLWan(**config["vae"]),
        text_encoder=lambda: T5EncoderModel(t5_config),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    cls = Cosmos2VideoToWorldPipeline if config.get("v2w") else Cosmos2TextToImagePipeline
    return cls(tokenizer=tokenizer, scheduler=scheduler, safety_checker=safety_checker_class()(), **modules)


def _builtin(name: str, description: str, config: dict[str, Any]) -> BuiltinModel:
    family = "cosmos2-v2w" if config.get("v2w") else "cosmos2-t2i"
    code = (*TOKENIZER_CODE, safety_checker_class)
    return BuiltinModel(name, family, description, build_tiny_cosmos2, config, TINY_COSMOS_VERSION, code)


BUILTINS = by_name(
    _builtin(
        "tiny-cosmos2-t2i",
        "random-weight Cosmos-Predict2 Text2Image lookalike (2 blocks, width 32), pass-through safety checker",
        TINY_COSMOS2_T2I_CONFIG,
    ),
    _builtin(
        "tiny-cosmos2-v2w",
        "random-weight Cosmos-Predict2 Video2World lookalike (17-channel transformer), pass-through safety checker",
        TINY_COSMOS2_V2W_CONFIG,
    ),
)
