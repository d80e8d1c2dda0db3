"""Engine graphs for a pipeline's other heavy components: its text encoders and its VAE decoder.

Families share these (FLUX and SD3 both use CLIP, T5 and an ``AutoencoderKL``), so they live here and each
adapter's ``aux_graph`` picks one per component name with the family's facts (which outputs the pipeline
reads, the tokenizer's fixed length, the VAE's scale factor). Each graph says what it exports
(``export_spec``, ``export_module``), its TensorRT ``shape_profile``, the pipeline attribute it stands in
for (``attr``) and the stand-in the runtime puts there (``role``; ``dtcompile.backends.standin.STANDINS``).

Text encoders: ``input_ids`` (int64, batch x tokens) in; out the tensors the pipeline reads, named after the
transformers output fields (``last_hidden_state``, ``pooler_output``, ``text_embeds``) plus
``penultimate_hidden_state`` (``hidden_states[-2]``, SD3's CLIP input). VAE decoder: ``latent`` (batch x C x
h/f x w/f) in, ``sample`` (batch x 3 x h x w) out, as ``vae.decode(latent)`` computes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, ShapeProfile, Shapes, TensorSpec
from dtcompile.core.tiles import TileSpec
from dtcompile.models.examples import ExampleSampler, model_config

if TYPE_CHECKING:
    import torch

#: Graph outputs a text encoder stand-in can hand back, and the width key of each in the encoder's config.
TEXT_OUTPUTS = ("last_hidden_state", "pooler_output", "text_embeds", "penultimate_hidden_state")

#: Component names the recipe's ``components`` list can name besides the denoiser.
AUX_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder")

#: T5 encoder modules a quantized T5 keeps in its own dtype, besides what no format quantizes (the RMS norms;
#: attention matmuls stay unquantized in text encoders): the token embedding and the relative position bias
#: (lookups, to which ModelOpt would give fp8 weight quantizers) and the feed-forward output projection ``wo``,
#: which transformers keeps in float32 for 8-bit T5 because T5 v1.1-XXL's inputs to it carry outliers
#: (``T5PreTrainedModel._keep_in_fp32_modules``, huggingface/transformers#20287).
T5_QUANT_EXCLUDE = ("shared", "*embed_tokens", "*relative_attention_bias", "*DenseReluDense.wo")


@dataclass(frozen=True)
class ComponentKind:
    """What an aux component is, and the quant formats dtcompile builds it in (``components[i].quant``).

    ``quant_exclude``: module-name patterns (fnmatch, as ``quant.exclude``) left in the component's dtype when
    it is quantized; ``no_quant``: why a kind with no formats takes none (the refusal says it);
    ``model_types``: the ``config.model_type`` values of the modules its quant formats are built for.
    """

    description: str
    quant_formats: tuple[str, ...] = ()
    quant_exclude: tuple[str, ...] = ()
    no_quant: str = ""
    model_types: tuple[str, ...] = ()

    def foreign(self, module: Any) -> str | None:
        """Why ``module`` is not the kind of model this kind's quant formats are built for (None when it is)."""
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type in self.model_types:
            return None
        return (
            f"is a {type(module).__name__} (model_type {model_type!r}), not {self.description} "
            f"(model_type {' or '.join(map(repr, self.model_types))})"
        )


#: The kinds ``ModelAdapter.aux_components`` maps each component name to.
COMPONENT_KINDS: dict[str, ComponentKind] = {
    "clip": ComponentKind(
        "a CLIP text encoder", no_quant="CLIP encoders stay unquantized; fp8 is built for T5 encoders"
    ),
    "t5": ComponentKind("a T5 text encoder", ("fp8",), T5_QUANT_EXCLUDE, model_types=("t5", "umt5")),
    "vae": ComponentKind("the VAE decoder", no_quant="it stays float: dtcompile never quantizes convolutions"),
}


def aux_attr(name: str) -> str:
    """The pipeline attribute (and source folder) behind component ``name``: ``vae`` for ``vae_decoder``."""
    return "vae" if name == "vae_decoder" else name


