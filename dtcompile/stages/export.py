"""Export stage: a loaded pipeline's component in, its ONNX graph, parity record and pipeline files out.

Input: a ``LoadedPipeline``, the recipe, the artifact folder, the attention mode the caller resolved
(``dtcompile.attention.modes.resolve_attention``) and, for quantized builds, the quantize stage's output. Output: an
``ExportedComponent`` (graph path, TensorRT shape profile, manifest entry). The graph itself is written by the
library exporter ``dtcompile.export.onnx.export_onnx`` with the upstream patches the model adapter selects
(``export_patches()``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import VerificationError
from dtcompile.core.graph import ExportSpec, ShapeProfile
from dtcompile.core.metrics import rel_l2
from dtcompile.core.progress import Progress, measured, progress
from dtcompile.core.targets import REFERENCE_BACKEND
from dtcompile.export.onnx import export_onnx
from dtcompile.stages.shapes import shapes_from_recipe

if TYPE_CHECKING:
    from dtcompile.attention.modes import AttentionChoice
    from dtcompile.recipe import Recipe
    from dtcompile.recipe.schema import ComponentSpec
    from dtcompile.stages.load import LoadedPipeline
    from dtcompile.stages.quantize import QuantizedAux, QuantizedComponent

log = logging.getLogger("dtcompile.export")


PARITY_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class ExportedComponent:
    """The exported component: its graph, TensorRT shape profile and manifest entry."""

    onnx_path: Path
    profile: ShapeProfile
    manifest: dict[str, Any]


def check_parity(onnx_path: Path, wrapper: Any, spec: ExportSpec, dtype: str) -> dict[str, Any]:
    """onnxruntime vs torch on the export's example inputs, every output; VerificationError beyond the tolerance.

    The record's ``rel_l2`` / ``max_abs`` are the worst over the outputs (``outputs`` has each one's).
    """
    import torch

    from dtcompile.backends.onnxruntime import OrtRunner

    runner = OrtRunner(onnx_path, optimization="basic")
    wrapper.eval()  # the reference never runs dropout (a T5 config's dropout_rate 0.1 would be noise here)
    with torch.no_grad():
        ref = wrapper(*spec.example_inputs.values())
    refs = ref if isinstance(ref, tuple) else (ref,)
    got = runner(dict(spec.example_inputs))
    per = {
        name: {"rel_l2": rel_l2(got[name], r), "max_abs": float((got[name].double() - r.double()).abs().max())}
        for name, r in zip(spec.output_names, refs, strict=True)
    }
    err = max(p["rel_l2"] for p in per.values())
    result = {
        "rel_l2": err,
        "max_abs": max(p["max_abs"] for p in per.values()),
        "tolerance": PARITY_TOL[dtype],
        "inputs": {k: list(v.shape) for k, v in spec.example_inputs.items()},
    }
    if len(per) > 1:
        result["outputs"] = per
    log.info("parity onnxruntime vs torch (%s): rel L2 %.2e (tolerance %.0e)", onnx_path.stem, err, PARITY_TOL[dtype])
    if not err <= PARITY_TOL[dtype]:
        raise VerificationError(
            f"{onnx_path}: onnxruntime output differs from torch by rel L2 {err:.2e} > {PARITY_TOL[dtype]:.0e}; "
            "the export is wrong (not a precision issue)"
        )
    return result


def export_component(
    loaded: LoadedPipeline,
    recipe: Recipe,
    artifact_dir: Path,
    quantized: QuantizedComponent | None = None,
    *,
    attention: AttentionChoice,
    component: str | None = None,
) -> ExportedComponent:
    """Export the adapter's component of ``loaded`` into ``artifact_dir/onnx`` and check it against torch.

    ``attention`` is the caller's ``resolve_attention(recipe, targets)`` (export.attention: native | plugin |
    decomposed, docs/attention.md). With ``quantized`` (the quantize stage's output) the graph is written with
    standard Q/DQ and checked against the fake-quant torch model over its held-out trace (``parity_report``)
    instead.
    """
    from dtcompile.attention.router import export_attention
    from dtcompile.core.dtypes import torch_dtype
    from dtcompile.models.base import component_view

    adapter = component_view(loaded.adapter, component)  # another denoiser of the pipeline (Wan2.2's transformer_2)
    comp = adapter.component
    module = getattr(loaded.pipe, comp).eval()
    shapes = shapes_from_recipe(recipe.export.shapes)
    spec = adapter.export_spec(module, loaded.pipe_config, shapes, torch_dtype(recipe.dtype))
    spec = dataclasses.replace(spec, opset=recipe.export.opset)
    wrapper = adapter.export_module(module)
    patches = adapter_patches(adapter)
    with progress(f"export {comp}", None, "phase", heartbeat=True) as bar:
        with export_attention(attention.mode) as trace:
            quant_format = quantized.result.format if quantized is not None else None
            art, qonnx = _export_graph(wrapper, spec, artifact_dir, comp, recipe, patches, bar, quant_format)
        bar.phase("mapping weights")
        from dtcompile.weights.weight_map import write_weight_map

        # torch parameter -> ONNX initializer (name, layout, dtype, Q/DQ scale), recorded once for `dtc refit`
        with measured(f"export {comp}: mapping weights", log):
            unread = adapter.unread_params(dict(module.config))
            weight_map = write_weight_map(module, art.path, artifact_dir, comp, unread=unread)
    profile = adapter.shape_profile(module, loaded.pipe_config, shapes)
    entry: dict[str, Any] = {
        "config": {k: v for k, v in dict(module.config).items() if not k.startswith("_")},
        **art.to_manifest(artifact_dir),
        "attention": {**attention.to_json(), **trace.check_graph(art.op_types, type(module).__name__)},
        "profile": profile.to_json(),
        "engines": [],
        "weight_map": weight_map,
    }
    onnx_entry = entry["onnx"]
    if quantized is not None:
        from dtcompile.quant import get_format
        from dtcompile.quant.parity import parity_report

        fmt = quantized.result.format  # the recipe's quant.format
        entry["quant"] = {**quantized.to_manifest(), "graph": qonnx.to_manifest()}
        # parity (b): the graph in onnxruntime against the fake-quant torch model, step by step, both in float32
        # (a 16-bit model also end to end, information only: quant.parity.end_to_end)
        with measured(f"export {comp}: parity (b)", log):
            parity = parity_report(loaded.pipe, adapter, quantized.trace, art.path, fmt)
        entry["quant"]["parity"] = parity.to_manifest()
        if "onnxruntime" in recipe.engine.backends and get_format(fmt).onnxruntime_runnable:
            entry["engines"].append(
                {"backend": REFERENCE_BACKEND, "arch": "any", **{k: onnx_entry[k] for k in ("file", "sha256", "size")}}
            )
    elif "onnxruntime" in recipe.engine.backends:
        entry["parity"] = check_parity(art.path, wrapper, spec, recipe.dtype)
        entry["engines"].append(
            {"backend": REFERENCE_BACKEND, "arch": "any", **{k: onnx_entry[k] for k in ("file", "sha256", "size")}}
        )
    return ExportedComponent(art.path, profile, entry)


def _export_graph(
    wrapper: Any, spec: ExportSpec, artifact_dir: Path, comp: str, recipe: Recipe, patches: Any, bar: Progress,
    quant_format: str | None,
) -> tuple[Any, Any]:  # fmt: skip
    """(OnnxArtifact, QuantizedOnnx or None): the plain graph, or the one quantized to ``quant_format`` with
    standard Q/DQ."""
    if quant_format is None:
        return export_onnx(wrapper, spec, artifact_dir / "onnx", name=comp, patches=patches, progress=bar), None
    from dtcompile.quant.export import export_quantized

    qonnx = export_quantized(
        wrapper,
        spec,
        artifact_dir / "onnx",
        name=comp,
        quant_format=quant_format,
        dtype=recipe.dtype,
        patches=patches,
        progress=bar,
    )
    return qonnx.artifact, qonnx


def export_aux(
    loaded: LoadedPipeline,
    recipe: Recipe,
    artifact_dir: Path,
    spec: ComponentSpec,
    quantized: QuantizedAux | None = None,
) -> ExportedComponent:
    """Export a text encoder or the VAE decoder (``ModelAdapter.aux_graph``) into ``artifact_dir/onnx`` and
    check every output against torch on the example inputs; attention as torch exports it.

    With ``quantized`` (a text encoder the quantize stage quantized, ``components[i].quant``) the graph is
    written with standard Q/DQ and checked against the fake-quant encoder in float32 on the held-out prompts
    (``component_parity``; VerificationError beyond the format's tolerance) instead.
    """
    from dtcompile.core.dtypes import torch_dtype
    from dtcompile.stages.load import aux_module

    graph, module, dtype = aux_module(loaded, recipe, spec)
    shapes = shapes_from_recipe(recipe.export.shapes)
    ex = dataclasses.replace(graph.export_spec(module, shapes, torch_dtype(dtype)), opset=recipe.export.opset)
    wrapper = graph.export_module(module)
    qonnx = None
    with progress(f"export {spec.name}", None, "phase", heartbeat=True) as bar, graph.exporting(module):
        if quantized is None:
            art = export_onnx(wrapper, ex, artifact_dir / "onnx", name=spec.name, patches=(), progress=bar)
        else:
            from dtcompile.quant.export import export_quantized

            qonnx = export_quantized(wrapper, ex, artifact_dir / "onnx", name=spec.name,
                                     quant_format=quantized.result.format, dtype=dtype, patches=(), progress=bar)  # fmt: skip
            art = qonnx.artifact
    profile = graph.shape_profile(module, shapes)
    entry: dict[str, Any] = {
        "role": graph.role,
        "attr": graph.attr,
        "config": _config_json(module.config),
        **art.to_manifest(artifact_dir),
        "profile": profile.to_json(),
        "engines": [],
    }
    if spec.dtype not in (None, recipe.dtype):
        entry["dtype"] = dtype
    tile = getattr(graph, "tile_record", lambda: None)()
    if tile is not None:
        entry["tile"] = tile
    runs_in_ort = "onnxruntime" in recipe.engine.backends
    if quantized is not None:
        from dtcompile.quant import get_format
        from dtcompile.quant.parity import component_parity

        fmt = quantized.result.format
        assert qonnx is not None  # exported quantized above
        with measured(f"export {spec.name}: parity (b)", log):
            parity = component_parity(module, graph.export_module, art.path, quantized.inputs, graph.outputs, fmt,
                                      field=quantized.field)  # fmt: skip
        entry["quant"] = {**quantized.to_manifest(), "graph": qonnx.to_manifest(), "parity": parity.to_manifest()}
        runs_in_ort = runs_in_ort and get_format(fmt).onnxruntime_runnable
    elif runs_in_ort:
        entry["parity"] = check_parity(art.path, wrapper, ex, dtype)
    if runs_in_ort:
        onnx_entry = entry["onnx"]
        entry["engines"].append(
            {"backend": REFERENCE_BACKEND, "arch": "any", **{k: onnx_entry[k] for k in ("file", "sha256", "size")}}
        )
    return ExportedComponent(art.path, profile, entry)


def _init_config(pipe: Any, comps: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's own config values its constructor takes (e.g. Wan2.2's ``boundary_ratio``), which
    ``pipe.components`` does not carry."""
    import inspect

    params = inspect.signature(type(pipe).__init__).parameters
    return {k: pipe.config[k] for k in params if k not in comps and k != "self" and k in pipe.config}


def _config_json(config: Any) -> dict[str, Any]:
    """A diffusers or transformers config as plain JSON (private ``_`` keys dropped)."""
    import json

    data = json.loads(config.to_json_string()) if hasattr(config, "to_json_string") else dict(config)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def adapter_patches(adapter: Any) -> Sequence[Any] | None:
    """The upstream export patches the model adapter selects (``export_patches()``: names in
    ``dtcompile.export.patches.PATCHES`` or factories); ``None`` (the exporter's defaults) for an adapter
    without the method."""
    select = getattr(adapter, "export_patches", None)
    return None if select is None else tuple(select())


def export_pipeline_files(loaded: LoadedPipeline, artifact_dir: Path, attrs: Sequence[str] = ()) -> dict[str, Any]:
    """Save the pipeline minus the engine-backed components (``attrs``: the other ones' pipeline attributes)
    into ``artifact_dir/pipeline``."""
    from dtcompile.manifest import file_entry

    pipe = loaded.pipe
    comps = dict(pipe.components)
    for attr in (loaded.adapter.component, *attrs):
        comps[attr] = None
    out = artifact_dir / "pipeline"
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "transformer=None cannot be saved" is the point here
    try:
        type(pipe)(**comps, **_init_config(pipe, comps)).save_pretrained(out, safe_serialization=True)
    finally:
        dlogging.set_verbosity(level)
    files = [file_entry(artifact_dir, p) for p in sorted(out.rglob("*")) if p.is_file()]
    return {"dir": "pipeline", "files": files}
