"""Typed, validated YAML recipes.

``load_recipe(path, overrides)`` returns a frozen ``Recipe``; every error names the file, the line and the
dotted field path (``recipes/x.yaml:7 engine.targets[1]: ...``). Defaults live only in this schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtcompile.backends.tensorrt import SUPPORTED_ARCHS as BACKEND_ARCHS
from dtcompile.cache.spec import CacheSpec
from dtcompile.errors import RecipeError
from dtcompile.quant.spec import FORMAT_NAMES, QuantSpec

KNOWN_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "sm_121")
BACKENDS = ("onnxruntime", "tensorrt-rtx", "tensorrt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RangeSpec(_Strict):
    """min/opt/max of one shape variable; a bare integer means a static size."""

    min: int = Field(gt=0)
    opt: int = Field(gt=0)
    max: int = Field(gt=0)

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
    height: RangeSpec = RangeSpec(min=1024, opt=1024, max=1024)
    width: RangeSpec = RangeSpec(min=1024, opt=1024, max=1024)
    text_len: RangeSpec = RangeSpec(min=512, opt=512, max=512)


class ModelSpec(_Strict):
    """Where the diffusers pipeline comes from: a hub id, a local folder, or ``builtin:NAME``."""

    source: str = Field(min_length=1)
    revision: str | None = None


#: ``export.attention`` choices; "auto" resolves per recipe (dtcompile/attention.py, docs/attention.md).
ATTENTION_MODES = ("auto", "native", "plugin", "decomposed")
#: The ONNX ``Attention`` op (``attention: native``) exists from this opset on.
ATTENTION_MIN_OPSET = 23


class ExportSpecModel(_Strict):
    """ONNX export settings.

    ``attention``: how attention reaches the graph. ``native``: the ONNX ``Attention`` op (needs opset 23),
    which TensorRT maps to its fused attention layer; ``plugin``: a ``dtc::FusedAttention`` node served by the
    plugin in plugins/fused_attention; ``decomposed``: MatMul-Softmax-MatMul; ``auto``: native where every
    backend, arch and dtype of the recipe supports it, else decomposed (the choice is logged and recorded).
    """

    opset: int = Field(default=19, ge=17, le=23)
    shapes: ShapesSpec = ShapesSpec()
    attention: Literal["auto", "native", "plugin", "decomposed"] = "auto"

    @model_validator(mode="after")
    def _native_needs_opset(self) -> ExportSpecModel:
        if self.attention == "native" and self.opset < ATTENTION_MIN_OPSET:
            raise ValueError(
                f"attention 'native' exports the ONNX Attention op, which needs opset >= {ATTENTION_MIN_OPSET} "
                f"(export.opset is {self.opset}); set export.opset: {ATTENTION_MIN_OPSET} or "
                f"export.attention: decomposed"
            )
        return self


class EngineSpec(_Strict):
    """Which backends to build and, for TensorRT flavours, which GPU arches."""

    backends: list[Literal["onnxruntime", "tensorrt-rtx", "tensorrt"]] = Field(
        default_factory=lambda: ["onnxruntime"], min_length=1
    )
    targets: list[str] = Field(default_factory=list)
    opt_level: int = Field(default=3, ge=0, le=5)
    refittable: bool = False

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
        trt = [b for b in self.backends if b in BACKEND_ARCHS]
        if trt and not self.targets:
            raise ValueError(f"backends {trt} need at least one arch in engine.targets")
        if self.targets and not trt:
            raise ValueError("targets are set but no TensorRT backend is listed in engine.backends")
        for i, arch in enumerate(self.targets):
            if not any(arch in BACKEND_ARCHS[b] for b in trt):
                choices = sorted({a for b in trt for a in BACKEND_ARCHS[b]}, key=KNOWN_ARCHS.index)
                raise _ItemError(
                    i,
                    f"'{arch}' is not an arch {' or '.join(trt)} builds for; choose one of: {', '.join(choices)}",
                    field="targets",
                )
        return self


class OutputSpec(_Strict):
    """Where artifacts go: ``<dir>/<recipe name>/``."""

    dir: str = "engines"
    include_pipeline: bool = True


#: File suffixes of pickled checkpoints: dtc never unpickles (loading one can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class LoraSpec(_Strict):
    """One LoRA adapter fused into the engine component before export (``dtc refit`` swaps them later).

    ``source``: a local ``.safetensors`` file, a local folder (with ``weight_name``), or a hub id
    ``owner/name`` (``weight_name`` defaults to diffusers' ``pytorch_lora_weights.safetensors``).
    """

    source: str = Field(min_length=1)
    scale: float = Field(default=1.0, allow_inf_nan=False)
    weight_name: str | None = None

    @field_validator("source", "weight_name")
    @classmethod
    def _not_pickle(cls, value: str | None) -> str | None:
        if value is not None and value.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(
                "is a pickled checkpoint; dtc loads LoRAs from .safetensors files only (never unpickles): "
                "convert it with safetensors.torch.save_file"
            )
        return value


class Recipe(_Strict):
    """A build recipe: model, dtype, export, engine, output and (optional) lora sections."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    export: ExportSpecModel = ExportSpecModel()
    engine: EngineSpec = EngineSpec()
    output: OutputSpec = OutputSpec()
    lora: list[LoraSpec] = Field(default_factory=list)
    quant: QuantSpec | None = None  # PTQ: dtcompile/quant/spec.py, docs/quantization.md
    cache: CacheSpec | None = None  # block caching: dtcompile/cache/spec.py, docs/cache.md

    def engine_fields(self) -> dict[str, Any]:
        """The fields that change an engine (everything but name and output), as plain JSON."""
        data = self.model_dump(mode="json")
        data.pop("name")
        data.pop("output")
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class _ItemError(ValueError):
    """A validator error pointing into a list item (so the message gets ``[i]``)."""

    def __init__(self, index: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.field = field


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of the deepest ancestor found."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds validator/union tags (e.g. 'function-after[...]', the union member 'fp8'); drop them.
    out: list[Any] = []
    for p in loc:
        if isinstance(p, str) and ("[" in p or "(" in p or (out[-1:] == ["quant"] and p in FORMAT_NAMES)):
            continue
        out.append(p)
    return tuple(out)


def _message(err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    loc = _clean_loc(tuple(err["loc"]))
    ctx = err.get("ctx") or {}
    exc = ctx.get("error")
    if isinstance(exc, _ItemError):
        loc = (*loc, exc.field, exc.index) if exc.field else (*loc, exc.index)
        return loc, str(exc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return loc, "unknown key; check the spelling against the recipe schema (docs/recipes.md)"
    if kind == "missing":
        return loc, "required field is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    inp = err.get("input")
    if kind not in ("missing",) and not isinstance(inp, (dict, list)):
        msg = f"{inp!r}: {msg}"
    return loc, msg


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur: Any = data
    for part in parts[:-1]:
        if not isinstance(cur, dict):
            raise RecipeError(f"--set {dotted}: '{part}' is not a section")
        cur = cur.setdefault(part, {})
    if not isinstance(cur, dict):
        raise RecipeError(f"--set {dotted}: parent is not a section")
    cur[parts[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """Parse ``a.b=c`` overrides; values are YAML (``--set engine.targets=[sm_89]``)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set '{item}': expected KEY=VALUE, e.g. export.opset=19")
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections (model, export, ...)")
    overridden = set()
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
        overridden.add(key)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc, msg = _message(err)
        dotted = _dotted(loc)
        if any(dotted == k or dotted.startswith(k + ".") or dotted.startswith(k + "[") for k in overridden):
            raise RecipeError(f"--set {dotted}: {msg}") from None
        line = _line_of(node, loc)
        where = f"{path}:{line}" if line else str(path)
        raise RecipeError(f"{where} {dotted}: {msg}" if dotted else f"{where}: {msg}") from None
