"""Quantize stage: a loaded pipeline and the recipe's ``quant:`` section in, its component quantized in place out.

Traces the unquantized component on held-out prompts, calibrates it (or restores its cached calibrated state,
``dtcompile.quant.calibration``), then measures it against the unquantized trace
(``dtcompile.quant.accuracy``). Output: ``QuantizedComponent``, which the export stage turns into a Q/DQ graph
and checks against the fake-quant trace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def quantize_component(loaded: Any, recipe: Any, base_dir: Path | None, weights_sha256: str) -> QuantizedComponent:
    """Trace the unquantized model on held-out prompts, calibrate (or restore), then measure accuracy (a)."""
    spec, shapes = recipe.quant, recipe.export.shapes
    size = {"height": shapes.height.opt, "width": shapes.width.opt, "max_sequence_length": shapes.text_len.opt}
    if shapes.frames is not None:  # video: calibrate and evaluate at the opt frame count
        size["frames"] = shapes.frames.opt
    reference = trace_pipeline(
        loaded.pipe,
        loaded.adapter,
        HELDOUT_PROMPTS[: spec.accuracy.prompts],
        steps=spec.accuracy.steps,
        seed=spec.calib.seed,
        **size,
    )
    result = calibrate(
        loaded.pipe,
        loaded.adapter,
        spec,
        quant_cache_dir(),
        component_sha256=weights_sha256,
        base_dir=base_dir,
        **size,
    )
    accuracy, trace = accuracy_report(loaded.pipe, loaded.adapter, reference)
    log.info(
        "quantized %s (%s): held-out min cosine %.6f, max rel err %.2e vs unquantized",
        loaded.adapter.component,
        spec.format,
        accuracy.min_cos,
        accuracy.max_rel_err,
    )
    return QuantizedComponent(result, accuracy, trace)


__all__ = ["QuantizedComponent", "quantize_component"]
