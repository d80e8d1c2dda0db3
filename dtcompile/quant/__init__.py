"""Quantization formats: the registry table and what each format needs.

``FORMATS`` maps a format name (``quant.format`` in a recipe) to its class, imported on first use. A format
class declares its requirements as data (``min_sm``, the arches each TensorRT flavour may target, whether
onnxruntime can run its graph, the custom ops its graph keeps, the parity tolerance) and builds the ModelOpt
config from a spec. ``check_targets`` is the dry-run check: it runs before any weights load.

Importing this package loads no torch, ModelOpt or ONNX.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from dtcompile.core.errors import UnsupportedError
from dtcompile.core.numerics import NVFP4_BLOCK
from dtcompile.core.registry import Registry
from dtcompile.core.targets import REFERENCE_BACKEND, sm_number

if TYPE_CHECKING:
    from dtcompile.recipe.quant import Fp8Spec, Int8Spec, Nvfp4Spec, SvdquantSpec

    AnyQuantSpec = Fp8Spec | Int8Spec | Nvfp4Spec | SvdquantSpec

#: The recipe spec a format takes (``Fp8Spec`` for ``Fp8Format``, ...).
SpecT = TypeVar("SpecT", bound="AnyQuantSpec")

#: Module types whose quantizers stay off in every format: normalization and convolutions are not run in
#: fp8/int8/fp4 by TensorRT, so Q/DQ there only adds error (and breaks strongly typed fp16 parsing).
_ALWAYS_OFF_CLASSES = ("nn.LayerNorm", "nn.Conv1d", "nn.Conv2d", "nn.Conv3d")

#: ModelOpt numerics, as in its diffusers presets (configs/numerics/*.yaml).
FP8: dict[str, Any] = {"num_bits": (4, 3), "axis": None}
INT8_PER_TENSOR: dict[str, Any] = {"num_bits": 8, "axis": None}
INT8_PER_CHANNEL: dict[str, Any] = {"num_bits": 8, "axis": 0}
NVFP4: dict[str, Any] = {
    "num_bits": (2, 1),
    "block_sizes": {-1: NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)},
    "axis": None,
}

#: torch dtype name -> ModelOpt's ``trt_high_precision_dtype`` (the type the Q/DQ ops compute in).
_TRT_DTYPE = {"float32": "Float", "float16": "Half", "bfloat16": "BFloat16"}


class QuantFormat(Generic[SpecT]):
    """One quantization format: requirements as data, plus the ModelOpt config it maps to.

    Attributes:
        name: the ``quant.format`` value.
        description: one line for ``dtc`` listings and the manifest.
        min_sm: the oldest compute capability (e.g. 89 for sm_89) whose tensor cores run the format.
        archs: per TensorRT flavour, the arches an engine may be built for.
        onnxruntime_runnable: whether the exported graph runs in onnxruntime (standard ops only).
        custom_ops: ops the exported graph keeps outside the standard ONNX domain (``domain::op``).
        parity_tolerance: the largest per-step relative error of onnxruntime against the fake-quant torch
            model that ``dtc build`` accepts (teacher-forced: both see the same step inputs; both in float32,
            a 16-bit model through float32 copies of graph and model, so the dtype adds nothing); the gate
            is this or ``quant.parity.NOISE_MARGIN`` x the model's own rounding noise, the larger.
        fix_hint: what to do instead when an arch cannot run the format.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    min_sm: ClassVar[int]
    archs: ClassVar[dict[str, tuple[str, ...]]]
    onnxruntime_runnable: ClassVar[bool] = True
    custom_ops: ClassVar[tuple[str, ...]] = ()
    parity_tolerance: ClassVar[float]
    fix_hint: ClassVar[str]

    def supports(
        self, backend: str, arch: str | None = None, *, field: str = "quant.format", fix: str | None = None
    ) -> str | None:
        """None when ``backend`` can run this format on ``arch``; otherwise one line naming why and the fix.

        ``arch`` is ignored for onnxruntime (it runs anywhere, or not at all). ``field`` is the recipe field
        that asked for the format (``components[2].quant`` for a text encoder) and ``fix`` what to do instead
        (default the format's ``fix_hint``).
        """
        fix = fix or self.fix_hint
        if backend == REFERENCE_BACKEND:
            if self.onnxruntime_runnable:
                return None
            ops = ", ".join(self.custom_ops)
            return (
                f"{field} {self.name}: onnxruntime cannot run the graph (it keeps TensorRT custom ops {ops}, "
                f"which have no onnxruntime kernel); drop onnxruntime from engine.backends"
            )
        if backend not in self.archs:
            return f"{field} {self.name}: unknown backend '{backend}'; choose one of: onnxruntime, " + ", ".join(
                self.archs
            )
        sm = sm_number(arch)
        if sm < self.min_sm:
            return (
                f"{field} {self.name} cannot target {arch}: it needs sm_{self.min_sm} or newer; "
                f"remove {arch} from engine.targets or {fix}"
            )
        allowed = self.archs[backend]
        if arch not in allowed:
            return (
                f"{field} {self.name} cannot target {arch} with {backend} (it builds {self.name} for "
                f"{', '.join(allowed)}); remove {arch} from engine.targets or {fix}"
            )
        return None

    def modelopt_config(self, spec: SpecT, exclude: Iterable[str], dtype: str) -> dict[str, Any]:
        """The ``mtq.quantize`` config for ``spec``: format entries, then attention, then exclusions."""
        entries = [{"quantizer_name": "*", "enable": False}, *self.quantizer_entries(spec)]
        if spec.quantize_mha:
            entries.append({"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": dict(FP8)})
        # off; convolutions not FP4-shaped either: ModelOpt routes a Conv3d whose (even disabled) quantizers
        # look like NVFP4 through a CUDA-only implicit-GEMM kernel (Wan's patch embedding)
        entries += [
            {"parent_class": cls, "quantizer_name": "*", "enable": False}
            | ({"cfg": dict(INT8_PER_TENSOR)} if "Conv" in cls else {})
            for cls in _ALWAYS_OFF_CLASSES
        ]
        entries += [{"quantizer_name": quantizer_pattern(p), "enable": False} for p in exclude]
        high = _TRT_DTYPE.get(dtype)
        if high is None:
            raise UnsupportedError(f"quantization needs a float32, float16 or bfloat16 model, got {dtype}")
        for entry in entries:
            cfg = entry.get("cfg")
            if isinstance(cfg, dict) and "num_bits" in cfg:
                # Q/DQ compute in the model's own type: strongly typed TensorRT needs them to match the
                # surrounding ops, and ModelOpt's int8 symbolic would otherwise Cast around every Q/DQ.
                cfg["trt_high_precision_dtype"] = high
        return {"quant_cfg": entries, "algorithm": self.algorithm(spec)}

    def quantizer_entries(self, spec: SpecT) -> list[dict[str, Any]]:
        """ModelOpt ``quant_cfg`` entries enabling this format's weight and input quantizers."""
        raise NotImplementedError

    def algorithm(self, spec: SpecT) -> str | dict[str, Any]:
        """ModelOpt's calibration algorithm for ``spec`` ("max", SmoothQuant, SVDQuant)."""
        return "max"

    def check_module(self, spec: SpecT, module: Any, exclude: Iterable[str]) -> None:
        """Raise UnsupportedError when ``spec`` cannot quantize ``module`` (checked before calibration)."""

    def check_width(self, spec: SpecT, width: int) -> str | None:
        """Dry-run check against the model's hidden width (from its config, no weights): a reason or None."""
        return None

    def manifest(self, spec: SpecT) -> dict[str, Any]:
        """What the manifest records about the format (beyond the resolved spec)."""
        return {
            "format": self.name,
            "description": self.description,
            "min_sm": self.min_sm,
            "onnxruntime_runnable": self.onnxruntime_runnable,
            "custom_ops": list(self.custom_ops),
        }


