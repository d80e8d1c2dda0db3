"""FLUX.1 family: the transformer's graph I/O, shape profiles and exclusions (the tiny built-ins:
``dtcompile.models.builtins.flux``).

Input: a diffusers ``FluxPipeline`` (its ``transformer`` component and ``vae_scale_factor``).
Output: ``ExportSpec`` / ``ShapeProfile`` for the export and build stages.

Importing this module loads no torch, diffusers or transformers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, Shapes, TensorSpec
from dtcompile.models.base import (
    AdapterBase,
    SplitLayout,
    UlyssesLayout,
    attention_dims,
    check_size_multiple,
)
from dtcompile.models.components import AuxGraph, TextEncoderGraph, VaeDecoderGraph
from dtcompile.models.examples import ExampleSampler, model_config

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------------

#: The two block lists of a FluxTransformer2DModel, in execution order.
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
#: FluxPipeline refuses a longer ``max_sequence_length`` (its T5 encoder's limit).
MAX_SEQUENCE_LENGTH = 512
GUIDANCE_SCALE_EXAMPLE = 3.5  # FLUX.1-dev's default guidance_scale, used for example inputs


def validate_image_size(height: int, width: int, vae_scale_factor: int) -> None:
    """Raise UnsupportedError unless height and width divide by ``2 * vae_scale_factor``.

    FLUX packs 2x2 latent patches into one token, so pixel sizes must be multiples of twice the VAE's
    downsampling factor (16 for FLUX.1); FluxPipeline would otherwise silently round the size down.
    """
    why = f"FLUX packs 2x2 latent patches and the VAE downsamples by {vae_scale_factor}"
    check_size_multiple(height, width, 2 * vae_scale_factor, why)


def _vae_factor(config: Callable[[str], dict[str, Any] | None]) -> int:
    """FluxPipeline.vae_scale_factor from the VAE's config; FLUX.1's (8) when the config is not at hand."""
    vae = config("vae") or {}
    return 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else 8


def img_tokens(height: int, width: int, vae_scale_factor: int) -> int:
    """Number of image tokens FluxPipeline feeds the transformer for a ``height`` x ``width`` image."""
    validate_image_size(height, width, vae_scale_factor)
    patch = 2 * vae_scale_factor
    return (height // patch) * (width // patch)


def latent_image_ids(height: int, width: int, vae_scale_factor: int, device: Any = None) -> torch.Tensor:
    """The (img_tokens, 3) float32 position ids FluxPipeline builds: (0, row, column) per packed patch."""
    import torch

    validate_image_size(height, width, vae_scale_factor)
    rows, cols = height // (2 * vae_scale_factor), width // (2 * vae_scale_factor)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


#: The transformer's graph inputs in order (``guidance`` only for guidance-distilled models).
GRAPH_INPUTS = (
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
)


def graph_kwargs(inputs: tuple[Any, ...]) -> dict[str, Any]:
    """The transformer's keyword arguments for graph inputs given positionally, in ``GRAPH_INPUTS`` order."""
    if not len(GRAPH_INPUTS) - 1 <= len(inputs) <= len(GRAPH_INPUTS):
        raise TypeError(f"FLUX graph takes {len(GRAPH_INPUTS) - 1} or {len(GRAPH_INPUTS)} inputs, got {len(inputs)}")
    return dict(zip(GRAPH_INPUTS, inputs, strict=False))


