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

    def to_manifest(self) -> dict[str, Any]:
        return {**self.result.to_manifest(), "accuracy": self.accuracy.to_manifest()}


def quantize_denoisers(
    loaded: Any, recipe: Any, base_dir: Path | None, weights_sha256: str, names: list[str]
) -> dict[str, QuantizedComponent]:
    """For each denoiser in ``names`` (Wan2.2: both experts): trace the unquantized model on held-out prompts,
    calibrate (or restore) it on the pipeline's own runs (which call an expert only on its own steps), then
    measure its accuracy (a). Every unquantized reference is traced before
    anything is quantized, so each expert's accuracy is measured against the fully unquantized pipeline."""
    import hashlib

    spec, shapes = recipe.quant, recipe.export.shapes
    size = {"height": shapes.height.opt, "width": shapes.width.opt, "max_sequence_length": shapes.text_len.opt}
    if shapes.frames is not None:  # video: calibrate and evaluate at the opt frame count
        size["frames"] = shapes.frames.opt
    views = {n: component_view(loaded.adapter, n) for n in names}
    references = {
        n: trace_pipeline(
            loaded.pipe, views[n], HELDOUT_PROMPTS[: spec.accuracy.prompts], steps=spec.accuracy.steps,
            seed=spec.calib.seed, **size,
        )
        for n in names
    }  # fmt: skip
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
        accuracy, trace = accuracy_report(loaded.pipe, views[n], references[n])
        log.info("quantized %s (%s): held-out min cosine %.6f, max rel err %.2e vs unquantized", n, spec.format,
                 accuracy.min_cos, accuracy.max_rel_err)  # fmt: skip
        out[n] = QuantizedComponent(results[n], accuracy, trace)
    return out


__all__ = ["QuantizedComponent", "quantize_denoisers"]
