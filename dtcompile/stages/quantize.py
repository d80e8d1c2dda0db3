"""Quantize stage: a loaded pipeline and the recipe's ``quant:`` section in, its denoisers quantized in place out.

Traces each unquantized denoiser on held-out prompts, calibrates it (or restores its cached calibrated state,
``dtcompile.quant.calibration``), then measures it against the unquantized trace
(``dtcompile.quant.accuracy``). Output: one ``QuantizedComponent`` per denoiser, which the export stage turns
into a Q/DQ graph and checks against the fake-quant trace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtcompile.core.errors import UnsupportedError
from dtcompile.models.base import component_view
from dtcompile.quant.accuracy import HELDOUT_PROMPTS, AccuracyReport, PipelineTrace, accuracy_report, trace_pipeline
from dtcompile.quant.calibration import QuantResult, calibrate, quant_cache_dir

log = logging.getLogger("dtcompile.quantize")


@dataclass
class QuantizedComponent:
    """The quantize stage's output: calibration record, held-out accuracy (a) and the fake-quant trace."""

    result: QuantResult
    accuracy: AccuracyReport
    trace: PipelineTrace  # the fake-quant run; the exported graph is checked against it (parity b)
    accuracy_s: float = 0.0  # both held-out runs (unquantized reference and fake-quant) and the teacher-forced pass

    def to_manifest(self) -> dict[str, Any]:
        """JSON for the manifest's ``quant`` section, with what calibration and the accuracy report cost."""
        return {**self.result.to_manifest(), "accuracy": self.accuracy.to_manifest(), **self.cost()}

    def cost(self) -> dict[str, Any]:
        """``calibration_s`` (restoring the state on a cache hit), ``accuracy_s`` and, when this build
        calibrated, ``accuracy_to_calibration``: how much the held-out report adds to calibration."""
        calib_s = self.result.calib_s
        out: dict[str, Any] = {"calibration_s": round(calib_s, 3), "accuracy_s": round(self.accuracy_s, 3)}
        if not self.result.cache_hit and calib_s > 0:
            out["accuracy_to_calibration"] = round(self.accuracy_s / calib_s, 3)
        return out


def quantize_denoisers(
    loaded: Any, recipe: Any, base_dir: Path | None, weights_sha256: str, names: list[str]
) -> dict[str, QuantizedComponent]:
    """For each denoiser in ``names`` (Wan2.2: both experts): trace the unquantized model on held-out prompts,
    calibrate (or restore) it on the pipeline's own runs (which call an expert only on its own steps), then
    measure its accuracy (a). Every unquantized reference is traced before
    anything is quantized, so each expert's accuracy is measured against the fully unquantized pipeline."""
    import hashlib
    import time

    import modelopt.torch.quantization  # noqa: F401  (its import takes seconds: timed as neither stage part)

    spec, shapes = recipe.quant, recipe.export.shapes
    size = {"height": shapes.height.opt, "width": shapes.width.opt, "max_sequence_length": shapes.text_len.opt}
    if shapes.frames is not None:  # video: calibrate and evaluate at the opt frame count
        size["frames"] = shapes.frames.opt
    views = {n: component_view(loaded.adapter, n) for n in names}
    references, accuracy_s = {}, {}
    for n in names:
        t0 = time.perf_counter()
        references[n] = trace_pipeline(
            loaded.pipe, views[n], HELDOUT_PROMPTS[: spec.accuracy.prompts], steps=spec.accuracy.steps,
            seed=spec.calib.seed, label=f"accuracy unquantized {n}", **size,
        )  # fmt: skip
        accuracy_s[n] = time.perf_counter() - t0
    for n, ref in references.items():
        if not any(ref.inputs):
            raise UnsupportedError(
                f"quant.accuracy.steps: {n} ran no step in {spec.accuracy.steps} held-out step(s) (the pipeline "
                "calls it only on its own part of the schedule); raise quant.accuracy.steps"
            )
    results = {}
    for n in names:  # one calibrated state per denoiser: the key covers its name
        digest = (
            weights_sha256
            if n == loaded.adapter.component
            else hashlib.sha256(f"{weights_sha256}:{n}".encode()).hexdigest()
        )
        results[n] = calibrate(loaded.pipe, views[n], spec, quant_cache_dir(), component_sha256=digest,
                               base_dir=base_dir, **size)  # fmt: skip
    out = {}
    for n in names:
        t0 = time.perf_counter()
        accuracy, trace = accuracy_report(loaded.pipe, views[n], references[n], label=f"accuracy quantized {n}")
        accuracy_s[n] += time.perf_counter() - t0
        log.info("quantized %s (%s): held-out min cosine %.6f, max rel err %.2e vs unquantized", n, spec.format,
                 accuracy.min_cos, accuracy.max_rel_err)  # fmt: skip
        out[n] = QuantizedComponent(results[n], accuracy, trace, accuracy_s[n])
        _log_cost(n, out[n])
    return out


def _log_cost(name: str, q: QuantizedComponent) -> None:
    cost = q.cost()
    ratio = cost.get("accuracy_to_calibration")
    versus = (
        f"{ratio:.2f}x calibration's {cost['calibration_s']:.1f} s" if ratio is not None else "calibration restored"
    )
    log.info(
        "quantize %s: accuracy report took %.1f s (%s; quant.accuracy.prompts x steps sizes it)",
        name,
        cost["accuracy_s"],
        versus,
    )


__all__ = ["QuantizedComponent", "quantize_denoisers"]