@functools.cache
def _cache_part_classes() -> tuple[type, type, type]:
    """The nn.Module classes of the three cache part kinds (built on first use: needs torch)."""
    import torch

    from dtcompile.models.parts import BlockRun, TransformerPart

    class FluxPrologue(TransformerPart):
        """FluxTransformer2DModel.forward up to the first block: embedders and rotary embedding."""

        uses = ("x_embedder", "time_text_embed", "context_embedder", "pos_embed")

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = graph_kwargs(inputs)
            hidden = self.x_embedder(x["hidden_states"])
            timestep = x["timestep"].to(hidden.dtype) * 1000
            pooled, guidance = x["pooled_projections"], x.get("guidance")
            if guidance is None:
                temb = self.time_text_embed(timestep, pooled)
            else:
                temb = self.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
            context = self.context_embedder(x["encoder_hidden_states"])
            rope_cos, rope_sin = self.pos_embed(torch.cat((x["txt_ids"], x["img_ids"]), dim=0))
            return hidden, context, temb, rope_cos, rope_sin

    class FluxBlocks(BlockRun):
        """A run of consecutive transformer blocks (double- and/or single-stream; both take and return both streams)."""

        def forward(
            self,
            hidden: torch.Tensor,
            context: torch.Tensor,
            temb: torch.Tensor,
            rope_cos: torch.Tensor,
            rope_sin: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            for block in self.blocks:
                context, hidden = block(
                    hidden_states=hidden,
                    encoder_hidden_states=context,
                    temb=temb,
                    image_rotary_emb=(rope_cos, rope_sin),
                )
            return hidden, context

    class FluxEpilogue(TransformerPart):
        """The output norm (modulated by temb) and projection."""

        uses = ("norm_out", "proj_out")

        def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
            return self.proj_out(self.norm_out(hidden, temb))

    return FluxPrologue, FluxBlocks, FluxEpilogue


@functools.cache
def _signal_prologue_class() -> type:
    """The prologue of a TeaCache split: also returns ``modulated``, the first double-stream block's norm1 output
    (TeaCache4FLUX's ``modulated_inp``), computed by that block's own AdaLayerNormZero."""

    prologue = _cache_part_classes()[0]

    class FluxSignalPrologue(prologue):  # type: ignore[misc,valid-type]
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__(transformer)
            self.first_norm = getattr(transformer, "transformer_blocks")[0].norm1  # noqa: B009 (torch types it Tensor)

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            hidden, context, temb, rope_cos, rope_sin = super().forward(*inputs)
            modulated = self.first_norm(hidden, emb=temb)[0]
            return hidden, context, temb, rope_cos, rope_sin, modulated

    return FluxSignalPrologue


@functools.cache
def _ulysses_classes() -> tuple[type, type]:
    """(attention processor, sequence-parallel transformer) of FLUX's Ulysses form (built on first use)."""
    import torch
    from diffusers.models.embeddings import apply_rotary_emb

    prologue_class = _cache_part_classes()[0]

    class FluxUlyssesAttnProcessor:
        """FluxAttnProcessor on this rank's tokens (its text slice, then its image slice; the single-stream blocks
        get both already joined): projections, q/k norms and RoPE on the rank's rows, ``comm.attention`` over
        every token of both streams, the output projections. The tokens after the all-to-all come rank by rank
        (text 0, image 0, text 1, image 1, ...): a permutation of the whole sequence, and attention without a mask
        does not depend on the order of the keys."""

        def __init__(self, comm: Any) -> None:
            self.comm = comm

        def __call__(
            self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
            attention_mask: Any = None, image_rotary_emb: Any = None,
        ) -> Any:  # fmt: skip
            if attention_mask is not None:
                raise UnsupportedError("--parallel ulysses: FLUX attention with a mask is not split")
            heads = (-1, attn.head_dim)
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
            v = attn.to_v(hidden_states).unflatten(-1, heads)
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads))
                ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads))
                ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads)
                q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
            if image_rotary_emb is not None:
                q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
                k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            out = self.comm.attention(q, k, v).flatten(2, 3).to(q.dtype)
            if encoder_hidden_states is None:
                return out
            text = encoder_hidden_states.shape[1]
            context, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(context.contiguous())

    class FluxUlysses(torch.nn.Module):
        """FluxTransformer2DModel.forward on one rank of a Ulysses group: the embedders and RoPE tables on the
        whole input (cheap), then this rank's slice of the text tokens and of the image tokens (and their RoPE
        rows) through every block, so both streams are split evenly and every token is computed on one rank only;
        the output norm and projection on the rank's image tokens, gathered once at the end."""

        def __init__(self, transformer: torch.nn.Module, comm: Any) -> None:
            super().__init__()
            self.comm = comm
            self.prologue = prologue_class(transformer)
            self.blocks = torch.nn.ModuleList([*getattr(transformer, DOUBLE), *getattr(transformer, SINGLE)])
            self.tail: Any = torch.nn.ModuleList([getattr(transformer, n) for n in ("norm_out", "proj_out")])
            for block in self.blocks:
                attn: Any = getattr(block, "attn")  # noqa: B009 (torch types it Tensor | Module)
                attn.set_processor(FluxUlyssesAttnProcessor(comm))

        def forward(self, **kwargs: Any) -> torch.Tensor:
            inputs = tuple(kwargs[name] for name in GRAPH_INPUTS if kwargs.get(name) is not None)
            hidden, context, temb, cos, sin = self.prologue(*inputs)
            shard, text = self.comm.shard, context.shape[1]
            hidden, context = shard(hidden, 1, "image tokens"), shard(context, 1, "text tokens")
            cos = torch.cat([shard(cos[:text], 0), shard(cos[text:], 0)])
            sin = torch.cat([shard(sin[:text], 0), shard(sin[text:], 0)])
            for block in self.blocks:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                        image_rotary_emb=(cos, sin))  # fmt: skip
            norm_out, proj_out = self.tail
            return self.comm.gather(proj_out(norm_out(hidden, temb)), 1)

    return FluxUlyssesAttnProcessor, FluxUlysses