def quantizer_pattern(module_pattern: str) -> str:
    """ModelOpt quantizer-name pattern for every quantizer of the modules matching ``module_pattern``.

    Module patterns are fnmatch patterns over dotted module names (``proj_out`` is only the top-level
    ``proj_out``; ``*proj_out*`` is every module whose name contains it); quantizers hang below them.
    """
    return f"{module_pattern}.*"


FORMATS: Registry[type[QuantFormat]] = Registry(
    "format",
    {
        "fp8": "dtcompile.quant.fp8:Fp8Format",
        "int8": "dtcompile.quant.int8:Int8Format",
        "nvfp4": "dtcompile.quant.nvfp4:Nvfp4Format",
        "svdquant": "dtcompile.quant.svdquant:SvdquantFormat",
    },
)


def get_format(name: str) -> QuantFormat:
    """An instance of the format registered as ``name`` (UnsupportedError naming the choices otherwise)."""
    return FORMATS.get(name)()


def check_targets(
    spec: AnyQuantSpec | str,
    targets: Iterable[tuple[str, str | None]],
    *,
    field: str = "quant.format",
    fix: str | None = None,
) -> None:
    """Dry-run check: raise UnsupportedError (one line: format, arch, fix) for the first impossible target.

    ``spec`` is the ``quant`` section or a format name (a component's ``quant``); ``targets`` are
    ``(backend, arch)`` pairs (``arch`` is ignored for onnxruntime); ``field`` and ``fix`` as for ``supports``.
    """
    fmt = get_format(spec if isinstance(spec, str) else spec.format)
    for backend, arch in targets:
        reason = fmt.supports(backend, arch, field=field, fix=fix)
        if reason is not None:
            raise UnsupportedError(reason)


__all__ = [
    "FORMATS",
    "FP8",
    "INT8_PER_CHANNEL",
    "INT8_PER_TENSOR",
    "NVFP4",
    "QuantFormat",
    "check_targets",
    "get_format",
    "quantizer_pattern",
]
