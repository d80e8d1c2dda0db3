"""The ``quant:`` recipe section: a union on ``format`` plus calibration, attention and exclusion settings.

```yaml
quant:
  format: int8          # fp8 | int8 | nvfp4 | svdquant
  alpha: 0.8            # int8 only: SmoothQuant migration strength
  calib: {prompts: builtin, size: 128, batch: 2, steps: 30, seed: 0, percentile: 1.0}
  quantize_mha: false   # fp8 Q/K/V/softmax in attention (fp8, nvfp4, svdquant)
  exclude: null         # module-name patterns never quantized; null = the model family's defaults
```

``exclude`` patterns are fnmatch patterns over dotted module names of the quantized component (``proj_out`` is
the top-level module only, ``*norm_out*`` any name containing it); a module's children are excluded with it.
A list replaces the family's defaults (repeat them to extend), and each pattern must match some module.

Defaults live only here. Every model is frozen and forbids unknown keys, like the rest of the recipe.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from dtcompile.recipe.base import Strict as _Strict

#: Names accepted by ``quant.format`` (kept in step with ``dtcompile.quant.FORMATS``).
FORMAT_NAMES = ("fp8", "int8", "nvfp4", "svdquant")
#: ``calib.prompts`` value naming the prompt file shipped with dtcompile (recipes/calib/prompts.txt).
BUILTIN_PROMPTS = "builtin"


class CalibSpec(_Strict):
    """Calibration data and schedule: which prompts, how many, and how the pipeline is run over them.

    ``prompts`` is ``builtin`` (dtcompile's shipped prompt file), a path to a UTF-8 file with one prompt per
    line (blank lines and lines starting with ``#`` are skipped; relative paths are resolved against the
    recipe's folder), or an inline list. The first ``size`` prompts are used, ``batch`` per pipeline call,
    each call running ``steps`` denoising steps from a generator seeded with ``seed`` + batch index.
    ``percentile`` is the fraction of those steps (counted from the first, noisiest one) whose activation
    ranges are collected: 1.0 collects every step, 0.5 the first half. A text encoder quantized on its own
    (``components[i].quant``) runs on the first ``size`` prompts, ``batch`` per call (no steps).
    """

    prompts: str | list[str] = BUILTIN_PROMPTS
    """"builtin" (the shipped prompt file), a path to a UTF-8 file (one prompt per line; relative to the recipe's folder) or an inline list; a components[i].quant text encoder is calibrated on the same prompts."""
    size: int = Field(default=128, ge=1, le=100_000)
    """How many prompts calibrate (the first ``size``)."""
    batch: int = Field(default=2, ge=1, le=64)
    """Prompts per pipeline call."""
    steps: int = Field(default=30, ge=1, le=1000)
    """Denoising steps per calibration call."""
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    """Generator seed of the first call (call i uses seed + i)."""
    percentile: float = Field(default=1.0, gt=0.0, le=1.0)
    """Fraction of the steps, from the first (noisiest), whose activation ranges are collected."""

    @field_validator("prompts")
    @classmethod
    def _prompts_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("give 'builtin', a prompt file path, or a list of prompts")
            return value
        if not value:
            raise ValueError("the prompt list is empty; give at least one prompt, a file path, or 'builtin'")
        for i, prompt in enumerate(value):
            if not prompt.strip():
                raise ValueError(f"prompt [{i}] is blank")
        return value

    @model_validator(mode="after")
    def _enough_inline_prompts(self) -> CalibSpec:
        if isinstance(self.prompts, list) and len(self.prompts) < self.size:
            raise ValueError(
                f"size {self.size} needs at least {self.size} prompts but the list has {len(self.prompts)}; "
                f"set calib.size to {len(self.prompts)} or add prompts"
            )
        return self

    def collected_steps(self) -> int:
        """How many denoising steps (from the first) have their activation ranges collected."""
        return max(1, int(self.steps * self.percentile + 1e-9))


class AccuracySpec(_Strict):
    """Held-out evaluation stored in the manifest: ``prompts`` held-out prompts x ``steps`` denoising steps.

    It costs about three ``prompts`` x ``steps`` runs of the denoiser (unquantized, fake-quant, teacher-forced)
    against calibration's ``calib.size / calib.batch`` x ``calib.steps`` batched calls: with the defaults
    (4 x 4 against 128 x 30) a few percent of calibration. The manifest records both times
    (``quant.calibration_s``, ``quant.accuracy_s``, ``quant.accuracy_to_calibration``).
    """

    prompts: int = Field(default=4, ge=1, le=8)
    """Held-out prompts the accuracy report runs (fake-quant vs unquantized); its cost grows with prompts x steps."""
    steps: int = Field(default=4, ge=1)
    """Denoising steps per held-out prompt."""


class _QuantBase(_Strict):
    calib: CalibSpec = CalibSpec()
    """Calibration data and schedule."""
    accuracy: AccuracySpec = AccuracySpec()
    """Size of the held-out accuracy report written to the manifest."""
    quantize_mha: bool = False
    """Quantize attention (Q/K/V and softmax) to fp8 where the head size allows."""
    exclude: list[str] | None = None
    """Module-name fnmatch patterns never quantized; null keeps the model family's defaults, a list replaces them."""

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        for i, pattern in enumerate(value):
            if not pattern.strip():
                raise ValueError(
                    f"exclude[{i}] is blank; give a module-name pattern such as 'proj_out' or '*norm_out*'"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate pattern in {value}")
        return value


class Fp8Spec(_QuantBase):
    """FP8 (E4M3) per-tensor weights and activations, max calibration. Needs sm_89+."""

    format: Literal["fp8"]
    """Selects the format: fp8 (E4M3) weights and activations."""


class Int8Spec(_QuantBase):
    """INT8 per-channel weights and per-tensor activations with SmoothQuant (``alpha`` = migration strength)."""

    format: Literal["int8"]
    """Selects the format: int8 weights and activations with SmoothQuant."""
    alpha: float = Field(default=0.8, ge=0.0, le=1.0)
    """SmoothQuant migration strength."""

    @model_validator(mode="after")
    def _no_fp8_attention(self) -> Int8Spec:
        if self.quantize_mha:
            raise ValueError(
                "quantize_mha adds fp8 attention, which int8 engines cannot run on the arches int8 exists for "
                "(sm_75/sm_86 have no fp8); set quantize_mha: false, or use format fp8"
            )
        return self


class Nvfp4Spec(_QuantBase):
    """NVFP4 (E2M1 values, FP8 scales per 16-element block) weights and activations. Needs Blackwell."""

    format: Literal["nvfp4"]
    """Selects the format: NVFP4 (E2M1 with FP8 block scales; needs Blackwell)."""


class SvdquantSpec(_QuantBase):
    """NVFP4 plus a high-precision low-rank branch of ``rank`` (SVDQuant); rank must be below the model width."""

    format: Literal["svdquant"]
    """Selects the format: NVFP4 plus a low-rank high-precision branch."""
    rank: int = Field(default=32, ge=1)
    """Rank of the SVDQuant branch (below the model width)."""


def _known_format(value: Any) -> Any:
    """Reject a missing or unknown ``format`` with the list of choices (before the union is tried)."""
    if isinstance(value, dict):
        fmt = value.get("format")
        if fmt is None:
            raise ValueError(f"format is required; choose one of: {', '.join(FORMAT_NAMES)}")
        if fmt not in FORMAT_NAMES:
            raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMAT_NAMES)}")
    return value


#: The ``quant:`` section: one of the four format models, chosen by ``format``.
QuantSpec = Annotated[
    Fp8Spec | Int8Spec | Nvfp4Spec | SvdquantSpec,
    Field(discriminator="format"),
    BeforeValidator(_known_format),
]


def parse_quant_spec(data: Any) -> Fp8Spec | Int8Spec | Nvfp4Spec | SvdquantSpec:
    """Validate a plain ``quant:`` mapping (tests and tools; recipes embed ``QuantSpec`` directly)."""
    from pydantic import TypeAdapter

    return TypeAdapter(QuantSpec).validate_python(data)


__all__ = [
    "BUILTIN_PROMPTS",
    "FORMAT_NAMES",
    "CalibSpec",
    "Fp8Spec",
    "Int8Spec",
    "Nvfp4Spec",
    "QuantSpec",
    "SvdquantSpec",
    "parse_quant_spec",
]