#: TeaCache's published rescaling polynomial for FLUX.1-dev (ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py;
#: numpy.poly1d order, highest power first), fitted there on the first block's modulated input.
TEACACHE_FLUX1 = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]


class FluxCacheLayout(SplitLayout):
    """The FLUX transformer split for block caching (``dtcompile.models.base.CacheLayout``).

    The prologue runs the embedders (``hidden`` from x_embedder, ``context`` from context_embedder, ``temb``
    from time_text_embed of timestep, guidance and pooled projections) and the rotary embedding of the text +
    image ids (``rope_cos``/``rope_sin``); every block updates both streams; the epilogue is norm_out + proj_out.
    """

    streams = ("hidden", "context")
    shared = ("temb", "rope_cos", "rope_sin")
    carried: tuple[str, ...] = ()
    epilogue_inputs = ("hidden", "temb")
    teacache_signal = "modulated"  # TeaCache4FLUX: the first block's norm1 output (its modulated image input)
    signal_outputs = ("modulated",)

    part_classes = staticmethod(_cache_part_classes)

    def signal_prologue_class(self) -> type:
        return _signal_prologue_class()

    def tensor_dims(
        self, module: torch.nn.Module, dims: dict[str, tuple[int | str, ...]], symbolic: bool
    ) -> dict[str, tuple[int | str, ...]]:
        width, head = attention_dims(model_config(module))
        batch, img, _ = dims["hidden_states"]
        text = dims["encoder_hidden_states"][1]
        rope = "rope_tokens" if symbolic else int(text) + int(img)  # text + image tokens
        return {
            "hidden": (batch, img, width),
            "context": (batch, text, width),
            "temb": (batch, width),
            "modulated": (batch, img, width),
            "rope_cos": (rope, head),
            "rope_sin": (rope, head),
        }


