"""The recipe schema: typed, frozen sections that forbid unknown keys. Defaults live only here.

``dtcompile.recipe.loader.load_recipe`` reads YAML into a ``Recipe``; docs/recipes.md lists every field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dtcompile.core.files import PICKLE_SUFFIXES
from dtcompile.core.targets import KNOWN_ARCHS, TRT_ARCHS
from dtcompile.recipe.base import ItemError as _ItemError
from dtcompile.recipe.base import Strict as _Strict
from dtcompile.recipe.cache import CacheSpec
from dtcompile.recipe.quant import FORMAT_NAMES, AccuracySpec, CalibSpec, QuantSpec


class RangeSpec(_Strict):
    """min/opt/max of one shape variable; a bare integer means a static size."""

    min: int = Field(gt=0)
    """Smallest value the engines accept."""
    opt: int = Field(gt=0)
    """The value TensorRT tunes for (and the export's example size)."""
    max: int = Field(gt=0)
    """Largest value the engines accept."""

    @model_validator(mode="before")
    @classmethod
    def _from_int(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"min": value, "opt": value, "max": value}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> RangeSpec:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class ShapesSpec(_Strict):
    """Shape ranges the engines accept: batch, image height/width in pixels, text tokens."""

    batch: RangeSpec = RangeSpec(min=1, opt=1, max=1)
    """Images per pipeline call."""
    height: RangeSpec = RangeSpec(min=1024, opt=1024, max=1024)
    """Image height in pixels."""
    width: RangeSpec = RangeSpec(min=1024, opt=1024, max=1024)
    """Image width in pixels."""
    text_len: RangeSpec = RangeSpec(min=512, opt=512, max=512)
    """Text tokens of the prompt encoder the denoiser reads."""
    frames: RangeSpec | None = None
    """Video frames in pixels (video families only, e.g. Wan's 4k+1); null: an image model."""

    @model_validator(mode="after")
    def _bounded(self) -> ShapesSpec:
        for name, limit in SHAPE_LIMITS.items():
            r = getattr(self, name)
            if r is not None and r.max > limit:
                raise _ItemError("max", f"{r.max} is above {limit}, the largest {name} dtc builds engines for", name)
        return self


#: Largest value of each shape variable: beyond these an engine would not fit any GPU, and the export of such a
#: profile runs for minutes before failing.
SHAPE_LIMITS = {"batch": 64, "height": 16384, "width": 16384, "text_len": 4096, "frames": 1025}


class ModelSpec(_Strict):
    """Where the diffusers pipeline comes from: a hub id, a local folder, or ``builtin:NAME``."""

    source: str = Field(min_length=1)
    """A hub id (owner/name), a local diffusers pipeline folder, or builtin:NAME (see `dtc models`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id."""
    pipeline: str | None = Field(default=None, pattern=r"^[A-Z][A-Za-z0-9]*Pipeline$")
    """The diffusers pipeline class to load the source as, where it is not model_index.json's own (Wan2.2-TI2V-5B
    ships as WanPipeline; WanImageToVideoPipeline builds one artifact for image- and text-to-video)."""


#: The ONNX ``Attention`` op (``attention: native``) exists from this opset on.
ATTENTION_MIN_OPSET = 23


class ExportSpecModel(_Strict):
    """ONNX export settings.

    ``attention``: how attention reaches the graph. ``native``: the ONNX ``Attention`` op (needs opset 23),
    which TensorRT maps to its fused attention layer; ``plugin``: a ``dtc::FusedAttention`` node served by the
    plugin in dtcompile/plugins/fused_attention; ``decomposed``: MatMul-Softmax-MatMul; ``auto``: native where
    every backend, arch and dtype of the recipe supports it, else decomposed (the choice is logged and recorded).
    """

    opset: int = Field(default=19, ge=17, le=23)
    """ONNX opset of the exported graphs."""
    shapes: ShapesSpec = ShapesSpec()
    """Shape ranges of the engines."""
    attention: Literal["auto", "native", "plugin", "decomposed"] = "auto"
    """How attention reaches the graph (docs/attention.md)."""

    @model_validator(mode="after")
    def _native_needs_opset(self) -> ExportSpecModel:
        if self.attention == "native" and self.opset < ATTENTION_MIN_OPSET:
            raise ValueError(
                f"attention 'native' exports the ONNX Attention op, which needs opset >= {ATTENTION_MIN_OPSET} "
                f"(export.opset is {self.opset}); set export.opset: {ATTENTION_MIN_OPSET} or "
                f"export.attention: decomposed"
            )
        return self


#: A backend's name in a recipe (``core.targets.BACKENDS``, in its order: a test checks it).
BackendName = Literal["onnxruntime", "tensorrt-rtx", "tensorrt"]


def _reference_backend_only() -> list[BackendName]:
    return ["onnxruntime"]


class EngineSpec(_Strict):
    """Which backends to build and, for TensorRT flavours, which GPU arches."""

    backends: list[BackendName] = Field(default_factory=_reference_backend_only, min_length=1)
    """Backends to build: onnxruntime (the reference graph), tensorrt-rtx, tensorrt."""
    targets: list[str] = Field(default_factory=list)
    """GPU arches (sm_XY) to build TensorRT engines for."""
    opt_level: int = Field(default=3, ge=0, le=5)
    """TensorRT builder optimization level."""
    refittable: bool = False
    """Build engines whose weights `dtc refit` can replace (needs a GPU at build)."""
    weight_streaming: bool = False
    """Build TensorRT engines whose weights can stream from host memory under a device budget (docs/memory.md)."""

    @field_validator("targets")
    @classmethod
    def _known_archs(cls, value: list[str]) -> list[str]:
        for i, arch in enumerate(value):
            if arch not in KNOWN_ARCHS:
                raise _ItemError(i, f"'{arch}' is not a known arch; choose one of: {', '.join(KNOWN_ARCHS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate arch in {value}")
        return value

    @model_validator(mode="after")
    def _targets_fit_backends(self) -> EngineSpec:
        trt = [b for b in self.backends if b in TRT_ARCHS]
        if trt and not self.targets:
            raise ValueError(f"backends {trt} need at least one arch in engine.targets")
        if self.targets and not trt:
            raise ValueError("targets are set but no TensorRT backend is listed in engine.backends")
        for i, arch in enumerate(self.targets):
            if not any(arch in TRT_ARCHS[b] for b in trt):
                choices = sorted({a for b in trt for a in TRT_ARCHS[b]}, key=KNOWN_ARCHS.index)
                raise _ItemError(
                    i,
                    f"'{arch}' is not an arch {' or '.join(trt)} builds for; choose one of: {', '.join(choices)}",
                    field="targets",
                )
        return self


class OutputSpec(_Strict):
    """Where artifacts go: ``<dir>/<recipe name>/``."""

    dir: str = "engines"
    """Folder that receives ``<name>/``."""
    include_pipeline: bool = True
    """Save the rest of the diffusers pipeline into the artifact (needed by `dtc run`)."""


#: File suffixes of pickled checkpoints: dtc never unpickles (loading one can run arbitrary code).


#: The largest LoRA scale magnitude a recipe, ``dtc refit --lora FILE:SCALE`` and ``dtc build`` take (docs/lora.md).
LORA_SCALE_MAX = 100.0


class LoraSpec(_Strict):
    """One LoRA adapter fused into the engine component before export (``dtc refit`` swaps them later).

    ``source``: a local ``.safetensors`` file, a local folder (with ``weight_name``), or a hub id
    ``owner/name`` (``weight_name`` defaults to diffusers' ``pytorch_lora_weights.safetensors``).
    """

    source: str = Field(min_length=1)
    """A .safetensors file, a local folder (with weight_name) or a hub id owner/name."""
    scale: float = Field(default=1.0, allow_inf_nan=False, ge=-LORA_SCALE_MAX, le=LORA_SCALE_MAX)
    """The adapter's strength, from -100 to 100 (typical: 0.5 to 1.5; negative subtracts the adapter)."""
    weight_name: str | None = None
    """File inside a folder or hub repo (default pytorch_lora_weights.safetensors)."""
    component: str | None = Field(default=None, min_length=1)
    """The denoiser it goes into (default the pipeline's main one; Wan2.2's low-noise expert: transformer_2)."""

    @field_validator("source", "weight_name")
    @classmethod
    def _not_pickle(cls, value: str | None) -> str | None:
        if value is not None and value.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(
                "is a pickled checkpoint; dtc loads LoRAs from .safetensors files only (never unpickles): "
                "convert it with safetensors.torch.save_file"
            )
        return value


class ComponentSpec(_Strict):
    """A pipeline component built as an engine; a bare name means the recipe's dtype, unquantized.

    Names: the family's denoiser (``transformer``) and, where the family has them, ``text_encoder``,
    ``text_encoder_2``, ``text_encoder_3`` and ``vae_decoder`` (`dtc models` lists each family's).
    ``quant`` quantizes a text encoder on its own (fp8 for T5 encoders: FLUX's ``text_encoder_2``, SD3's
    ``text_encoder_3``), calibrated on ``quant.calib``'s prompts (the schema's defaults without a ``quant:``
    section); the denoiser's format is ``quant.format``. docs/components.md lists what each component takes.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    """The component (a pipeline attribute, or vae_decoder for the VAE's decode)."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Precision of this component's graph; null: the recipe's dtype."""
    quant: Literal["fp8", "int8", "nvfp4", "svdquant"] | None = None
    """Quantize this text encoder (fp8: T5 encoders); null: unquantized. The denoiser's is quant.format."""
    tile: int | None = Field(default=None, gt=0)
    """vae_decoder only: build the decoder for tiles of this many pixels (their 25% overlap included) and decode
    larger images through it tile by tile, blended as diffusers' tiled decode does (docs/memory.md); null: whole."""
    weight_streaming: bool | None = None
    """Build this component's TensorRT engines streamable (docs/memory.md); null: engine.weight_streaming."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tile_on_vae(self) -> ComponentSpec:
        if self.tile is not None and self.name != "vae_decoder":
            raise _ItemError("tile", f"only vae_decoder decodes in tiles, not {self.name}")
        return self

    @field_validator("quant", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        if value is not None and value not in FORMAT_NAMES:
            raise ValueError(f"not a quant format; choose one of: {', '.join(FORMAT_NAMES)} (or null)")
        return value


class Recipe(_Strict):
    """A build recipe: model, dtype, export, engine, output and (optional) lora sections."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    """The artifact's name (its folder under output.dir)."""
    model: ModelSpec
    """Where the diffusers pipeline comes from."""
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """Precision of the exported graphs (quantized formats compute in it)."""
    export: ExportSpecModel = ExportSpecModel()
    """ONNX export settings."""
    engine: EngineSpec = EngineSpec()
    """Backends and GPU arches to build."""
    output: OutputSpec = OutputSpec()
    """Where the artifact goes."""
    components: list[ComponentSpec] = Field(default_factory=list)
    """Components built as engines: the denoiser and any of the family's text encoders and VAE decoder
    (quant.format, LoRA and cache apply to the denoiser; a T5 encoder takes its own quant); empty: the
    denoiser only."""
    lora: list[LoraSpec] = Field(default_factory=list)
    """LoRA adapters fused before quantization and export."""
    quant: QuantSpec | None = None  # PTQ: dtcompile/recipe/quant.py, docs/quantization.md
    """Post-training quantization (docs/quantization.md); null: none."""
    cache: CacheSpec | None = None  # block caching: dtcompile/recipe/cache.py, docs/cache.md
    """Block-cache engines (docs/cache.md); null: one monolithic engine."""

    @field_validator("components")
    @classmethod
    def _unique_components(cls, value: list[ComponentSpec]) -> list[ComponentSpec]:
        names = [c.name for c in value]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _ItemError(i, f"'{name}' is listed twice")
        return value

    def quantized_components(self) -> list[ComponentSpec]:
        """The ``components`` items with their own ``quant`` (text encoders; never the denoiser)."""
        return [c for c in self.components if c.quant is not None]

    def calibration(self) -> tuple[CalibSpec, AccuracySpec]:
        """The calibration prompts and held-out report size every quantized component uses: the ``quant:``
        section's, or the schema's defaults when only ``components[].quant`` quantizes."""
        if self.quant is not None:
            return self.quant.calib, self.quant.accuracy
        return CalibSpec(), AccuracySpec()

    def engine_fields(self) -> dict[str, Any]:
        """The fields that change an engine (everything but name and output), as plain JSON."""
        data = self.model_dump(mode="json")
        data.pop("name")
        data.pop("output")
        if not data["components"]:  # the default (denoiser only) keeps the keys of earlier artifacts
            data.pop("components")
        for comp in data.get("components", []):  # unquantized components keep the keys of earlier artifacts
            for key in ("quant", "tile", "weight_streaming"):  # (and untiled, unstreamed ones)
                if comp[key] is None:
                    comp.pop(key)
        if not data["engine"]["weight_streaming"]:
            data["engine"].pop("weight_streaming")
        if data["export"]["shapes"]["frames"] is None:  # image models: as before the frames axis
            data["export"]["shapes"].pop("frames")
        return data
