"""Engine graphs for a pipeline's other heavy components: its text encoders, its VAE decoder and encoder and its
image encoder (Wan2.1 I2V's CLIP vision tower).

Families share these (FLUX and SD3 both use CLIP, T5 and an ``AutoencoderKL``), so they live here and each
adapter's ``aux_graph`` picks one per component name with the family's facts (which outputs the pipeline
reads, the tokenizer's fixed length, the VAE's scale factor). Each graph says what it exports
(``export_spec``, ``export_module``), its TensorRT ``shape_profile``, the pipeline attribute it stands in
for (``attr``) and the stand-in the runtime puts there (``role``; ``dtcompile.backends.standin.STANDINS``).

Text encoders: ``input_ids`` (int64, batch x tokens) in; out the tensors the pipeline reads, named after the
transformers output fields (``last_hidden_state``, ``pooler_output``, ``text_embeds``) plus
``penultimate_hidden_state`` (``hidden_states[-2]``, SD3's CLIP input). VAE decoder: ``latent`` (batch x C x
h/f x w/f) in, ``sample`` (batch x 3 x h x w) out, as ``vae.decode(latent)`` computes it. VAE encoder:
``sample`` (the image, or a video of a fixed frame count) in, ``moments`` (the posterior's mean and log-variance
stacked on the channel axis, what ``DiagonalGaussianDistribution`` takes) out, as ``vae.encode(x).latent_dist``
holds them. Image encoder: ``pixel_values`` in, ``penultimate_hidden_state`` out.
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
AUX_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder", "vae_encoder", "image_encoder")

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
    "vae_encoder": ComponentKind("the VAE encoder", no_quant="it stays float: dtcompile never quantizes convolutions"),
    "clip_vision": ComponentKind(
        "a CLIP image encoder", no_quant="image encoders stay unquantized; fp8 is built for T5 encoders"
    ),
}


def aux_attr(name: str) -> str:
    """The pipeline attribute (and source folder) behind component ``name``: ``vae`` for ``vae_decoder`` and
    ``vae_encoder``."""
    return "vae" if name in ("vae_decoder", "vae_encoder") else name


#: Roles whose stand-in wraps the pipeline's module instead of replacing it: the VAE encoder engine runs
#: ``vae.encode`` and hands ``decode`` to what stays at ``pipe.vae`` (the torch VAE, or the decoder engine).
WRAPPING_ROLES = ("vae_encoder",)


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
        """The runtime stand-in: "text_encoder" | "vae_decoder" | "vae_encoder" | "image_encoder"."""

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


def _latent_channels(config: Any) -> int:
    """Latent channels of a diffusers VAE config (``latent_channels``; Wan's ``z_dim``)."""
    value = getattr(config, "latent_channels", None) or getattr(config, "z_dim", None)
    if value is None:
        raise UnsupportedError("vae_encoder: the VAE config has neither latent_channels nor z_dim")
    return int(value)


def _pixel_channels(config: Any) -> int:
    """Channels of the image a VAE encodes: ``in_channels``, divided by the patch area where the VAE patchifies
    its input first (the Wan2.2 VAE: 12 = 3 x 2 x 2)."""
    channels = int(getattr(config, "in_channels", 3) or 3)
    patch = getattr(config, "patch_size", None)
    return channels // (int(patch) ** 2) if isinstance(patch, int) and patch > 1 else channels


@dataclass(frozen=True)
class VaeEncoderGraph:
    """``vae.encode``: the image (batch x 3 x height x width) in, ``moments`` (batch x 2C x height/f x width/f:
    the posterior's mean and log-variance) out, one image a call (the pipelines encode their conditioning image
    alone and repeat the latents per output; a batch runs one call per image); the stand-in hands diffusers a ``DiagonalGaussianDistribution``
    of them, so ``latent_dist.mode()`` and ``latent_dist.sample(generator)`` compute as the torch VAE does.

    ``temporal`` (video VAEs such as Wan's causal 3-D VAE, which encodes in time chunks of ``temporal`` frames
    after the first; None for an image VAE): the graph takes a fixed frame count, the recipe's
    ``export.shapes.frames.max`` (the chunk loop is unrolled at export). The encoder is causal, so a shorter video padded with zero frames at the end gives the
    same leading latent frames: the stand-in pads and keeps ``(n - 1) // temporal + 1`` of them.
    """

    scale_factor: int
    temporal: int | None = None
    frames: int | None = None  # a video VAE's fixed frame count where it is not the recipe's maximum (TI2V: 1)
    name: str = "vae_encoder"
    attr: str = "vae"
    role: str = "vae_encoder"

    def module(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.attr)

    def _frames(self, shapes: Shapes) -> int | None:
        if self.temporal is None:
            return None
        if self.frames is not None:
            return self.frames
        if shapes.frames is None:
            raise UnsupportedError("export.shapes.frames: a video VAE encoder needs the recipe's frame range")
        return shapes.frames.max

    def _shape(
        self, module: torch.nn.Module, batch: int, height: int, width: int, frames: int | None
    ) -> tuple[int, ...]:
        for var, pixels in (("height", height), ("width", width)):
            if pixels % self.scale_factor:
                raise UnsupportedError(
                    f"export.shapes.{var}: {pixels} is not a multiple of the VAE's factor {self.scale_factor}"
                )
        channels = _pixel_channels(model_config(module))
        time = () if frames is None else (frames,)
        return (batch, channels, *time, height, width)

    def export_spec(self, module: torch.nn.Module, shapes: Shapes, dtype: torch.dtype) -> ExportSpec:
        dt = dtype_name(dtype)
        cfg = model_config(module)
        channels, moments = _pixel_channels(cfg), 2 * _latent_channels(cfg)
        frames = self._frames(shapes)
        if frames is None or self.temporal is None:
            dims_in: tuple[int | str, ...] = (1, channels, "height", "width")
            dims_out: tuple[int | str, ...] = (1, moments, "latent_height", "latent_width")
        else:
            latent_frames = (frames - 1) // self.temporal + 1
            dims_in = (1, channels, frames, "height", "width")
            dims_out = (1, moments, latent_frames, "latent_height", "latent_width")
        opt = {"sample": self._shape(module, 1, shapes.height.opt, shapes.width.opt, frames)}
        return ExportSpec(
            inputs=[TensorSpec("sample", dt, dims_in)],
            outputs=[TensorSpec("moments", dt, dims_out)],
            example_inputs={"sample": ExampleSampler(opt, module, dtype).randn("sample").clamp(-1, 1)},
        )

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _vae_encoder_wrapper_class()(module)

    def shape_profile(self, module: torch.nn.Module, shapes: Shapes) -> ShapeProfile:
        frames = self._frames(shapes)
        return ShapeProfile.over_ranges(
            lambda pick: {"sample": self._shape(module, 1, pick(shapes.height), pick(shapes.width), frames)}
        )

    @contextlib.contextmanager
    def exporting(self, module: torch.nn.Module) -> Iterator[None]:
        """Tiling and slicing off for the export (one pass over the whole image), restored after."""
        saved = {k: getattr(module, k) for k in ("use_tiling", "use_slicing") if hasattr(module, k)}
        for k in saved:
            setattr(module, k, False)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(module, k, v)


def _vae_encoder_wrapper_class() -> type:
    import torch

    class VaeEncoderForExport(torch.nn.Module):
        """sample -> ``vae.encode(sample).latent_dist.parameters`` (mean and log-variance, stacked)."""

        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae: Any = vae

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(sample, return_dict=True).latent_dist.parameters

    return VaeEncoderForExport


@dataclass(frozen=True)
class ImageEncoderGraph:
    """A transformers CLIP vision tower (Wan2.1 I2V's ``image_encoder``): ``pixel_values`` (images x 3 x S x S,
    S the processor's crop size, the config's ``image_size``) in, ``penultimate_hidden_state``
    (``hidden_states[-2]``, what WanImageToVideoPipeline.encode_image reads) out. The batch is the number of
    conditioning images: 1, or 2 with a last frame."""

    name: str = "image_encoder"
    attr: str = "image_encoder"
    role: str = "image_encoder"
    max_images: int = 2

    def module(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.attr)

    @staticmethod
    def _size(module: torch.nn.Module) -> int:
        return int(model_config(module).image_size)

    def export_spec(self, module: torch.nn.Module, shapes: Shapes, dtype: torch.dtype) -> ExportSpec:
        cfg, dt = model_config(module), dtype_name(dtype)
        size, hidden = self._size(module), int(cfg.hidden_size)
        tokens = (size // int(cfg.patch_size)) ** 2 + 1  # patches + the class token
        opt: dict[str, tuple[int, ...]] = {"pixel_values": (1, int(getattr(cfg, "num_channels", 3)), size, size)}
        return ExportSpec(
            inputs=[TensorSpec("pixel_values", dt, ("images", opt["pixel_values"][1], size, size))],
            outputs=[TensorSpec("penultimate_hidden_state", dt, ("images", tokens, hidden))],
            example_inputs={"pixel_values": ExampleSampler(opt, module, dtype).randn("pixel_values")},
        )

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _image_encoder_wrapper_class()(module)

    def shape_profile(self, module: torch.nn.Module, shapes: Shapes) -> ShapeProfile:
        size, channels = self._size(module), int(getattr(model_config(module), "num_channels", 3))
        return ShapeProfile(
            min={"pixel_values": (1, channels, size, size)},
            opt={"pixel_values": (1, channels, size, size)},
            max={"pixel_values": (self.max_images, channels, size, size)},
        )

    def exporting(self, module: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        return TextEncoderGraph("image_encoder", ("last_hidden_state",)).exporting(module)


def _image_encoder_wrapper_class() -> type:
    import torch

    class ImageEncoderForExport(torch.nn.Module):
        """pixel_values -> the vision tower's penultimate hidden states."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]

    return ImageEncoderForExport
