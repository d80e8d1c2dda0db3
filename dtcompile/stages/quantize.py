"""Quantize stage: a loaded pipeline and the recipe's ``quant:`` section and ``components[].quant`` in, its
denoisers and those text encoders quantized in place out.

Traces each unquantized denoiser on held-out prompts, calibrates it (or restores its cached calibrated state,
``dtcompile.quant.calibration``), then measures it against the unquantized trace
(``dtcompile.quant.accuracy``). Output: one ``QuantizedComponent`` per denoiser, which the export stage turns
into a Q/DQ graph and checks against the fake-quant trace. A text encoder with its own ``quant`` (a T5 in fp8)
is quantized after the denoisers (so their calibration and accuracy runs see the unquantized encoder):
calibrated by running the encoder on the calibration prompts, measured against its unquantized outputs on the
held-out prompts (``QuantizedAux``).
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


@dataclass(frozen=True)
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
        return _cost(self.result, self.accuracy_s)


def _cost(result: QuantResult, accuracy_s: float) -> dict[str, Any]:
    calib_s = result.calib_s
    out: dict[str, Any] = {"calibration_s": round(calib_s, 3), "accuracy_s": round(accuracy_s, 3)}
    if not result.cache_hit and calib_s > 0:
        out["accuracy_to_calibration"] = round(accuracy_s / calib_s, 3)
    return out


@dataclass(frozen=True)
class QuantizedAux:
    """A text encoder quantized on its own (``components[i].quant``): its calibration record, the quantization
    effect (``accuracy``: fake-quant against unquantized outputs on held-out prompts) and those prompts' graph
    inputs, on which the export stage checks the graph against the fake-quant encoder (parity b)."""

    result: QuantResult
    accuracy: AccuracyReport
    inputs: list[dict[str, Any]]  # held-out keyword feeds (``input_ids``, one prompt each)
    field: str  # the recipe field that asked for it, e.g. "components[1].quant"
    accuracy_s: float = 0.0

    def to_manifest(self) -> dict[str, Any]:
        """JSON for the component's ``quant`` section (as a denoiser's, with ``accuracy`` per graph output)."""
        return {**self.result.to_manifest(), "accuracy": self.accuracy.to_manifest(), **self.cost()}

    def cost(self) -> dict[str, Any]:
        """As ``QuantizedComponent.cost``: calibration and the held-out comparison, in seconds."""
        return _cost(self.result, self.accuracy_s)


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


def quantize_aux(loaded: Any, recipe: Any, base_dir: Path | None, spec: Any, weights_sha256: str) -> QuantizedAux:
    """Quantize the text encoder ``spec`` (a ``ComponentSpec`` with ``quant``) in place on ``loaded.pipe``.

    The encoder is cast to the component's dtype (as its export will be), its outputs on the held-out prompts
    are recorded unquantized, it is calibrated (or restored) by running it on the calibration prompts
    (``recipe.calibration()``: the ``quant:`` section's prompts, else the schema's defaults) tokenized as the
    pipeline does at the opt ``text_len``, and its fake-quant outputs on the held-out prompts are compared with
    the unquantized ones. ``weights_sha256`` digests the component's source folder (the calibration key's).

    Raises:
        UnsupportedError: the module is not the kind of encoder the format is built for.
    """
    import time

    import modelopt.torch.quantization  # noqa: F401  (its import takes seconds: timed as neither part)

    from dtcompile.models.components import COMPONENT_KINDS
    from dtcompile.quant.accuracy import module_outputs, outputs_report
    from dtcompile.quant.calibration import calibrate_encoder, load_prompts
    from dtcompile.recipe.quant import parse_quant_spec
    from dtcompile.stages.load import aux_module
    from dtcompile.stages.shapes import shapes_from_recipe

    field = component_field(recipe, spec.name, "quant")
    kind = COMPONENT_KINDS[loaded.adapter.aux_components[spec.name]]
    graph, module, _ = aux_module(loaded, recipe, spec)
    foreign = kind.foreign(module)
    if foreign:
        raise UnsupportedError(f"{field}: {spec.name} {foreign}, which {spec.quant} is built for; remove quant from it")
    calib, acc = recipe.calibration()
    shapes = shapes_from_recipe(recipe.export.shapes)
    prompts = load_prompts(calib, base_dir)
    ids = graph.input_ids(loaded.pipe, prompts, shapes)
    batches = [{"input_ids": ids[i : i + calib.batch]} for i in range(0, len(prompts), calib.batch)]
    heldout_ids = graph.input_ids(loaded.pipe, list(HELDOUT_PROMPTS[: acc.prompts]), shapes)
    heldout = [{"input_ids": heldout_ids[i : i + 1]} for i in range(len(heldout_ids))]
    t0 = time.perf_counter()
    reference = module_outputs(graph.export_module(module), heldout, label=f"accuracy unquantized {spec.name}")
    accuracy_s = time.perf_counter() - t0
    qspec = parse_quant_spec({"format": spec.quant, "exclude": list(kind.quant_exclude)})
    record = {
        "format": spec.quant,
        "exclude": list(kind.quant_exclude),
        "quantize_mha": False,
        "calib": {"prompts": calib.prompts if isinstance(calib.prompts, str) else "(inline list)",
                  "size": calib.size, "batch": calib.batch, "tokens": int(ids.shape[-1])},
    }  # fmt: skip
    result, quantized = calibrate_encoder(
        module, qspec, list(kind.quant_exclude), prompts, batches, quant_cache_dir(),
        component_sha256=weights_sha256, label=spec.name, record=record,
    )  # fmt: skip
    if quantized is not module:
        setattr(loaded.pipe, graph.attr, quantized)
    t0 = time.perf_counter()
    candidate = module_outputs(graph.export_module(quantized), heldout, label=f"accuracy quantized {spec.name}")
    accuracy_s += time.perf_counter() - t0
    accuracy = outputs_report(candidate, reference, graph.outputs, names=("quantized", "unquantized"))
    log.info("quantized %s (%s): held-out min cosine %.6f, max rel err %.2e vs unquantized", spec.name, spec.quant,
             accuracy.min_cos, accuracy.max_rel_err)  # fmt: skip
    out = QuantizedAux(result, accuracy, heldout, field, accuracy_s)
    _log_cost(spec.name, out)
    return out


def component_field(recipe: Any, name: str, key: str) -> str:
    """The dotted recipe field of component ``name``'s ``key``, e.g. ``components[1].quant``."""
    index = [c.name for c in recipe.components].index(name)
    return f"components[{index}].{key}"


def _log_cost(name: str, q: QuantizedComponent | QuantizedAux) -> None:
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


__all__ = ["QuantizedAux", "QuantizedComponent", "component_field", "quantize_aux", "quantize_denoisers"]