class AuxGraph(Protocol):
    """One non-denoiser component as an engine graph."""

    # read-only: the graphs are frozen dataclasses
    @property
    def name(self) -> str:
        """Component name in the recipe and manifest, e.g. "text_encoder_2", "vae_decoder"."""

    @property
    def attr(self) -> str:
        """The pipeline attribute the stand-in replaces, e.g. "text_encoder_2", "vae"."""

    @property
    def role(self) -> str:
        """The runtime stand-in: "text_encoder" | "vae_decoder"."""

    def module(self, pipe: Any) -> torch.nn.Module:
        """The torch module exported (``pipe.<attr>``)."""

    def export_spec(self, module: torch.nn.Module, shapes: Shapes, dtype: torch.dtype) -> ExportSpec:
        """I/O specs and example inputs at the opt shapes."""

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A wrapper taking the graph inputs positionally and returning the graph outputs in order."""

    def shape_profile(self, module: torch.nn.Module, shapes: Shapes) -> ShapeProfile:
        """Concrete min/opt/max shapes of every graph input."""

    def exporting(self, module: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """What the export of ``module`` needs set for its duration (restored after)."""


@dataclass(frozen=True)
class TextEncoderGraph:
    """A transformers text encoder (CLIP, T5): ``input_ids`` in, ``outputs`` out.

    ``tokens``: a fixed token count (CLIP's tokenizer pads to its 77); None: the recipe's ``text_len`` (T5,
    padded to ``max_sequence_length``). The encoder's batch is the recipe's prompt batch (pipelines encode
    the prompt once and repeat the embeddings per image).
    """

    name: str
    outputs: tuple[str, ...]
    tokens: int | None = None
    role: str = "text_encoder"

    def __post_init__(self) -> None:
        unknown = [o for o in self.outputs if o not in TEXT_OUTPUTS]
        if unknown or not self.outputs:
            raise ValueError(f"text encoder outputs {unknown or '()'}: choose from {TEXT_OUTPUTS}")

    @property
    def attr(self) -> str:
        return self.name

    def module(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.attr)

    def _tokens(self, shapes: Shapes) -> Range:
        return shapes.text_len if self.tokens is None else Range(self.tokens, self.tokens, self.tokens)

    @property
    def tokenizer(self) -> str:
        """The pipeline attribute of this encoder's tokenizer (diffusers' naming: text_encoder_2 -> tokenizer_2)."""
        return self.name.replace("text_encoder", "tokenizer", 1)

    def input_ids(self, pipe: Any, prompts: list[str], shapes: Shapes) -> torch.Tensor:
        """``prompts`` tokenized as the pipelines do for this encoder (padded and truncated to the graph's token
        count at the opt shape: CLIP's 77, T5's ``text_len``): int64, len(prompts) x tokens."""
        tokenizer = getattr(pipe, self.tokenizer)
        n = self._tokens(shapes).opt
        return tokenizer(
            list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="pt"
        ).input_ids

    @staticmethod
    def _widths(module: torch.nn.Module) -> dict[str, int]:
        cfg = model_config(module)
        hidden = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        return {
            "last_hidden_state": hidden,
            "penultimate_hidden_state": hidden,
            "pooler_output": hidden,
            "text_embeds": int(getattr(cfg, "projection_dim", hidden)),
        }

    def export_spec(self, module: torch.nn.Module, shapes: Shapes, dtype: torch.dtype) -> ExportSpec:
        import torch

        r = self._tokens(shapes)
        seq: int | str = r.opt if r.min == r.max else "text_len"
        widths, dt = self._widths(module), dtype_name(dtype)
        outputs = [
            TensorSpec(
                o, dt, ("batch", widths[o]) if o in ("pooler_output", "text_embeds") else ("batch", seq, widths[o])
            )
            for o in self.outputs
        ]
        vocab = int(model_config(module).vocab_size)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (shapes.batch.opt, r.opt), generator=gen, dtype=torch.int64)
        device = next(module.parameters()).device
        return ExportSpec(
            inputs=[TensorSpec("input_ids", "int64", ("batch", seq))],
            outputs=outputs,
            example_inputs={"input_ids": ids.to(device)},
        )

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _text_wrapper_class()(module, self.outputs)

    def shape_profile(self, module: torch.nn.Module, shapes: Shapes) -> ShapeProfile:
        return ShapeProfile.over_ranges(lambda pick: {"input_ids": (pick(shapes.batch), pick(self._tokens(shapes)))})

    @contextlib.contextmanager
    def exporting(self, module: torch.nn.Module) -> Iterator[None]:
        """What a 16-bit encoder's export needs, restored after (float32 graphs compute the same either way):

        - transformers' eager attention (matmul, softmax, matmul): the TorchScript exporter's symbolic of
          ``scaled_dot_product_attention`` fails on bfloat16 encoders ("ScalarType ComplexDouble is an
          unexpected tensor scalar type").
        - T5's tanh GELU (``NewGELUActivation``, Python arithmetic) as ``F.gelu(approximate="tanh")``: traced
          as written, a bfloat16 graph holds sqrt(2/pi) and 0.044715 rounded to bfloat16 (-0.13%; torch
          computes with them unrounded), while aten::gelu's export computes in fp32 (``export.patches``).
        """
        with contextlib.ExitStack() as stack:
            before = getattr(model_config(module), "_attn_implementation", None)
            set_attn = getattr(module, "set_attn_implementation", None)  # transformers' PreTrainedModel
            if before not in (None, "eager") and set_attn is not None:
                set_attn("eager")
                stack.callback(set_attn, before)
            stack.enter_context(_tanh_gelu_as_aten())
            yield


@contextlib.contextmanager
def _tanh_gelu_as_aten() -> Iterator[None]:
    """transformers' ``NewGELUActivation`` computed by ``F.gelu(approximate="tanh")`` (the same function)."""
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # not a transformers encoder
        yield
        return
    from unittest import mock

    import torch.nn.functional as F  # noqa: N812

    def tanh_gelu(self: Any, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return F.gelu(input, approximate="tanh")

    with mock.patch.object(NewGELUActivation, "forward", tanh_gelu):  # the original is restored on exit
        yield


def _text_wrapper_class() -> type:
    import torch

    class TextEncoderForExport(torch.nn.Module):
        """input_ids -> the chosen output fields of a transformers text encoder, in order."""

        def __init__(self, encoder: torch.nn.Module, outputs: tuple[str, ...]) -> None:
            super().__init__()
            self.encoder = encoder
            self.outputs = outputs

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            hidden = "penultimate_hidden_state" in self.outputs
            out = self.encoder(input_ids, output_hidden_states=hidden, return_dict=True)
            got: dict[str, Any] = {
                "penultimate_hidden_state": out.hidden_states[-2] if hidden else None,
                **{k: getattr(out, k, None) for k in ("last_hidden_state", "pooler_output", "text_embeds")},
            }
            return tuple(got[o] for o in self.outputs)

    return TextEncoderForExport


@dataclass(frozen=True)
class VaeDecoderGraph:
    """``vae.decode``: latents (batch x C x height/f x width/f) in, the image (batch x 3 x height x width) out.

    ``scale_factor`` is the pipeline's ``vae_scale_factor`` (pixels per latent); the batch is the recipe's
    images per call (``shapes.batch``). ``tile`` (pixels, ``components[i].tile``): the graph is built for tiles
    of at most that size (down to one latent, for the edge tiles) and the runtime decodes larger latents tile by
    tile (``dtcompile.runtime.tiling``).
    """

    scale_factor: int
    name: str = "vae_decoder"
    attr: str = "vae"
    role: str = "vae_decoder"
    tile: int | None = None

    def module(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.attr)

    def _latent(self, pixels: int, var: str) -> int:
        if pixels % self.scale_factor:
            raise UnsupportedError(
                f"export.shapes.{var}: {pixels} is not a multiple of the VAE's factor {self.scale_factor}"
            )
        return pixels // self.scale_factor

    def _shape(self, module: torch.nn.Module, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (
            batch,
            int(model_config(module).latent_channels),
            self._latent(height, "height"),
            self._latent(width, "width"),
        )

    def _tiled(self, shapes: Shapes) -> Shapes:
        """``shapes`` with height and width the tile's range: one latent (an edge tile) up to the tile."""
        if self.tile is None:
            return shapes
        TileSpec.kl(self.tile, self.scale_factor, "components: vae_decoder tile")  # a tile diffusers' geometry can make
        for var in ("height", "width"):
            r: Range = getattr(shapes, var)
            if self.tile >= r.max:
                raise UnsupportedError(
                    f"components: vae_decoder tile {self.tile} is not below export.shapes.{var}.max {r.max}: nothing "
                    "to tile; drop tile or raise the max"
                )
        r = Range(self.scale_factor, self.tile, self.tile)
        return dataclasses.replace(shapes, height=r, width=r)

    def export_spec(self, module: torch.nn.Module, shapes: Shapes, dtype: torch.dtype) -> ExportSpec:
        dt = dtype_name(dtype)
        shapes = self._tiled(shapes)
        c, out_c = int(model_config(module).latent_channels), int(model_config(module).out_channels)
        opt = {"latent": self._shape(module, shapes.batch.opt, shapes.height.opt, shapes.width.opt)}
        return ExportSpec(
            inputs=[TensorSpec("latent", dt, ("batch", c, "latent_height", "latent_width"))],
            outputs=[TensorSpec("sample", dt, ("batch", out_c, "height", "width"))],
            example_inputs={"latent": ExampleSampler(opt, module, dtype).randn("latent")},
        )

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _vae_wrapper_class()(module)

    def shape_profile(self, module: torch.nn.Module, shapes: Shapes) -> ShapeProfile:
        shapes = self._tiled(shapes)
        return ShapeProfile.over_ranges(
            lambda pick: {"latent": self._shape(module, pick(shapes.batch), pick(shapes.height), pick(shapes.width))}
        )

    def tile_record(self) -> dict[str, Any] | None:
        """The manifest's ``tile`` entry (``core.tiles.TileSpec``, AutoencoderKL's layout); None untiled."""
        if self.tile is None:
            return None
        return TileSpec.kl(self.tile, self.scale_factor, "components: vae_decoder tile").to_json()

    def exporting(self, module: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _vae_wrapper_class() -> type:
    import torch

    class VaeDecoderForExport(torch.nn.Module):
        """latent -> ``vae.decode(latent).sample`` (no tiling or slicing)."""

        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae: Any = vae  # a diffusers VAE: ``decode`` is its own, not torch.nn.Module's

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent, return_dict=False)[0]

    return VaeDecoderForExport
