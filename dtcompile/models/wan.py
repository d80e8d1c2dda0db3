"""Wan2.1 / Wan2.2 text-to-video: the ``transformer`` (and Wan2.2's ``transformer_2``) of a ``WanPipeline``.

Graph: ``hidden_states`` (5-D video latents, batch x C x latent_frames x h x w), ``timestep`` (batch, 0..1000)
and ``encoder_hidden_states`` (UMT5's hidden states, batch x text_len x text_dim); output ``latent`` (the
velocity, shaped like ``hidden_states``). Batch, latent frames, height and width are dynamic within the
recipe's ranges; ``export.shapes.frames`` counts pixel frames (4k+1), which the VAE compresses 4x in time
(``(frames - 1) // 4 + 1`` latent frames) and 8x in space.

Classifier-free guidance is two calls per step (conditional, then unconditional; WanPipeline does not batch
them), so the engine's batch is the prompt batch. Wan2.2 A14B is a mixture of two experts: ``transformer`` for
the high-noise steps and ``transformer_2`` for the low-noise ones, switched by the pipeline at
``boundary_ratio``; both become engines in one artifact and the pipeline's own boundary logic picks them.

The VAE (a causal 3-D VAE decoding frame by frame with a feature cache) and the UMT5 encoder (called with an
attention mask) stay in torch: no ``components`` besides the experts for text-to-video.

Image-to-video (``WanI2VAdapter``, ``WanImageToVideoPipeline``): Wan2.1 I2V (CLIP image embeddings as a fourth
graph input), Wan2.2 I2V-A14B (two 36-channel experts) and Wan2.2 TI2V-5B (per-token timesteps: ``timestep`` is
batch x tokens; one artifact for image- and text-to-video); the conditioning image goes through the
``vae_encoder`` (and Wan2.1's ``image_encoder``) engines.
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
    GenerationRequest,
    SplitLayout,
    UlyssesLayout,
    attention_dims,
    check_size_multiple,
)
from dtcompile.models.examples import ExampleSampler, model_config

if TYPE_CHECKING:
    import torch

    from dtcompile.models.components import AuxGraph

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default T5 length is 512 (its helper's 226 is not used by __call__)


# --------------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------------


def latent_frames(frames: int, temporal: int) -> int:
    """Latent frames of ``frames`` pixel frames (``4k+1`` for Wan's 4x causal VAE)."""
    return (frames - 1) // temporal + 1


def validate_frames(frames: int, temporal: int) -> None:
    """UnsupportedError unless ``frames`` is ``k * temporal + 1`` (WanPipeline would round it silently)."""
    if frames < 1 or (frames - 1) % temporal:
        lower = (frames - 1) // temporal * temporal + 1
        raise UnsupportedError(
            f"frames {frames}: Wan takes {temporal}k+1 frames (its VAE compresses {temporal}x in time); "
            f"use {max(lower, 1)} or {lower + temporal}"
        )


def validate_video_size(height: int, width: int, multiple: int) -> None:
    """UnsupportedError unless height and width divide by the VAE factor x the patch size (16 for Wan)."""
    check_size_multiple(height, width, multiple, "Wan's VAE factor x patch size")


def _factors(config: Callable[[str], dict[str, Any] | None]) -> tuple[int, int, int]:
    """(temporal, spatial, spatial x patch) factors from the saved vae and transformer configs."""
    vae = config("vae") or {}
    temporal = int(vae.get("scale_factor_temporal") or 2 ** sum(vae.get("temperal_downsample", [False, True, True])))
    spatial = int(vae.get("scale_factor_spatial") or 2 ** len(vae.get("temperal_downsample", [0, 0, 0])))
    tr = config("transformer") or config("transformer_2") or {}
    patch = int((tr.get("patch_size") or [1, 2, 2])[1])
    return temporal, spatial, spatial * patch


@functools.cache
def _cache_part_classes() -> tuple[type, type, type]:
    """The nn.Module classes of Wan's three cache part kinds (built on first use: needs torch)."""
    from dtcompile.models.parts import BlockRun, TransformerPart

    class WanPrologue(TransformerPart):
        """WanTransformer3DModel.forward up to the first block: RoPE (float32), patch embedding, the condition
        embedder (``temb``, the per-block modulation ``tproj``, projected text ``context``); ``grid`` (zeros,
        latent frames x rows x columns after patching) carries the size to the epilogue."""

        uses = ("rope", "patch_embedding", "condition_embedder")

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__(transformer)
            self.patch = tuple(int(p) for p in model_config(transformer)["patch_size"])

        def forward(
            self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            rope_cos, rope_sin = self.rope(hidden_states)
            hidden = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
            temb, tproj, context, _ = self.condition_embedder(timestep, encoder, None, timestep_seq_len=None)
            pt, ph, pw = self.patch
            f, h, w = hidden_states.shape[2:]
            grid = hidden_states.new_zeros(f // pt, h // ph, w // pw)
            return hidden, context, tproj.unflatten(1, (6, -1)), rope_cos.float(), rope_sin.float(), temb, grid

    class WanBlocks(BlockRun):
        """A run of consecutive Wan blocks: each updates ``hidden``, reading the text, modulation and RoPE."""

        def forward(
            self,
            hidden: torch.Tensor,
            context: torch.Tensor,
            tproj: torch.Tensor,
            rope_cos: torch.Tensor,
            rope_sin: torch.Tensor,
        ) -> torch.Tensor:
            for block in self.blocks:
                hidden = block(hidden, context, tproj, (rope_cos, rope_sin))
            return hidden

    class WanEpilogue(TransformerPart):
        """The output norm (shift/scale from ``temb`` and the learnt table), proj_out and the unpatchify back to
        latents of ``grid``'s size."""

        uses = ("norm_out", "proj_out", "scale_shift_table")

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__(transformer)
            self.patch = tuple(int(p) for p in model_config(transformer)["patch_size"])

        def forward(self, hidden: torch.Tensor, temb: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
            x = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
            x = self.proj_out(x)
            pt, ph, pw = self.patch
            f, h, w = grid.shape
            x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
            return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    return WanPrologue, WanBlocks, WanEpilogue


@functools.cache
def _ulysses_classes() -> tuple[type, type]:
    """(self-attention processor, sequence-parallel transformer) of Wan's Ulysses form (built on first use)."""
    import torch

    prologue_class, blocks_class, _ = _cache_part_classes()

    class WanUlyssesAttnProcessor:
        """WanAttnProcessor for a block's self-attention (``attn1``) on this rank's tokens: projections, q/k norm
        and RoPE on the rank's rows, then ``comm.attention`` (all-to-all to a head split, attention over every
        token, all-to-all back) and the output projection."""

        def __init__(self, comm: Any) -> None:
            self.comm = comm

        def __call__(
            self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
            attention_mask: Any = None, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        ) -> torch.Tensor:  # fmt: skip
            if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
                raise UnsupportedError("--parallel ulysses: only Wan's self-attention is split (no mask, no image)")
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
            out = self.comm.attention(q, k, v).flatten(2, 3).type_as(q)
            return attn.to_out[1](attn.to_out[0](out))

    class WanUlysses(torch.nn.Module):
        """WanTransformer3DModel.forward on one rank of a Ulysses group: the prologue (patch embedding, RoPE
        tables, condition embedder: cheap) on the whole input, then this rank's slice of the video tokens and of
        the RoPE rows through every block (the self-attention exchanges heads for tokens through ``comm``; the
        cross-attention reads the whole text, which every rank has), the output norm and projection on the slice,
        and one gather of the projected tokens before the unpatchify."""

        def __init__(self, transformer: torch.nn.Module, comm: Any) -> None:
            super().__init__()
            self.comm = comm
            self.prologue = prologue_class(transformer)
            self.blocks = blocks_class(list(getattr(transformer, "blocks")))  # noqa: B009 (torch types it Tensor)
            self.tail: Any = torch.nn.ModuleList([getattr(transformer, n) for n in ("norm_out", "proj_out")])
            self.scale_shift_table = transformer.scale_shift_table
            self.patch = tuple(int(p) for p in model_config(transformer)["patch_size"])
            for block in self.blocks.blocks:
                block.attn1.set_processor(WanUlyssesAttnProcessor(comm))

        def forward(
            self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
            **unused: Any,
        ) -> torch.Tensor:  # fmt: skip
            hidden, context, tproj, cos, sin, temb, grid = self.prologue(hidden_states, timestep, encoder_hidden_states)
            shard = self.comm.shard
            hidden = self.blocks(shard(hidden, 1, "video tokens"), context, tproj, shard(cos, 1), shard(sin, 1))
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
            norm_out, proj_out = self.tail
            x = proj_out((norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden))
            x = self.comm.gather(x, 1)
            pt, ph, pw = self.patch
            f, h, w = grid.shape
            x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
            return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    return WanUlyssesAttnProcessor, WanUlysses


@functools.cache
def ulysses_block_parts() -> tuple[type, type]:
    """(pre-attention, post-attention) halves of one WanTransformerBlock, the engine form of Ulysses: each half
    can become an engine, and the self-attention between them runs with the all-to-alls (the prototype in
    ``dtcompile/tools/ulysses_engine.py``; docs/parallel.md). Their composition with attention in between is the
    block's forward."""
    import torch

    def modulation(block: Any, tproj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple((block.scale_shift_table + tproj.float()).chunk(6, dim=1))

    class WanBlockPre(torch.nn.Module):
        """norm1 with the shift/scale of ``tproj``, q/k/v projections, q/k RMS norms and RoPE on the rank's rows;
        output ``qkv`` (3, batch, tokens, heads, head dim) stacked into one tensor (one engine output)."""

        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, hidden: torch.Tensor, tproj: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
            b: Any = self.block
            shift, scale = modulation(b, tproj)[:2]
            x = (b.norm1(hidden.float()) * (1 + scale) + shift).type_as(hidden)
            attn = b.attn1
            q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(x).unflatten(2, (attn.heads, -1))
            return torch.stack([_rotate(q, cos, sin), _rotate(k, cos, sin), v])

    class WanBlockPost(torch.nn.Module):
        """The self-attention's output projection and gated residual, then the cross-attention (the whole text,
        local queries) and the feed-forward: the rest of the block, per token."""

        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, hidden: torch.Tensor, tproj: torch.Tensor, attn: torch.Tensor, context: torch.Tensor) -> Any:
            b: Any = self.block
            _, _, gate, c_shift, c_scale, c_gate = modulation(b, tproj)
            out = b.attn1.to_out[1](b.attn1.to_out[0](attn.flatten(2, 3)))
            hidden = (hidden.float() + out * gate).type_as(hidden)
            hidden = hidden + b.attn2(b.norm2(hidden.float()).type_as(hidden), context, None, None)
            x = (b.norm3(hidden.float()) * (1 + c_scale) + c_shift).type_as(hidden)
            return (hidden.float() + b.ffn(x).float() * c_gate).type_as(hidden)

    return WanBlockPre, WanBlockPost


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    """diffusers' WanAttnProcessor's real-valued RoPE of ``x`` (batch, tokens, heads, head dim) with the
    tables' rows for those tokens; the same products, interleaved by ``stack`` + ``flatten`` instead of strided
    writes, so an exported graph keeps its token count dynamic (as ``export.patches._wan_rope``)."""
    import torch

    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


#: TeaCache's published polynomials for Wan2.1 text-to-video with the time-embedding signal (ali-vilab/TeaCache,
#: TeaCache4Wan2.1/teacache_generate.py, use_ret_steps off; numpy.poly1d order).
TEACACHE_WAN21_1_3B = [2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01]
TEACACHE_WAN21_14B = [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404]


class WanCacheLayout(SplitLayout):
    """The Wan transformer split for block caching (``dtcompile.models.base.CacheLayout``): every block updates
    ``hidden`` only; the text ``context``, the modulation ``tproj`` and the RoPE tables are computed once per
    call; ``temb`` and ``grid`` (the latent size the unpatchify needs) go from the prologue to the epilogue.
    WanPipeline calls the transformer once per guidance branch (``cache_context`` "cond" / "uncond"): the cache
    runtime keeps one state per branch."""

    streams = ("hidden",)
    shared = ("context", "tproj", "rope_cos", "rope_sin")
    carried = ("temb", "grid")
    epilogue_inputs = ("hidden", "temb", "grid")
    teacache_signal = "temb"  # TeaCache4Wan2.1 (without ret steps): the time embedding ``e``

    part_classes = staticmethod(_cache_part_classes)

    def tensor_dims(
        self, module: torch.nn.Module, dims: dict[str, tuple[int | str, ...]], symbolic: bool
    ) -> dict[str, tuple[int | str, ...]]:
        if len(dims.get("timestep", ())) != 1:
            raise UnsupportedError(
                "cache: per-token timesteps (Wan2.2 TI2V's expand_timesteps) are not split into block engines yet; "
                "remove the cache section"
            )
        inner, head = attention_dims(model_config(module))
        batch, _, f, h, w = dims["hidden_states"]
        if symbolic:
            # symbolic, so the epilogue's graph reads its size (static dims would be folded and the input dropped)
            grid: tuple[int | str, ...] = ("grid_frames", "grid_height", "grid_width")
            tokens: int | str = "tokens"
        else:
            pt, ph, pw = (int(p) for p in model_config(module)["patch_size"])
            grid = (int(f) // pt, int(h) // ph, int(w) // pw)
            tokens = grid[0] * grid[1] * grid[2]
        return {
            "hidden": (batch, tokens, inner),
            "context": (batch, dims["encoder_hidden_states"][1], inner),
            "tproj": (batch, 6, inner),
            "rope_cos": (1, tokens, 1, head),
            "rope_sin": (1, tokens, 1, head),
            "temb": (batch, inner),
            "grid": grid,
        }


class WanAdapter(AdapterBase):
    """Wan2.1 / Wan2.2 T2V: ``transformer`` (and ``transformer_2``) of a ``WanPipeline`` become engines."""

    family = "wan"
    pipeline_class = "WanPipeline"
    negative_prompt = True  # classifier-free guidance with a negative prompt
    video = True
    guidance_branches = "sequential"  # a "cond" call, then an "uncond" call
    graph_inputs = ("hidden_states", "timestep", "encoder_hidden_states")
    block_lists = (("blocks", "num_layers"),)
    cache_layout_class = WanCacheLayout

    ulysses = True

    def ulysses_module(self, transformer: torch.nn.Module, comm: Any) -> torch.nn.Module:
        """The Wan transformer on one rank of a Ulysses group (``_ulysses_classes``)."""
        return _ulysses_classes()[1](transformer, comm)

    def ulysses_layout(
        self, config: dict[str, Any], pipe_config: Callable[[str], dict[str, Any] | None], height: int, width: int,
        frames: int | None, text_len: int,
    ) -> UlyssesLayout:  # fmt: skip
        """Video tokens (latent frames x rows x columns after patching) in every block's self-attention; the
        projected tokens (out_channels x patch volume each) gathered at the end."""
        temporal, _, multiple = _factors(pipe_config)
        pt, ph, pw = (int(p) for p in config.get("patch_size") or (1, 2, 2))
        tokens = latent_frames(frames or 1, temporal) // pt * (height // multiple) * (width // multiple)
        heads = int(config["num_attention_heads"])
        out = int(config.get("out_channels") or config["in_channels"]) * pt * ph * pw
        return UlyssesLayout(tokens, int(config["num_layers"]), self.hidden_width(config), heads, tokens, out)

    def teacache_coefficients(self, config: dict[str, Any]) -> tuple[list[float], str]:
        """TeaCache4Wan2.1's polynomial for the time-embedding signal: the 14B one for 5120-wide transformers
        (Wan2.1-T2V-14B; none is published for Wan2.2's experts), else the 1.3B one."""
        if self.hidden_width(config) >= 5120:
            return list(TEACACHE_WAN21_14B), "published: TeaCache4Wan2.1 (T2V-14B; none published for Wan2.2)"
        return list(TEACACHE_WAN21_1_3B), "published: TeaCache4Wan2.1 (T2V-1.3B)"

    per_prompt_key = "num_videos_per_prompt"
    aux_components: ClassVar[dict[str, str]] = {}  # the causal VAE and the masked UMT5 call stay in torch
    # NVIDIA's Wan examples keep the embedders, the output head and the norms in high precision.
    default_exclude = (
        "*patch_embedding*", "*condition_embedder*", "*proj_out*", "*norm_out*", "*scale_shift_table*",
    )  # fmt: skip

    @staticmethod
    def denoisers(model_index: dict[str, Any]) -> tuple[str, ...]:
        """The engine components: ``transformer``, plus ``transformer_2`` when the pipeline has one (Wan2.2)."""
        two = isinstance(model_index.get("transformer_2"), list) and model_index["transformer_2"][0] is not None
        return ("transformer", "transformer_2") if two else ("transformer",)

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        """The VAE's factors, and whether the pipeline passes per-token timesteps (Wan2.2 TI2V's
        ``expand_timesteps``: ``timestep`` is batch x tokens)."""
        return {
            "temporal": int(pipe.vae_scale_factor_temporal),
            "spatial": int(pipe.vae_scale_factor_spatial),
            "expand_timesteps": bool(pipe.config.get("expand_timesteps") or False),
        }

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        raise UnsupportedError(f"components: WanPipeline has no engine component {name!r}")

    @staticmethod
    def _latent(
        module: torch.nn.Module, pipe_config: dict[str, Any], batch: int, frames: int, h: int, w: int
    ) -> tuple[int, ...]:
        s = pipe_config["spatial"]
        return (
            batch,
            int(model_config(module)["in_channels"]),
            latent_frames(frames, pipe_config["temporal"]),
            h // s,
            w // s,
        )

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        batch, frames, h, w = (pick(r) for r in (shapes.batch, self._frames(shapes), shapes.height, shapes.width))
        latent = self._latent(module, pipe_config, batch, frames, h, w)
        pt, ph, pw = (int(p) for p in model_config(module)["patch_size"])
        tokens = latent[2] // pt * (latent[3] // ph) * (latent[4] // pw)
        return {
            "hidden_states": latent,
            "timestep": (batch, tokens) if pipe_config.get("expand_timesteps") else (batch,),
            "encoder_hidden_states": (batch, pick(shapes.text_len), int(model_config(module)["text_dim"])),
        }

    @staticmethod
    def _frames(shapes: Shapes) -> Range:
        if shapes.frames is None:
            raise RecipeError("export.shapes.frames: Wan builds need a frame range (pixel frames, 4k+1)")
        return shapes.frames

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:

        dt = dtype_name(dtype)
        c, out = (
            int(model_config(module)["in_channels"]),
            int(model_config(module)["out_channels"] or model_config(module)["in_channels"]),
        )
        text: int | str = "text_len" if shapes.text_len.min != shapes.text_len.max else shapes.text_len.opt
        inputs = [
            TensorSpec("hidden_states", dt, ("batch", c, "latent_frames", "latent_height", "latent_width")),
            TensorSpec("timestep", dt, ("batch", "tokens") if pipe_config.get("expand_timesteps") else ("batch",)),
            TensorSpec("encoder_hidden_states", dt, ("batch", text, int(model_config(module)["text_dim"]))),
        ]
        outputs = [TensorSpec("latent", dt, ("batch", out, "latent_frames", "latent_height", "latent_width"))]
        opt = self.shapes_at(module, pipe_config, shapes, lambda r: r.opt)
        sample = ExampleSampler(opt, module, dtype)
        example = {
            "hidden_states": sample.randn("hidden_states"),
            "timestep": sample.rand("timestep", 1000),  # WanPipeline passes the scheduler's timesteps (0..1000)
            "encoder_hidden_states": sample.randn("encoder_hidden_states"),
        }
        return ExportSpec(inputs=inputs, outputs=outputs, example_inputs=example)

    def export_patches(self) -> tuple[str, ...]:
        """``wan_rope``: WanAttnProcessor's RoPE without shape-fixed in-place writes (dtcompile.export.patches)."""
        return ("wan_rope",)

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Frames 4k+1 within the range, sizes multiples of 16, the T5 length at most 512."""
        if shapes.frames is None:
            raise RecipeError("export.shapes.frames: Wan builds need a frame range (pixel frames, 4k+1), e.g. 33")
        if shapes.text_len.max > MAX_SEQUENCE_LENGTH:
            raise RecipeError(f"export.shapes.text_len.max: {shapes.text_len.max} is above {MAX_SEQUENCE_LENGTH}")
        temporal = _factors(config)[0]
        for which in ("min", "opt", "max"):
            try:
                validate_frames(getattr(shapes.frames, which), temporal)
            except UnsupportedError as exc:
                raise RecipeError(f"export.shapes.frames.{which}: {str(exc).removeprefix('frames ')}") from None
        self.check_size_ranges(shapes, config)

    @staticmethod
    def check_image_size(height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        validate_video_size(height, width, _factors(config)[2])

    @staticmethod
    def check_frames(frames: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        validate_frames(frames, _factors(config)[0])

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """WanPipeline's arguments (``num_frames`` from the request, its default 81 otherwise); frames come back as
        numpy arrays where PIL images are asked for (``runtime.media`` writes them)."""
        kwargs = super().call_kwargs(request)
        if kwargs["output_type"] == "pil":
            kwargs["output_type"] = "np"
        return kwargs


# --------------------------------------------------------------------------------------------------
# Image-to-video
# --------------------------------------------------------------------------------------------------

#: WanAttnProcessor splits an image-conditioned cross-attention context at ``tokens - 512``: the text part of a
#: Wan2.1 I2V transformer (``added_kv_proj_dim`` set) is always 512 tokens.
I2V_TEXT_LEN = 512


def _i2v_transformer(config: Callable[[str], dict[str, Any] | None]) -> dict[str, Any]:
    return config("transformer") or config("transformer_2") or {}


class WanI2VAdapter(WanAdapter):
    """Wan image-to-video (``WanImageToVideoPipeline``): Wan2.1-I2V (one expert; CLIP vision ``image_encoder``
    whose penultimate hidden states enter the transformer as ``encoder_hidden_states_image``) and Wan2.2-I2V-A14B
    (two experts, no image encoder). The transformer takes the noise latents, the 4-channel first-frame mask and
    the VAE-encoded condition video stacked on channels (36 for both); the condition video (the image, zero
    frames, and the last image when given) goes through ``vae.encode`` (the ``vae_encoder`` component)."""

    family = "wan-i2v"
    pipeline_class = "WanImageToVideoPipeline"
    reference_image = True
    aux_components: ClassVar[dict[str, str]] = {"vae_encoder": "vae_encoder", "image_encoder": "clip_vision"}

    #: The pipeline that runs the same components without an image, where the artifact can (``image_optional``).
    text_pipeline_class = "WanPipeline"

    @staticmethod
    def image_optional(model_index: dict[str, Any]) -> bool:
        """Whether the artifact makes videos without an image too: Wan2.2 TI2V (``expand_timesteps``), whose one
        expert is trained for text-to-video and image-to-video; the I2V models need the image."""
        return bool(model_index.get("expand_timesteps"))

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        cfg = WanAdapter.pipe_config(pipe)
        encoder = getattr(pipe, "image_encoder", None)
        if encoder is not None:
            vision = encoder.config
            cfg["image_tokens"] = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1
        return cfg

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        from dtcompile.models.components import ImageEncoderGraph, VaeEncoderGraph

        if name == "vae_encoder":
            # TI2V (expand_timesteps) encodes the image alone; the others the image then zero frames
            frames = 1 if pipe_config.get("expand_timesteps") else None
            return VaeEncoderGraph(pipe_config["spatial"], temporal=pipe_config["temporal"], frames=frames)
        if name == "image_encoder":
            if "image_tokens" not in pipe_config:
                raise UnsupportedError(
                    "components: this WanImageToVideoPipeline has no image_encoder (Wan2.2 I2V conditions on the "
                    "VAE latents only); remove image_encoder from components"
                )
            return ImageEncoderGraph()
        raise UnsupportedError(f"components: WanImageToVideoPipeline has no engine component {name!r}")

    @staticmethod
    def _image_input(module: torch.nn.Module) -> bool:
        return model_config(module).get("image_dim") is not None

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from dtcompile.models.base import _positional_forward_class

        names = (*self.graph_inputs, "encoder_hidden_states_image") if self._image_input(module) else self.graph_inputs
        return _positional_forward_class()(module, names)

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        got = super().shapes_at(module, pipe_config, shapes, pick)
        if self._image_input(module):
            tokens = int(pipe_config.get("image_tokens") or 0)
            if not tokens:
                raise UnsupportedError("the transformer takes image embeddings but the pipeline has no image_encoder")
            got["encoder_hidden_states_image"] = (pick(shapes.batch), tokens, int(model_config(module)["image_dim"]))
        return got

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        spec = super().export_spec(module, pipe_config, shapes, dtype)
        if not self._image_input(module):
            return spec
        shape = self.shapes_at(module, pipe_config, shapes, lambda r: r.opt)["encoder_hidden_states_image"]
        spec.inputs.append(TensorSpec("encoder_hidden_states_image", dtype_name(dtype), ("batch", *shape[1:])))
        sample = ExampleSampler({"encoder_hidden_states_image": shape}, module, dtype)
        spec.example_inputs["encoder_hidden_states_image"] = sample.randn("encoder_hidden_states_image")
        return spec

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """T2V's rules, and a text length of exactly 512 where the transformer has image key/value projections
        (WanAttnProcessor splits the context at ``tokens - 512``)."""
        super().check_shapes(shapes, config)
        if _i2v_transformer(config).get("added_kv_proj_dim") is not None and (
            shapes.text_len.min != I2V_TEXT_LEN or shapes.text_len.max != I2V_TEXT_LEN
        ):
            raise RecipeError(
                f"export.shapes.text_len: Wan2.1 I2V splits its cross-attention context at 512 text tokens; set "
                f"min, opt and max to {I2V_TEXT_LEN}"
            )

    def block_names(self, config: dict[str, Any]) -> list[str]:
        if config.get("image_dim") is not None:
            raise UnsupportedError(
                "cache: Wan2.1 I2V's transformer (image embeddings in the prologue) is not split into block engines "
                "yet; remove the cache section (Wan2.2 I2V splits)"
            )
        return super().block_names(config)

    def reference_size(
        self, image_size: tuple[int, int], height: Range, width: Range, config: Callable[[str], dict[str, Any] | None]
    ) -> tuple[int, int]:
        """(height, width) for a conditioning image of ``image_size`` (w, h) when the caller names no size: the
        built opt area at the image's aspect, in multiples of the VAE factor x patch size (what diffusers'
        Wan I2V example does with ``max_area``); UnsupportedError when that size is outside the built ranges."""
        multiple = _factors(config)[2]
        w, h = image_size
        area, aspect = height.opt * width.opt, h / w
        out_h = max(multiple, round((area * aspect) ** 0.5 / multiple) * multiple)
        out_w = max(multiple, round((area / aspect) ** 0.5 / multiple) * multiple)
        if not (height.min <= out_h <= height.max and width.min <= out_w <= width.max):
            raise UnsupportedError(
                f"--image: a {w}x{h} image (aspect {w / h:.2f}) makes {out_w}x{out_h} at the artifact's area; the "
                f"artifact takes widths {width.min}..{width.max} and heights {height.min}..{height.max}: crop the "
                "image or pass --height and --width"
            )
        return out_h, out_w

    @staticmethod
    def check_last_image(tr: dict[str, Any], model_index: dict[str, Any]) -> None:
        """UnsupportedError where the pipeline cannot take a last frame: Wan2.2 TI2V (``expand_timesteps`` in the
        pipeline's ``model_index``) conditions on the first frame only and would drop it; a Wan2.1 I2V
        transformer (config ``tr``) without the first-last-frame position table (FLF2V's ``pos_embed_seq_len``)
        gets two image embeddings per video."""
        if model_index.get("expand_timesteps"):
            raise UnsupportedError(
                "--last-image: Wan2.2 TI2V conditions on the first frame only (WanImageToVideoPipeline ignores "
                "last_image with expand_timesteps); leave --last-image out"
            )
        if tr.get("image_dim") is not None and tr.get("pos_embed_seq_len") is None:
            raise UnsupportedError(
                "--last-image: this Wan2.1 I2V model has no first-last-frame conditioning (Wan2.1-FLF2V's "
                "pos_embed_seq_len); Wan2.2 I2V takes a last image"
            )

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """WanImageToVideoPipeline's arguments: T2V's, the conditioning image (a fixed synthetic one for
        calibration and benchmarks, which pass none) and the last image when given."""
        from PIL import Image

        from dtcompile.models.kontext import synthetic_reference

        kwargs = super().call_kwargs(request)
        image = request.image if request.image is not None else synthetic_reference(request.height, request.width)
        for key, value in (("image", image), ("last_image", request.last_image)):
            if value is None:
                continue
            if not isinstance(value, Image.Image):
                raise UnsupportedError(f"{key}: a PIL image is expected, got {type(value).__name__}")
            kwargs[key] = value.convert("RGB")
        return kwargs
