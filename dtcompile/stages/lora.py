"""Stage `lora`: a LoadedPipeline and the recipe's LoRA specs in, the same pipeline with the adapters fused out.

Runs between `load` and `export` (before calibration: fusing first keeps TensorRT's Q/DQ fusions intact, and
the quantizer calibrates the weights that will actually run). Each adapter is read with diffusers' own LoRA
loaders (``load_lora_weights``: diffusers/PEFT files, kohya/BFL files and the other formats diffusers
converts), fused with ``fuse_lora`` at its scale and unloaded, so the exported module is plain again.

The same reader (``read_lora``: diffusers' ``lora_state_dict`` and its converters, then PEFT's rank/alpha
rules) gives ``dtc refit`` the per-module factors, so a refit computes exactly what this stage fused; after
fusing, the stage checks that the fused weights equal ``W + sum(scale * alpha/r * B @ A)`` by that reader.

Only ``.safetensors`` files are read (never a pickle). Output: ``FusedLoras`` (one record per adapter for the
manifest: source, sha256, scale, format, modules, ranks; and the base weights of every touched parameter,
kept so a refit can start from the un-fused weights).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.digests import sha256_file, sha256_json
from dtcompile.core.errors import MissingDependencyError, RecipeError, UnsupportedError, VerificationError
from dtcompile.recipe import PICKLE_SUFFIXES, LoraSpec

if TYPE_CHECKING:
    import torch

    from dtcompile.stages.load import LoadedPipeline

log = logging.getLogger("dtcompile.lora")

#: diffusers' default file name for a saved LoRA (``save_lora_weights``).
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Largest safetensors header accepted (the format's own limit is 100 MB).
_MAX_HEADER = 100 * 1024 * 1024
#: Relative tolerance of the post-fuse check (fused delta vs this module's math), per build dtype.
FUSE_CHECK_TOL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class ResolvedLora:
    """One adapter's file on disk: ``label`` names it in errors (``lora[0]`` or ``--lora``)."""

    label: str
    source: str
    weight_name: str | None
    path: Path
    sha256: str
    scale: float
    component: str | None = None  # the denoiser it goes into; None: the pipeline's main one

    def record(self) -> dict[str, Any]:
        """Manifest fields identifying the adapter (what the artifact key hashes: sha256, scale, component)."""
        out = {"source": self.source, "weight_name": self.weight_name, "sha256": self.sha256, "scale": self.scale}
        return {**out, "component": self.component} if self.component is not None else out

    def target(self, main: str) -> str:
        """The denoiser this adapter goes into, ``main`` unless the recipe or ``--lora ...@NAME`` said."""
        return self.component or main


@dataclass
class LoraFactor:
    """One module's low-rank update: ``delta W = scaling * B @ A`` (``bias``: PEFT lora_bias, times scaling)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    alpha: float
    rank: int
    use_rslora: bool = False
    bias: torch.Tensor | None = None

    def scaling(self, scale: float) -> float:
        """PEFT's ``set_scale``: ``scale * alpha / r`` (``/ sqrt(r)`` for rsLoRA), same operation order."""
        if self.use_rslora:
            return scale * self.alpha / math.sqrt(self.rank)
        return scale * self.alpha / self.rank

    def delta(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """``B @ A * scaling`` as PEFT's ``get_delta_weight`` on the CPU: factors cast to the weight's dtype,
        multiplied in float32, the result cast back to ``dtype``."""
        import torch

        a = self.A.to(dtype).float()
        b = self.B.to(dtype).float()
        out = (b @ a) * self.scaling(scale)
        return out.to(dtype) if dtype != torch.float32 else out


@dataclass
class LoraWeights:
    """A parsed adapter: per target module (name inside the component) its factors."""

    label: str
    format: str
    modules: dict[str, LoraFactor]
    file: str = ""  # the adapter's file name, for messages

    def params(self) -> dict[str, str]:
        """Component parameter name -> what writes it ("weight" or "bias")."""
        out = {f"{m}.weight": "weight" for m in self.modules}
        out.update({f"{m}.bias": "bias" for m, f in self.modules.items() if f.bias is not None})
        return out

    def summary(self) -> dict[str, Any]:
        ranks = sorted({f.rank for f in self.modules.values()})
        return {"format": self.format, "modules": len(self.modules), "ranks": ranks}


@dataclass(frozen=True)
class FusedLoras:
    """What the `lora` stage did: manifest records and, per denoiser, the base (pre-fuse) value of every
    touched parameter."""

    adapters: list[dict[str, Any]]
    bases: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # denoiser -> parameter -> value
    main: str = "transformer"

    @property
    def base(self) -> dict[str, torch.Tensor]:
        """The main denoiser's pre-fuse values (parameter name -> tensor)."""
        return self.bases.get(self.main, {})


# --- resolving sources ----------------------------------------------------------------------------------------


def _looks_like_hub_id(source: str, local: Path) -> bool:
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and not source.endswith(".safetensors")
        and not local.exists()
    )


