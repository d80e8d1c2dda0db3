"""FLUX.2 (dev): the ``transformer`` (Flux2Transformer2DModel) of a ``Flux2Pipeline``.

FLUX.2 keeps FLUX.1's packing (2x2 latent patches, one token each) and its double- then single-stream blocks,
but reads one text embedding: the Mistral-3 text encoder's hidden states of three layers stacked on the
feature axis (``joint_attention_dim`` = 3 x the encoder width), with no pooled projection. Position ids have
four axes (time, row, column, layer) and the pipeline passes them batched, ``(batch, tokens, 4)``; the
transformer reads the first row. Guidance is distilled into the model (``guidance_embeds``): no negative prompt.

The tiny built-in (``dtcompile.models.builtins.flux2``)'s tokenizer is a Mistral-style chat tokenizer built in code (``tiny_text``); FLUX.2-dev's
own is a ``PixtralProcessor``, which transformers loads only with torchvision installed.

Importing this module loads no torch, diffusers or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.models.components import AuxGraph
from dtcompile.models.examples import ExampleSampler
from dtcompile.models.flux import FluxAdapter

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch


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


__all__ = ["GRAPH_INPUTS", "Flux2Adapter"]
