"""Qwen-Image: the ``transformer`` (a ``QwenImageTransformer2DModel``) of a ``QwenImagePipeline``.

Graph: ``hidden_states`` (packed 2x2 latent patches, batch x img_tokens x C), ``encoder_hidden_states`` (the
Qwen2.5-VL text encoder's last hidden states, batch x text_len x D), ``encoder_hidden_states_mask`` (batch x
text_len, 1 for a real token, float32), ``timestep`` (t / 1000) and the rotary embedding as real tensors:
``img_rope_cos``/``img_rope_sin`` (img_tokens x head_dim / 2) and ``txt_rope_cos``/``txt_rope_sin`` (text_len x
head_dim / 2); output ``latent`` (batch x img_tokens x 4 x out_channels).

Why the rotary embedding is a graph input: diffusers computes it from ``img_shapes`` (a Python list) as complex
numbers (``torch.polar``, ``view_as_complex``), which ONNX cannot express. ``engine_call`` turns the pipeline's
call into the graph's inputs at run time (the same ``QwenEmbedRope`` the transformer uses, split into its real
and imaginary parts), and the exported graph applies it with real arithmetic (``_RealRopeAttnProcessor``: the
same complex product written out). The text length is dynamic (``export.shapes.text_len`` min..max):
QwenImagePipeline encodes each prompt to its own token count, cut at ``max_sequence_length``.

True CFG: with ``true_cfg_scale > 1`` and a negative prompt, QwenImagePipeline calls the transformer twice per
step, the prompt first (``guidance_branches = "sequential"``); ``GenerationRequest.guidance`` is its
``true_cfg_scale`` (Qwen-Image is not guidance-distilled: ``guidance_scale`` is ignored by the pipeline).

The Qwen2.5-VL text encoder and the VAE stay in PyTorch (``aux_components`` is empty).

Importing this module loads no torch, diffusers or transformers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, Shapes, TensorSpec
from dtcompile.models.base import AdapterBase, GenerationRequest, check_size_multiple
from dtcompile.models.components import AuxGraph
from dtcompile.models.examples import ExampleSampler, model_config

if TYPE_CHECKING:
    import torch

#: The transformer's graph inputs, in order.
GRAPH_INPUTS = (
    "hidden_states",
    "encoder_hidden_states",
    "encoder_hidden_states_mask",
    "timestep",
    "img_rope_cos",
    "img_rope_sin",
    "txt_rope_cos",
    "txt_rope_sin",
)
#: QwenImagePipeline's longest text (its ``tokenizer_max_length``): max_sequence_length above it changes nothing.
MAX_SEQUENCE_LENGTH = 1024
ROPE_THETA = 10000  # QwenImageTransformer2DModel's QwenEmbedRope theta


def _apply_real_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb_qwen(x, freqs, use_real=False)`` without complex numbers: ``x`` (B, S, H, D)
    read as D / 2 complex pairs (re, im) times ``cos + i sin`` (S, D / 2), in float32, back in ``x``'s dtype."""
    import torch

    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(3).type_as(x)


@functools.cache
def _export_classes() -> tuple[type, type]:
    """The attention processor with real RoPE and the export wrapper (built on first use: need torch)."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    class RealRopeAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
        """QwenDoubleStreamAttnProcessor2_0 for a rotary embedding given as ((img_cos, img_sin), (txt_cos,
        txt_sin)); the complex one diffusers passes goes to the original processor unchanged."""

        def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                     encoder_hidden_states_mask: Any = None, attention_mask: Any = None,
                     image_rotary_emb: Any = None) -> Any:  # fmt: skip
            real = isinstance(image_rotary_emb, tuple) and isinstance(image_rotary_emb[0], tuple)
            if not real:
                return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                        attention_mask, image_rotary_emb)  # fmt: skip
            (img_cos, img_sin), (txt_cos, txt_sin) = image_rotary_emb
            mask = None
            if encoder_hidden_states_mask is not None:
                image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
                mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
            head_dim = attn.inner_dim // attn.heads
            img = [p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)]
            txt = [p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                   for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]  # fmt: skip
            for stream, norms in ((img, (attn.norm_q, attn.norm_k)), (txt, (attn.norm_added_q, attn.norm_added_k))):
                for i, norm in enumerate(norms):
                    if norm is not None:
                        stream[i] = norm(stream[i])
            for i in (0, 1):
                img[i] = _apply_real_rope(img[i], img_cos, img_sin)
                txt[i] = _apply_real_rope(txt[i], txt_cos, txt_sin)
            q, k, v = (torch.cat([t, m], dim=1) for t, m in zip(txt, img, strict=True))  # order: text, image
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)  # fmt: skip
            out = out.flatten(2, 3).to(q.dtype)
            seq_txt = encoder_hidden_states.shape[1]
            img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
            if len(attn.to_out) > 1:
                img_out = attn.to_out[1](img_out)
            return img_out, attn.to_add_out(out[:, :seq_txt].contiguous())

    class QwenImageForExport(torch.nn.Module):
        """QwenImageTransformer2DModel.forward on the graph inputs (``GRAPH_INPUTS`` order): the rotary
        embedding comes in as real tensors and every block's attention applies it with ``RealRopeAttnProcessor``
        (set on the wrapped transformer's blocks: it answers diffusers' own complex calls unchanged)."""

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer
            blocks: Any = transformer.transformer_blocks
            for block in blocks:
                if not isinstance(block.attn.processor, RealRopeAttnProcessor):
                    block.attn.set_processor(RealRopeAttnProcessor())

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            x = dict(zip(GRAPH_INPUTS, inputs, strict=True))
            t: Any = self.transformer
            hidden = t.img_in(x["hidden_states"])
            timestep = x["timestep"].to(hidden.dtype)
            context = t.txt_in(t.txt_norm(x["encoder_hidden_states"]))
            mask = x["encoder_hidden_states_mask"] > 0.5
            temb = t.time_text_embed(timestep, hidden)
            rope = ((x["img_rope_cos"], x["img_rope_sin"]), (x["txt_rope_cos"], x["txt_rope_sin"]))
            for block in t.transformer_blocks:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context,
                                        encoder_hidden_states_mask=mask, temb=temb, image_rotary_emb=rope)  # fmt: skip
            return t.proj_out(t.norm_out(hidden, temb))

    return RealRopeAttnProcessor, QwenImageForExport


@functools.cache
def _rope_module(axes: tuple[int, ...]) -> Any:
    """QwenImageTransformer2DModel's ``pos_embed`` for ``axes_dims_rope`` (parameter-free; one per axes)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    return QwenEmbedRope(theta=ROPE_THETA, axes_dim=list(axes), scale_rope=True)