def check_safetensors(path: Path, label: str) -> dict[str, Any]:
    """Read and return the safetensors header of ``path`` without loading tensors; never unpickles.

    Raises:
        RecipeError: the file is not a safetensors file (a pickle, a zip, truncated, ...).
    """
    hint = "dtc reads LoRAs from .safetensors files only and never unpickles; convert it with safetensors"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        looks = {b"\x80": "it looks like a pickle", b"PK": "it looks like a torch.save zip"}
        kind = looks.get(head[:1], looks.get(head[:2], str(exc)))
        raise RecipeError(f"{label}: '{path}' is not a safetensors file ({kind}); {hint}") from None
    if not isinstance(header, dict):
        raise RecipeError(f"{label}: '{path}' is not a safetensors file (header is not a mapping); {hint}")
    check_safetensors_layout(path, f"{label}: '{path}'")
    return header


def check_safetensors_layout(path: Path, what: str) -> None:
    """RecipeError unless safetensors itself accepts ``path``'s header (every tensor's dtype, shape and offsets
    consistent with the file; nothing is read but the header): a header that lies fails here in one line, not
    as a SafetensorError deep inside a loader."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(" at line ")[0][:200]
        raise RecipeError(
            f"{what}: the safetensors header does not match the file ({first}); use another file"
        ) from None


def resolve_lora(
    source: str,
    weight_name: str | None,
    scale: float,
    label: str,
    *,
    download: bool = True,
    base_dir: Path | None = None,
    component: str | None = None,
) -> ResolvedLora:
    """Find an adapter's file (local file, folder + weight_name, or hub id), check it is safetensors, hash it.

    A relative local path resolves against ``base_dir`` (the recipe's folder, as calibration prompts do; None:
    the current directory). ``download=False`` (the dry run) leaves hub ids unresolved: the returned path is
    empty and sha256 "".

    Raises:
        RecipeError: missing file or folder, a pickled/non-safetensors file, or an unreachable hub id.
    """
    if source.lower().endswith(PICKLE_SUFFIXES) or (weight_name or "").lower().endswith(PICKLE_SUFFIXES):
        raise RecipeError(
            f"{label}: '{weight_name or source}' is a pickled checkpoint; dtc loads LoRAs from .safetensors "
            "files only (never unpickles): convert it with safetensors.torch.save_file"
        )
    path = Path(source).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if _looks_like_hub_id(source, path):
        if not download:
            return ResolvedLora(label, source, weight_name, Path(), "", scale, component)
        path = _hub_file(source, weight_name or DEFAULT_WEIGHT_NAME, label)
    elif path.is_dir():
        if weight_name is None:
            found = sorted(p.name for p in path.glob("*.safetensors"))
            if DEFAULT_WEIGHT_NAME in found or not found:
                weight_name = DEFAULT_WEIGHT_NAME
            elif len(found) == 1:
                weight_name = found[0]
            else:
                raise RecipeError(
                    f"{label}: folder '{source}' holds several .safetensors files ({', '.join(found)}); "
                    "name one with weight_name"
                )
        path = path / weight_name
        if not path.is_file():
            raise RecipeError(f"{label}: '{path}' does not exist (folder '{source}', weight_name '{weight_name}')")
    elif not path.exists():
        where = f" (looked for {path})" if str(path) != source else ""
        raise RecipeError(f"{label}: LoRA file '{source}' does not exist{where}")
    elif not source.endswith(".safetensors"):
        raise RecipeError(
            f"{label}: '{source}' is not a .safetensors file; dtc reads LoRAs from .safetensors files only "
            "(never unpickles): convert it with safetensors"
        )
    check_safetensors(path, label)
    return ResolvedLora(label, source, weight_name, path.resolve(), sha256_file(path), scale, component)


def _hub_file(repo: str, filename: str, label: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingDependencyError("huggingface_hub", "torch") from None
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:  # offline, 401, 404, DNS: the hub raises many types
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise RecipeError(
            f"{label}: cannot fetch '{filename}' of '{repo}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{reason}); download it where the hub is reachable and set source to the local .safetensors file"
        ) from None


def resolve_loras(specs: list[LoraSpec], *, download: bool = True, base_dir: Path | None = None) -> list[ResolvedLora]:
    """``resolve_lora`` for every recipe entry (labels ``lora[i].source``), relative paths against ``base_dir``."""
    return [
        resolve_lora(s.source, s.weight_name, s.scale, f"lora[{i}].source", download=download, base_dir=base_dir,
                     component=s.component)
        for i, s in enumerate(specs)
    ]  # fmt: skip


def fetch_loras(loras: Sequence[ResolvedLora]) -> tuple[ResolvedLora, ...]:
    """The plan's adapters (``resolve_loras(..., download=False)``) with each hub id fetched and hashed; local
    files were hashed by the plan and are kept as they are."""
    return tuple(
        r if r.sha256 else resolve_lora(r.source, r.weight_name, r.scale, r.label, component=r.component) for r in loras
    )


def lora_key_digest(component_sha256: str, loras: Sequence[ResolvedLora]) -> str:
    """The weights digest that goes into the artifact key: the component's files plus each adapter's sha256
    and scale (in order: fusing is a sum, but the manifest lists them as given)."""
    lora = [[r.sha256, r.scale, *([r.component] if r.component is not None else [])] for r in loras]
    payload = {"component": component_sha256, "lora": lora}
    return sha256_json(payload)


# --- reading adapters -----------------------------------------------------------------------------------------

_UNSUPPORTED_KEYS = {
    "dora_scale": "DoRA (weight-decomposed) adapters",
    "lora_magnitude_vector": "DoRA (weight-decomposed) adapters",
    "lokr_": "LoKr adapters",
    ".hada_": "LoHa adapters",
}


def _detect_format(keys: list[str]) -> str:
    if any(".lora_down.weight" in k for k in keys):
        return "kohya"
    if any("processor" in k for k in keys):
        return "xlabs"
    if any(k.startswith("base_model") for k in keys):
        return "peft"
    return "diffusers"


def read_lora(resolved: ResolvedLora, pipeline_class: str, component: str = "transformer") -> LoraWeights:
    """Parse an adapter into per-module factors with diffusers' readers and PEFT's rank/alpha rules.

    Raises:
        RecipeError: unreadable file, or rank metadata that contradicts the tensors.
        UnsupportedError: DoRA/LoKr/LoHa, full-weight (Control) keys, or weights for another component.
    """

    try:
        import diffusers
        from diffusers.utils.peft_utils import _create_lora_config
        from peft.utils.other import get_pattern_key
    except ImportError:
        raise MissingDependencyError("peft", "torch", why="needed to read LoRA adapters") from None

    label = resolved.label
    fmt = _raw_format(resolved)
    pipe_cls = getattr(diffusers, pipeline_class, None)
    if pipe_cls is None or not hasattr(pipe_cls, "lora_state_dict"):
        raise UnsupportedError(f"{label}: {pipeline_class} has no diffusers LoRA loader")
    import inspect

    # FLUX's loader returns alphas (kohya/BFL files carry them); SD3's has no such option
    with_alphas = "return_alphas" in inspect.signature(pipe_cls.lora_state_dict).parameters
    options = {"return_alphas": True} if with_alphas else {}
    try:
        out = pipe_cls.lora_state_dict(str(resolved.path), return_lora_metadata=True, use_safetensors=True, **options)
        # SD/SDXL's loaders always return (state dict, network alphas, metadata); SD3's (state dict, metadata)
        state_dict, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    except Exception as exc:  # diffusers' converters raise ValueError, KeyError, AssertionError...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RecipeError(f"{label}: diffusers cannot read '{resolved.path.name}' as a LoRA ({first})") from None

    sd, meta, alphas = _component_state(resolved, component, state_dict, alphas, metadata)
    factors = _group_factors(label, sd, f"{component}.")
    rank_dict = {f"^{m}.lora_B.weight": t["B.weight"].shape[1] for m, t in factors.items() if "B.weight" in t}
    try:
        config = _create_lora_config(sd, alphas or None, meta or None, rank_dict)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{label}: invalid LoRA metadata in '{resolved.path.name}' ({exc})") from None
    if config.use_dora:
        raise UnsupportedError(f"{label}: DoRA adapters are not supported; dtc fuses and refits plain LoRA only")

    modules: dict[str, LoraFactor] = {}
    for module, parts in sorted(factors.items()):
        a, b = _factor_pair(resolved, module, parts)
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        if not math.isfinite(float(alpha)):
            raise RecipeError(
                f"{label}: module '{module}' has LoRA alpha {alpha} in '{resolved.path.name}'; alpha must be a "
                "finite number (a corrupt adapter); use another file"
            )
        if int(r) != a.shape[0]:
            raise RecipeError(
                f"{label}: rank mismatch in '{module}': the adapter metadata says r={r} but its tensors have "
                f"rank {a.shape[0]}"
            )
        modules[module] = LoraFactor(
            A=a, B=b, alpha=float(alpha), rank=int(r), use_rslora=bool(config.use_rslora), bias=parts.get("B.bias")
        )
    return LoraWeights(label, fmt, modules, resolved.path.name)


def _raw_format(resolved: ResolvedLora) -> str:
    """The adapter file's key format, read from its raw keys (UnsupportedError for LoKr/LoHa/... files)."""
    from safetensors import safe_open

    with safe_open(str(resolved.path), framework="pt") as f:
        raw_keys = list(f.keys())
    for marker, what in _UNSUPPORTED_KEYS.items():
        if any(marker in k for k in raw_keys):
            raise UnsupportedError(
                f"{resolved.label}: '{resolved.path.name}' is one of the {what}; dtc fuses and refits plain LoRA only"
            )
    return _detect_format(raw_keys)