class FluxAdapter(AdapterBase):
    """FLUX.1 (dev/schnell and fine-tunes): the ``transformer`` of a ``FluxPipeline`` becomes the engine.

    Graph inputs follow NVIDIA's TensorRT diffusion demo: hidden_states, encoder_hidden_states,
    pooled_projections, timestep, img_ids, txt_ids and, for guidance-distilled models, guidance.
    dtypes: ids and guidance are float32 (the transformer turns ids into RoPE in float32/64 anyway, and
    FluxPipeline passes guidance as float32); everything else is the build dtype.
    """

    family = "flux"
    pipeline_class = "FluxPipeline"
    negative_prompt = False  # guidance-distilled: FluxPipeline's negative prompt needs true_cfg_scale, not used
    graph_inputs: ClassVar[tuple[str, ...]] = GRAPH_INPUTS
    block_lists = ((DOUBLE, "num_layers"), (SINGLE, "num_single_layers"))
    cache_layout_class: ClassVar[type | None] = FluxCacheLayout

    def teacache_coefficients(self, config: dict[str, Any]) -> tuple[list[float], str]:
        """TeaCache's FLUX.1-dev polynomial (the only FLUX one published), for every FLUX.1 transformer."""
        return list(TEACACHE_FLUX1), "published: TeaCache4FLUX (FLUX.1-dev)"

    ulysses = True

    def ulysses_module(self, transformer: torch.nn.Module, comm: Any) -> torch.nn.Module:
        """The FLUX transformer on one rank of a Ulysses group (``_ulysses_classes``)."""
        return _ulysses_classes()[1](transformer, comm)

    def ulysses_layout(
        self, config: dict[str, Any], pipe_config: Callable[[str], dict[str, Any] | None], height: int, width: int,
        frames: int | None, text_len: int,
    ) -> UlyssesLayout:  # fmt: skip
        """Text + image tokens in every block's joint attention (double- and single-stream); the projected image
        tokens gathered at the end."""
        image = img_tokens(height, width, _vae_factor(pipe_config))
        calls = int(config["num_layers"]) + int(config["num_single_layers"])
        out = int(config.get("out_channels") or config["in_channels"]) * int(config.get("patch_size") or 1) ** 2
        heads = int(config["num_attention_heads"])
        return UlyssesLayout(text_len + image, calls, self.hidden_width(config), heads, image, out)

    guidance_example = GUIDANCE_SCALE_EXAMPLE
    id_layout: tuple[tuple[str, ...], int] = ((), 3)  # (leading dims, axes) of img_ids/txt_ids: (tokens, 3)
    # other components that can become engines (recipe ``components``), besides the transformer
    aux_components: ClassVar[dict[str, str]] = {"text_encoder": "clip", "text_encoder_2": "t5", "vae_decoder": "vae"}
    # Modules ModelOpt's FLUX example keeps in high precision: embedders, the output norm and projection.
    default_exclude: tuple[str, ...] = (
        "*x_embedder*",
        "*context_embedder*",
        "*time_text_embed*",
        "*norm_out*",
        "proj_out",
    )

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        """The pipeline facts the adapter needs (``pipe_config`` of the other methods) from a FluxPipeline."""
        return {"vae_scale_factor": int(pipe.vae_scale_factor), "tokenizer_max_length": int(pipe.tokenizer_max_length)}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        """FluxPipeline reads CLIP's ``pooler_output`` (77 tokens), T5's hidden states (``max_sequence_length``
        tokens) and ``vae.decode``."""
        if name == "text_encoder":
            return TextEncoderGraph(name, ("last_hidden_state", "pooler_output"), pipe_config["tokenizer_max_length"])
        if name == "text_encoder_2":
            return TextEncoderGraph(name, ("last_hidden_state",))
        if name == "vae_decoder":
            return VaeDecoderGraph(self._vae_scale_factor(pipe_config))
        raise UnsupportedError(f"components: FluxPipeline has no component {name!r}")

    @staticmethod
    def _channels(module: torch.nn.Module) -> dict[str, Any]:
        cfg = model_config(module)
        return {
            "in": int(cfg["in_channels"]),
            "out": int(cfg.get("out_channels") or cfg["in_channels"]) * int(cfg.get("patch_size", 1)) ** 2,
            "joint": int(cfg["joint_attention_dim"]),
            "pooled": int(cfg.get("pooled_projection_dim") or 0),  # 0: no pooled input (FLUX.2)
            "guidance": bool(cfg.get("guidance_embeds", False)),
        }

    @staticmethod
    def _vae_scale_factor(pipe_config: dict[str, Any]) -> int:
        if "vae_scale_factor" not in pipe_config:
            raise UnsupportedError("FLUX pipe_config needs 'vae_scale_factor' (FluxPipeline.vae_scale_factor)")
        return int(pipe_config["vae_scale_factor"])

    def _input_specs(self, module: torch.nn.Module, shapes: Shapes, dt: str) -> list[TensorSpec]:
        """The graph inputs with symbolic ``batch``, ``img_tokens`` and ``text_len`` (when it varies)."""
        ch = self._channels(module)
        text: int | str = "text_len" if shapes.text_len.min != shapes.text_len.max else shapes.text_len.opt
        lead, axes = self.id_layout
        inputs = [
            TensorSpec("hidden_states", dt, ("batch", "img_tokens", ch["in"])),
            TensorSpec("encoder_hidden_states", dt, ("batch", text, ch["joint"])),
            TensorSpec("pooled_projections", dt, ("batch", ch["pooled"])),
            TensorSpec("timestep", dt, ("batch",)),
            TensorSpec("img_ids", "float32", (*lead, "img_tokens", axes)),
            TensorSpec("txt_ids", "float32", (*lead, text, axes)),
            TensorSpec("guidance", "float32", ("batch",)),
        ]
        return [t for t in inputs if t.name in self.graph_inputs and (t.name != "guidance" or ch["guidance"])]

    def _examples(self, sample: ExampleSampler, vae_scale_factor: int, height: int, width: int) -> dict[str, Any]:
        """Example inputs at the opt shapes, in graph-input order (guidance is added by ``export_spec``)."""
        import torch

        return {
            "hidden_states": sample.randn("hidden_states"),
            "encoder_hidden_states": sample.randn("encoder_hidden_states"),
            "pooled_projections": sample.randn("pooled_projections"),
            # FluxPipeline passes sigma-like timesteps (t / 1000, in [0, 1]) in the latents' dtype.
            "timestep": sample.rand("timestep"),
            "img_ids": latent_image_ids(height, width, vae_scale_factor, device=sample.device),
            # FluxPipeline's text ids are all zero
            "txt_ids": torch.zeros(sample.opt["txt_ids"], device=sample.device),
        }

    @staticmethod
    def _img_tokens(height: int, width: int, vae_scale_factor: int) -> int:
        """Length of the image-token axis for one generation size (validates the size)."""
        return img_tokens(height, width, vae_scale_factor)

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        """The graph inputs' dims with the picked batch, image tokens (from height x width) and text length."""
        tokens = self._img_tokens(pick(shapes.height), pick(shapes.width), self._vae_scale_factor(pipe_config))
        env = {"batch": pick(shapes.batch), "img_tokens": tokens, "text_len": pick(shapes.text_len)}
        return {
            t.name: tuple(env[d] if isinstance(d, str) else d for d in t.dims)
            for t in self._input_specs(module, shapes, "float32")
        }

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        """I/O specs with symbolic batch/img_tokens (and text_len when it varies), example inputs at opt."""
        import torch

        dt = dtype_name(dtype)
        outputs = [TensorSpec("latent", dt, ("batch", "img_tokens", self._channels(module)["out"]))]
        opt = self.shapes_at(module, pipe_config, shapes, lambda r: r.opt)
        sample = ExampleSampler(opt, module, dtype)
        example = self._examples(sample, self._vae_scale_factor(pipe_config), shapes.height.opt, shapes.width.opt)
        if "guidance" in opt:
            example["guidance"] = torch.full(opt["guidance"], self.guidance_example, device=sample.device)
        return ExportSpec(inputs=self._input_specs(module, shapes, dt), outputs=outputs, example_inputs=example)

    def export_patches(self) -> tuple[str, ...]:
        """Upstream patches the ONNX export needs, by name (``dtcompile.export.patches.PATCHES``): diffusers'
        ``apply_rotary_emb`` traces its reshape with constant shapes, ``dynamic_rope`` keeps it dynamic."""
        return ("dynamic_rope",)

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Pixel sizes must be multiples of 2 x the VAE's factor (FluxPipeline would round them down silently);
        the text length at most FluxPipeline's ``max_sequence_length`` limit (512)."""
        text = shapes.text_len
        if text.max > MAX_SEQUENCE_LENGTH:
            raise RecipeError(
                f"export.shapes.text_len.max: {text.max} is above {MAX_SEQUENCE_LENGTH}, the longest prompt "
                "FluxPipeline encodes (max_sequence_length)"
            )
        self.check_size_ranges(shapes, config)

    @staticmethod
    def check_image_size(height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        validate_image_size(height, width, _vae_factor(config))