def rope_inputs(config: Any, img_shapes: Any, text_len: int, device: Any = None) -> dict[str, torch.Tensor]:
    """The four rotary-embedding graph inputs for one call: what the transformer computes from ``img_shapes`` and
    the text length (``QwenEmbedRope``), split into cos (real) and sin (imaginary) parts, float32."""
    import torch

    img, txt = _rope_module(tuple(int(a) for a in config["axes_dims_rope"]))(
        img_shapes, max_txt_seq_len=text_len, device=torch.device("cpu")
    )
    parts = {"img_rope_cos": img.real, "img_rope_sin": img.imag, "txt_rope_cos": txt.real, "txt_rope_sin": txt.imag}
    return {k: v.float().contiguous().to(device) for k, v in parts.items()}


def _vae_factor(config: Callable[[str], dict[str, Any] | None]) -> int:
    vae = config("vae") or {}
    return 2 ** len(vae["temperal_downsample"]) if "temperal_downsample" in vae else 8


class QwenImageAdapter(AdapterBase):
    """Qwen-Image (Qwen/Qwen-Image): the ``transformer`` of a ``QwenImagePipeline``, with true CFG as two calls."""

    family = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    negative_prompt = True  # true CFG: true_cfg_scale > 1 with a negative prompt
    guidance_branches = "sequential"  # a call on the prompt, then one on the negative prompt
    graph_inputs = GRAPH_INPUTS
    block_lists = (("transformer_blocks", "num_layers"),)
    cache_layout_class = None
    no_cache_reason = " (Qwen-Image's rotary embedding and text mask are graph inputs the block split does not carry)"
    # ModelOpt's Qwen-Image recipe (examples/diffusers/quantization utils.py, filter_func_qwen_image): everything
    # outside transformer_blocks in high precision, and the first two and last two blocks (of Qwen-Image's 60).
    default_exclude = (
        "img_in",
        "txt_in",
        "txt_norm",
        "*time_text_embed*",
        "*norm_out*",
        "proj_out",
        "transformer_blocks.0.*",
        "transformer_blocks.1.*",
    )
    aux_components: ClassVar[dict[str, str]] = {}  # Qwen2.5-VL and the VAE stay in PyTorch

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        return {"vae_scale_factor": int(pipe.vae_scale_factor)}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        raise UnsupportedError(
            f"components: {name} of a QwenImagePipeline cannot become an engine yet (the transformer only: the "
            "Qwen2.5-VL text encoder and the VAE stay in PyTorch)"
        )

    @staticmethod
    def _widths(module: torch.nn.Module) -> dict[str, int]:
        cfg = model_config(module)
        return {
            "in": int(cfg["in_channels"]),
            "out": int(cfg.get("out_channels") or cfg["in_channels"]) * int(cfg["patch_size"]) ** 2,
            "joint": int(cfg["joint_attention_dim"]),
            "half_head": int(cfg["attention_head_dim"]) // 2,
        }

    def _input_specs(self, module: torch.nn.Module, dt: str) -> list[TensorSpec]:
        w = self._widths(module)
        return [
            TensorSpec("hidden_states", dt, ("batch", "img_tokens", w["in"])),
            TensorSpec("encoder_hidden_states", dt, ("batch", "text_len", w["joint"])),
            TensorSpec("encoder_hidden_states_mask", "float32", ("batch", "text_len")),
            TensorSpec("timestep", dt, ("batch",)),
            TensorSpec("img_rope_cos", "float32", ("img_tokens", w["half_head"])),
            TensorSpec("img_rope_sin", "float32", ("img_tokens", w["half_head"])),
            TensorSpec("txt_rope_cos", "float32", ("text_len", w["half_head"])),
            TensorSpec("txt_rope_sin", "float32", ("text_len", w["half_head"])),
        ]

    @staticmethod
    def _grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
        return height // vae_scale_factor // 2, width // vae_scale_factor // 2

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        """The graph inputs' dims with the picked batch, image tokens (height x width) and text length."""
        rows, cols = self._grid(pick(shapes.height), pick(shapes.width), int(pipe_config["vae_scale_factor"]))
        env = {"batch": pick(shapes.batch), "img_tokens": rows * cols, "text_len": pick(shapes.text_len)}
        return {
            t.name: tuple(env[d] if isinstance(d, str) else d for d in t.dims)
            for t in self._input_specs(module, "float32")
        }

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        """Symbolic batch, image tokens and text length; example inputs at opt (RoPE as the pipeline makes it)."""
        import torch

        dt = dtype_name(dtype)
        opt = self.shapes_at(module, pipe_config, shapes, lambda r: r.opt)
        sample = ExampleSampler(opt, module, dtype)
        batch, text_len = opt["encoder_hidden_states_mask"]
        grid = self._grid(shapes.height.opt, shapes.width.opt, int(pipe_config["vae_scale_factor"]))
        example = {
            "hidden_states": sample.randn("hidden_states"),
            "encoder_hidden_states": sample.randn("encoder_hidden_states"),
            "encoder_hidden_states_mask": torch.ones(batch, text_len, device=sample.device),
            "timestep": sample.rand("timestep"),  # QwenImagePipeline passes t / 1000, in the latents' dtype
            **rope_inputs(model_config(module), [[(1, *grid)]] * batch, text_len, device=sample.device),
        }
        outputs = [TensorSpec("latent", dt, ("batch", "img_tokens", self._widths(module)["out"]))]
        return ExportSpec(inputs=self._input_specs(module, dt), outputs=outputs, example_inputs=example)

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``QwenImageForExport``: the transformer's forward on ``GRAPH_INPUTS``, RoPE in real arithmetic."""
        return _export_classes()[1](module)

    def unread_params(self, config: dict[str, Any]) -> tuple[str, ...]:
        """The last block's text-stream output layers: only the image stream reaches ``norm_out``, so the export
        drops them (a LoRA on them changes nothing; refit skips them)."""
        last = f"transformer_blocks.{int(config['num_layers']) - 1}"
        return (f"{last}.attn.to_add_out.*", f"{last}.txt_mlp.*")

    def engine_call(self, kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
        """The graph inputs of one QwenImagePipeline transformer call: the rotary embedding from ``img_shapes``
        and the text length, a mask of ones where the pipeline passes None (every token real). Refuses what the
        graph cannot take: attention_kwargs (a LoRA scale at run time), guidance (guidance-distilled weights)."""
        import torch

        extra = {k: v for k, v in kwargs.items() if k not in GRAPH_INPUTS and k != "img_shapes"}
        if extra.pop("attention_kwargs", None):
            raise UnsupportedError(
                "attention_kwargs: a Qwen-Image engine takes none (fuse a LoRA at build time: recipe lora)"
            )
        if extra.get("guidance") is not None:
            raise UnsupportedError(
                "guidance: guidance-distilled Qwen-Image weights (guidance_embeds) are not supported"
            )
        extra.pop("guidance", None)
        context = kwargs["encoder_hidden_states"]
        batch, text_len = context.shape[:2]
        mask = kwargs.get("encoder_hidden_states_mask")
        mask = torch.ones(batch, text_len) if mask is None else mask.float()
        feeds = {k: kwargs[k] for k in GRAPH_INPUTS[:4] if k in kwargs}
        feeds["encoder_hidden_states_mask"] = mask.to(context.device)
        feeds.update(rope_inputs(config, kwargs["img_shapes"], text_len, device=context.device))
        return {**extra, **feeds}

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """The base arguments, with ``guidance`` as QwenImagePipeline's ``true_cfg_scale`` (its classifier-free
        guidance scale, applied with a negative prompt)."""
        kwargs = super().call_kwargs(request)
        if "guidance_scale" in kwargs:
            kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")
        return kwargs

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Pixel sizes multiples of the VAE factor x 2 (QwenImagePipeline would resize them with a warning); the
        text length at most the pipeline's ``tokenizer_max_length`` (1024)."""
        if shapes.text_len.max > MAX_SEQUENCE_LENGTH:
            raise RecipeError(
                f"export.shapes.text_len.max: {shapes.text_len.max} is above {MAX_SEQUENCE_LENGTH}, the longest "
                "prompt QwenImagePipeline encodes (tokenizer_max_length)"
            )
        self.check_size_ranges(shapes, config)

    @staticmethod
    def check_image_size(height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        check_size_multiple(height, width, 2 * _vae_factor(config), "the VAE factor x Qwen-Image's 2x2 patch")


__all__ = ["GRAPH_INPUTS", "QwenImageAdapter", "rope_inputs"]