def _component_state(
    resolved: ResolvedLora,
    component: str,
    state_dict: dict[str, torch.Tensor],
    alphas: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """diffusers' state dict, alphas and metadata with the ``component.`` prefix stripped (state dict, metadata,
    alphas); raises for weights of other components, an empty adapter, full weights or conflicting alphas."""
    label = resolved.label
    prefix = f"{component}."
    others = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(prefix)})
    if others:
        raise UnsupportedError(
            f"{label}: '{resolved.path.name}' has weights for {', '.join(others)} (e.g. "
            f"{next(k for k in state_dict if not k.startswith(prefix))}); dtc fuses and refits {component} "
            f"LoRAs only: keep only the keys starting with '{prefix}'"
        )
    sd = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    if not sd:
        raise RecipeError(f"{label}: '{resolved.path.name}' holds no LoRA weights")
    full = sorted(k for k in sd if ".lora_" not in k)
    if full:
        raise UnsupportedError(
            f"{label}: '{resolved.path.name}' replaces full weights ({full[0]}{', ...' if len(full) > 1 else ''}; "
            "a Control LoRA); dtc fuses and refits low-rank updates only"
        )
    meta = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} if metadata else None
    alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)}
    if alphas and meta:
        raise RecipeError(f"{label}: '{resolved.path.name}' has both alpha tensors and adapter metadata")
    return sd, meta, alphas


def _group_factors(label: str, sd: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``module.lora_A.weight``-style keys grouped per module: {module: {"A.weight" | "B.weight" | "B.bias": t}}."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, _, part = key.partition(".lora_")
        if part not in ("A.weight", "B.weight", "B.bias"):
            raise UnsupportedError(f"{label}: unexpected LoRA key '{prefix}{key}' (expected lora_A/lora_B weights)")
        factors.setdefault(module, {})[part] = value
    return factors


def _factor_pair(
    resolved: ResolvedLora, module: str, parts: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's (lora_A, lora_B) weights, checked: both present, 2-D, ranks agreeing."""
    label = resolved.label
    if "A.weight" not in parts or "B.weight" not in parts:
        missing = "lora_A" if "A.weight" not in parts else "lora_B"
        raise RecipeError(f"{label}: module '{module}' has no {missing}.weight in '{resolved.path.name}'")
    a, b = parts["A.weight"], parts["B.weight"]
    if a.ndim != 2 or b.ndim != 2:
        raise UnsupportedError(f"{label}: module '{module}' has {a.ndim}-D LoRA factors; only Linear layers")
    if b.shape[1] != a.shape[0]:
        raise RecipeError(
            f"{label}: rank mismatch in '{module}': lora_A is {list(a.shape)} (rank {a.shape[0]}) but lora_B "
            f"is {list(b.shape)} (rank {b.shape[1]})"
        )
    for name, t in (("lora_A", a), ("lora_B", b), ("lora_B bias", parts.get("B.bias"))):
        if t is not None and not t.is_floating_point():  # int/bool factors: PEFT would cast them to garbage
            dt = str(t.dtype).removeprefix("torch.")
            raise RecipeError(
                f"{label}: module '{module}' has {dt} {name} weights in '{resolved.path.name}'; LoRA factors "
                "must be floating point (float32, float16 or bfloat16); use another file"
            )
        if t is not None and not bool(t.isfinite().all()):
            raise RecipeError(
                f"{label}: module '{module}' has NaN or Inf values in its {name} weights in "
                f"'{resolved.path.name}' (a corrupt adapter); use another file"
            )
    return a, b


def check_lora_fits(weights: LoraWeights, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every module the adapter touches must be a parameter of ``shapes`` with matching in/out sizes.

    Raises:
        RecipeError: keys that match no module (all or some), or a factor whose shape does not fit.
    """
    label = f"{weights.label}: '{weights.file}'" if weights.file else weights.label
    unknown = sorted(m for m in weights.modules if f"{m}.weight" not in shapes)
    if unknown:
        n, total = len(unknown), len(weights.modules)
        scope = "none of its" if n == total else f"{n} of its {total}"
        raise RecipeError(
            f"{label}: {scope} LoRA modules match a module of {what} (e.g. '{unknown[0]}'); "
            "is this a LoRA for another model?"
        )
    for module, f in weights.modules.items():
        w = shapes[f"{module}.weight"]
        want = (f.B.shape[0], f.A.shape[1])
        if tuple(w) != want:
            raise RecipeError(
                f"{label}: shape mismatch in '{module}': B @ A is {list(want)} (lora_B {list(f.B.shape)}, lora_A "
                f"{list(f.A.shape)}) but the weight is {list(w)}"
            )
        if f.bias is not None:
            b = shapes.get(f"{module}.bias")
            if b is None or tuple(b) != (f.B.shape[0],):
                raise RecipeError(f"{label}: '{module}' has a lora_B bias but the module has no bias of that size")


# --- the stage ------------------------------------------------------------------------------------------------


def fuse_lora(loaded: LoadedPipeline, loras: list[ResolvedLora], dtype: str) -> FusedLoras:
    """Fuse ``loras`` into their denoisers (the main one, or ``component``: Wan2.2's ``transformer_2``) with
    diffusers' loaders, then unload them.

    Every adapter is parsed and checked against its denoiser before anything changes; after fusing, each
    touched weight is compared with ``base + sum(delta)`` from ``read_lora`` (``VerificationError`` if off).
    """
    pipe, main = loaded.pipe, loaded.adapter.component
    # adapter files name the pipeline's main transformer (WanPipeline saves the low-noise expert's that way too)
    parsed = [read_lora(r, loaded.pipeline_class, main) for r in loras]
    loadable = tuple(getattr(type(pipe), "_lora_loadable_modules", (main,)))
    for r, w in zip(loras, parsed, strict=True):
        target = r.target(main)
        if target not in loadable or getattr(pipe, target, None) is None:
            raise UnsupportedError(
                f"{r.label.removesuffix('.source')}.component: {loaded.pipeline_class} has no LoRA-loadable "
                f"denoiser {target!r} (it loads into: {', '.join(x for x in loadable if getattr(pipe, x, None))})"
            )
        module = getattr(pipe, target)
        check_lora_fits(
            w, {n: tuple(p.shape) for n, p in module.named_parameters()}, f"{loaded.pipeline_class}.{target}"
        )
    base: dict[str, dict[str, torch.Tensor]] = {}
    for target in dict.fromkeys(r.target(main) for r in loras):
        idx = [i for i, r in enumerate(loras) if r.target(main) == target]
        base[target] = _fuse_into(pipe, target, main, [loras[i] for i in idx], [parsed[i] for i in idx], dtype)
    adapters = [{**r.record(), **w.summary()} for r, w in zip(loras, parsed, strict=True)]
    return FusedLoras(adapters=adapters, bases=base, main=main)


def _fuse_into(
    pipe: Any, target: str, main: str, loras: list[ResolvedLora], parsed: list[LoraWeights], dtype: str
) -> dict[str, torch.Tensor]:
    """Fuse the adapters of one denoiser and check the result; returns the pre-fuse value of every touched weight."""
    module = getattr(pipe, target)
    touched = sorted({p for w in parsed for p in w.params()})
    base = {n: module.get_parameter(n).detach().clone() for n in touched}
    names = [f"dtc_lora_{target}_{i}" for i in range(len(loras))]
    into = {} if target == main else {f"load_into_{target}": True}  # diffusers' option name (WanPipeline's)
    for r, name in zip(loras, names, strict=True):
        pipe.load_lora_weights(str(r.path), adapter_name=name, use_safetensors=True, **into)
    pipe.set_adapters(names, adapter_weights=[r.scale for r in loras])
    pipe.fuse_lora(components=[target], lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()
    leftover = [n for n, _ in module.named_parameters() if "lora_" in n or ".base_layer." in n]
    if leftover:
        raise VerificationError(f"LoRA layers remain after fusing ({leftover[0]}); diffusers did not unload them")

    expected = apply_deltas(base, [(w, r.scale) for w, r in zip(parsed, loras, strict=True)])
    check_fused_finite(
        {n: module.get_parameter(n).detach() for n in touched}, list(zip(parsed, [r.scale for r in loras], strict=True))
    )
    worst = 0.0
    for n in touched:
        got = module.get_parameter(n).detach()
        d_ref = (expected[n].double() - base[n].double()).norm()
        err = float((got.double() - expected[n].double()).norm() / d_ref.clamp_min(1e-30))
        worst = max(worst, err)
    tol = FUSE_CHECK_TOL[dtype]
    if worst > tol:
        raise VerificationError(
            f"fused LoRA weights differ from W + scale*alpha/r*B@A by {worst:.2e} (relative to the update) > "
            f"{tol:.0e}; diffusers and dtc disagree on this adapter, so a refit would not match a rebuild"
        )
    log.info("fused %d LoRA(s) into %d %s weights (fused vs refit math: %.1e)", len(loras), len(touched), target, worst)
    return base


def check_fused_finite(
    fused: dict[str, torch.Tensor], loras: list[tuple[LoraWeights, float]], dtypes: dict[str, torch.dtype] | None = None
) -> None:
    """RecipeError unless every fused weight (cast to its engine dtype, ``dtypes``, when given) is finite: a scale
    such as 1e39 or factors x1e30 overflow float32 (or float16) into Inf, which only fails at run time (a black
    image), so the adapter is refused before anything is written."""
    for name, w in fused.items():
        t = w if dtypes is None or name not in dtypes else w.to(dtypes[name])
        bad = int((~t.isfinite()).sum())
        if bad:
            dtype = str(t.dtype).removeprefix("torch.")
            module = name.rsplit(".", 1)[0]
            which = [f"{lw.label} '{lw.file}' scale {scale:g}" for lw, scale in loras if module in lw.modules]
            raise RecipeError(
                f"{', '.join(which) or 'LoRA'}: fusing gives {bad} Inf/NaN value(s) in '{name}' ({dtype} overflows); "
                "the scale or the adapter's factors are too large: use a smaller scale or another file"
            )


def apply_deltas(base: dict[str, torch.Tensor], loras: list[tuple[LoraWeights, float]]) -> dict[str, torch.Tensor]:
    """``base`` (component parameter name -> weight) plus each adapter's scaled update, in adapter order, as
    PEFT merges: the update in the weight's dtype added to the weight. Returns every parameter touched."""
    out = dict(base)  # never mutated in place: each sum is a new tensor
    for weights, scale in loras:
        for module, f in weights.modules.items():
            name = f"{module}.weight"
            out[name] = out[name] + f.delta(scale, out[name].dtype)
            if f.bias is not None:
                bname = f"{module}.bias"
                out[bname] = out[bname] + (f.bias * f.scaling(scale)).to(out[bname].dtype)
    return out
