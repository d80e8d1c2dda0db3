"""Export stage for cached artifacts: a loaded transformer in, one ONNX graph per part out.

Input: a ``LoadedPipeline`` whose recipe has a ``cache`` section. The adapter's ``cache_layout()``
(``dtcompile.models.base.CacheLayout``) says how its component splits, and each further denoiser (Wan2.2's
``transformer_2``) splits the same way. Output: ``<artifact>/onnx/<comp>.<part>.onnx`` per denoiser ``comp`` for

- ``prologue``: the monolithic graph's inputs -> the layout's ``streams`` and ``shared`` tensors;
- ``blocks<i>``: one per segment (``dtcompile.recipe.cache.plan_segments``): streams + shared -> ``<stream>_out``,
  running the segment's blocks in order;
- ``epilogue``: the layout's ``epilogue_inputs`` -> the component's output.

Each part wraps the loaded transformer's own submodules (no weights are copied), is exported with
``dtcompile.export.onnx.export_onnx`` (its rms_norm fix and the adapter's patches apply) with dynamic batch and
image tokens, checked against torch with onnxruntime, and gets a shape profile for the TensorRT build. The chain of
parts is checked against the whole transformer's forward in torch (the split must reproduce it) and with
onnxruntime.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import BuildError, VerificationError
from dtcompile.core.graph import ExportSpec, ShapeProfile, Shapes, TensorSpec
from dtcompile.core.targets import REFERENCE_BACKEND
from dtcompile.models.examples import model_config
from dtcompile.recipe.cache import Segment, plan_segments, summarize_blocks

if TYPE_CHECKING:
    import torch

    from dtcompile.attention.modes import AttentionChoice
    from dtcompile.models.base import CacheLayout
    from dtcompile.recipe import Recipe
    from dtcompile.stages.export import ExportedComponent
    from dtcompile.stages.load import LoadedPipeline

log = logging.getLogger("dtcompile.cache")

#: Relative L2 between the chained torch parts and the transformer's own forward: the same ops in the same
#: order, so anything above rounding noise means the split no longer matches diffusers' forward.
SPLIT_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Part:
    """One graph of the split: its component name, kind, segment (block parts only) and torch module."""

    name: str
    kind: str  # prologue | blocks | epilogue
    segment: Segment | None
    module: Any

    @property
    def blocks(self) -> tuple[str, ...]:
        return self.segment.blocks if self.segment else ()


def part_name(component: str, kind: str, index: int | None = None) -> str:
    """``transformer.prologue``, ``transformer.blocks0``, ``transformer.epilogue``."""
    return f"{component}.{kind}{'' if index is None else index}"


def split_parts(
    transformer: torch.nn.Module, layout: CacheLayout, segments: list[Segment], component: str = "transformer"
) -> list[Part]:
    """The parts of ``transformer`` in execution order: prologue, one per segment, epilogue."""
    parts = [Part(part_name(component, "prologue"), "prologue", None, layout.prologue(transformer))]
    for seg in segments:
        blocks = [transformer.get_submodule(name) for name in seg.blocks]
        parts.append(Part(part_name(component, "blocks", seg.index), "blocks", seg, layout.blocks(blocks)))
    parts.append(Part(part_name(component, "epilogue"), "epilogue", None, layout.epilogue(transformer)))
    return parts


def block_inputs(layout: CacheLayout) -> tuple[str, ...]:
    """What every block part takes (and the prologue returns): the streams, then the shared tensors."""
    return (*layout.streams, *layout.shared)


def prologue_outputs(layout: CacheLayout) -> tuple[str, ...]:
    """What the prologue returns: the block inputs, then what it hands straight to the epilogue (``carried``)."""
    return (*block_inputs(layout), *layout.carried)


def block_outputs(layout: CacheLayout) -> tuple[str, ...]:
    """What every block part returns: ``<stream>_out`` per stream."""
    return tuple(f"{s}_out" for s in layout.streams)


def _feeds_of(part: Part, layout: CacheLayout, state: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """What ``part`` takes: the graph inputs (prologue) or the intermediates in ``state``."""
    if part.kind == "prologue":
        return dict(inputs)
    names = block_inputs(layout) if part.kind == "blocks" else layout.epilogue_inputs
    return {k: state[k] for k in names}


def _advance(part: Part, layout: CacheLayout, state: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The intermediates after ``part`` ran (``output``: the epilogue's result)."""
    if part.kind == "prologue":
        return dict(out)
    if part.kind == "blocks":
        return {**state, **{s: out[f"{s}_out"] for s in layout.streams}}
    return {**state, "output": next(iter(out.values()))}


def run_parts(
    parts: list[Part], layout: CacheLayout, run: Any, inputs: dict[str, Any]
) -> tuple[Any, list[dict[str, Any]]]:
    """Chain the parts: ``run(part, feeds) -> outputs dict``; returns the final output and every part's feeds."""
    all_feeds = []
    state: dict[str, Any] = {}
    for part in parts:
        feeds = _feeds_of(part, layout, state, inputs)
        all_feeds.append(feeds)
        state = _advance(part, layout, state, run(part, feeds))
    return state["output"], all_feeds


def _part_tensor_specs(
    part: Part, layout: CacheLayout, mono: ExportSpec, inter: dict[str, TensorSpec]
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs and outputs of ``part`` (monolithic I/O for the ends, intermediates in between)."""
    if part.kind == "prologue":
        return list(mono.inputs), [inter[k] for k in prologue_outputs(layout)]
    if part.kind == "epilogue":
        return [inter[k] for k in layout.epilogue_inputs], list(mono.outputs)
    outs = [TensorSpec(f"{s}_out", inter[s].dtype, inter[s].dims) for s in layout.streams]
    return [inter[k] for k in block_inputs(layout)], outs


def part_profile(part: Part, layout: CacheLayout, module: Any, mono: ShapeProfile) -> ShapeProfile:
    """TensorRT min/opt/max shapes of a part's inputs, derived from the monolithic profile."""
    if part.kind == "prologue":
        return mono
    names = block_inputs(layout) if part.kind == "blocks" else layout.epilogue_inputs

    def at(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        all_shapes = layout.intermediate_shapes(module, shapes)
        return {k: all_shapes[k] for k in names}

    return ShapeProfile(min=at(mono.min), opt=at(mono.opt), max=at(mono.max))


def _rel_l2_all(got: dict[str, Any], ref: dict[str, Any]) -> float:
    from dtcompile.core.metrics import rel_l2

    return max(rel_l2(got[k], ref[k]) for k in ref)


def _torch_runner(layout: CacheLayout, output_name: str) -> Any:
    """``run(part, feeds) -> outputs dict`` in torch, with the names the part's graph outputs get."""
    import torch

    names = {"prologue": prologue_outputs(layout), "blocks": block_outputs(layout), "epilogue": (output_name,)}

    def run(part: Part, feeds: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            out = part.module(*feeds.values())
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(names[part.kind], out, strict=True))

    return run


def export_split(
    loaded: LoadedPipeline,
    recipe: Recipe,
    artifact_dir: Path,
    *,
    attention: AttentionChoice,
    component: str | None = None,
) -> tuple[dict[str, Any], list[tuple[str, ExportedComponent]]]:
    """Export every part of the adapter's component of ``loaded`` (or of another denoiser, ``component``: Wan2.2's
    ``transformer_2``) into ``artifact_dir/onnx`` and check them.

    Returns the component's manifest entry (config, overall I/O, the cache spec and segments, the part
    names in execution order, parity of the chain; no engines of its own) and ``(name, ExportedComponent)``
    per part, in execution order, for the build stage; the parts are named ``<component>.<part>`` and list the
    component as ``part_of``. ``attention`` is the caller's ``resolve_attention(recipe, targets)``;
    export.attention applies to every part (docs/attention.md). Raises as ``export_parts``, and RecipeError when
    a cache pattern matches no block (checked again here for sources the dry run could not read).
    """
    from dtcompile.models.base import component_view
    from dtcompile.stages.shapes import shapes_from_recipe

    if recipe.cache is None:
        raise BuildError("export_split needs a recipe with a cache section")
    adapter = component_view(loaded.adapter, component)
    module = getattr(loaded.pipe, adapter.component).eval()
    segments = plan_segments(recipe.cache, adapter.block_names(dict(module.config)))
    main, exported = export_parts(
        module,
        adapter,
        loaded.pipe_config,
        shapes_from_recipe(recipe.export.shapes),
        recipe.dtype,
        recipe.export.opset,
        segments,
        artifact_dir,
        check_onnxruntime="onnxruntime" in recipe.engine.backends,
        attention=attention.mode,
        cache_mode=recipe.cache.mode,
    )
    main["attention"] = attention.to_json()
    main["cache"] = {"spec": recipe.cache.model_dump(mode="json"), "segments": [s.to_json() for s in segments]}
    if recipe.cache.mode == "teacache":
        main["cache"]["teacache"] = teacache_entry(recipe.cache, adapter, dict(module.config))
    return main, exported


def teacache_entry(spec: Any, adapter: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's TeaCache record of a denoiser: the prologue output measured and the rescaling polynomial
    (the recipe's, else the family's published one, ``ModelAdapter.teacache_coefficients``) with its source."""
    if spec.coefficients is not None:
        coefficients, source = list(spec.coefficients), "recipe"
    else:
        coefficients, source = adapter.teacache_coefficients(config)
    return {"signal": adapter.cache_layout("teacache").teacache_signal, "coefficients": coefficients, "source": source}


def _torch_chain(
    module: torch.nn.Module, adapter: Any, mono: ExportSpec, parts: list[Part], layout: CacheLayout, torch_run: Any
) -> tuple[Any, list[dict[str, Any]], float]:
    """(reference output, each part's example feeds, rel L2 of the chain): the parts chained in torch on the
    whole component's example inputs; BuildError unless they reproduce its forward."""
    import torch

    from dtcompile.core.metrics import rel_l2

    with torch.no_grad():
        reference = adapter.export_module(module)(*mono.example_inputs.values())
    chained, part_feeds = run_parts(parts, layout, torch_run, dict(mono.example_inputs))
    split_err = rel_l2(chained, reference)
    if not split_err <= SPLIT_TOL:
        raise BuildError(
            f"the {len(parts)} cache parts chained in torch differ from {type(module).__name__}.forward by rel L2 "
            f"{split_err:.2e} > {SPLIT_TOL:.0e}; this diffusers version's forward is not what dtcompile.stages.cache_split "
            "reproduces: remove the cache section or pin diffusers"
        )
    return reference, part_feeds, split_err


def _check_part_onnxruntime(
    path: Path,
    part: Part,
    layout: CacheLayout,
    example: dict[str, Any],
    mono: ExportSpec,
    torch_run: Any,
    tol: float,
    entry: dict[str, Any],
    ort_state: dict[str, Any],
) -> dict[str, Any]:
    """Part ``path`` in onnxruntime against torch on its example (``entry``'s parity record; VerificationError
    beyond ``tol``), listed as ``entry``'s onnxruntime engine; returns the onnxruntime chain's state advanced
    through it."""
    from dtcompile.backends.onnxruntime import OrtRunner

    runner = OrtRunner(path, optimization="basic")
    ref = torch_run(part, example)
    got = runner(example)
    err = _rel_l2_all(got, ref)
    entry["parity"] = {
        "rel_l2": err,
        "max_abs": max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref),
        "tolerance": tol,
    }
    log.info("parity %s onnxruntime vs torch: rel L2 %.2e", part.name, err)
    if not err <= tol:
        raise VerificationError(
            f"{path}: onnxruntime output differs from torch by rel L2 {err:.2e} > {tol:.0e}; "
            "the export of this part is wrong (not a precision issue)"
        )
    feeds_ort = _feeds_of(part, layout, ort_state, dict(mono.example_inputs))
    ort_state = _advance(part, layout, ort_state, runner(feeds_ort))
    del runner
    onnx_entry = entry["onnx"]
    entry["engines"].append(
        {"backend": REFERENCE_BACKEND, "arch": "any", **{k: onnx_entry[k] for k in ("file", "sha256", "size")}}
    )
    return ort_state


def export_parts(
    module: torch.nn.Module,
    adapter: Any,
    pipe_config: dict[str, Any],
    shapes: Shapes,
    dtype_name: str,
    opset: int,
    segments: list[Segment],
    artifact_dir: Path,
    *,
    check_onnxruntime: bool = True,
    attention: str = "decomposed",
    cache_mode: str | None = None,
) -> tuple[dict[str, Any], list[tuple[str, ExportedComponent]]]:
    """Split ``module`` at ``segments``, export each part into ``artifact_dir/onnx`` and check the chain.

    ``attention`` is the export.attention mode each part is exported with (``dtcompile.attention``);
    ``cache_mode`` the recipe's (teacache: the prologue also returns the layout's TeaCache signal). Returns the
    main entry (config, overall I/O, profile, part names, chain parity) and the parts in order.

    Raises:
        BuildError: the chained torch parts do not reproduce the transformer's forward.
        VerificationError: onnxruntime differs from torch beyond the dtype's tolerance for a part or the chain.
    """

    from dtcompile.attention.router import export_attention
    from dtcompile.core.dtypes import torch_dtype
    from dtcompile.core.metrics import rel_l2
    from dtcompile.core.progress import progress
    from dtcompile.export.onnx import export_onnx
    from dtcompile.stages.export import PARITY_TOL, ExportedComponent, adapter_patches

    comp = adapter.component
    config = dict(model_config(module))
    mono = adapter.export_spec(module, pipe_config, shapes, torch_dtype(dtype_name))
    mono = dataclasses.replace(mono, opset=opset)
    mono_profile = adapter.shape_profile(module, pipe_config, shapes)
    layout = adapter.cache_layout(cache_mode)
    inter = layout.intermediate_specs(module, mono, dtype_name)
    parts = split_parts(module, layout, segments, comp)
    torch_run = _torch_runner(layout, mono.output_names[0])
    tol = PARITY_TOL[dtype_name]
    patches = adapter_patches(adapter)

    # The chain in torch gives every part its example inputs and must reproduce the whole forward.
    reference, part_feeds, split_err = _torch_chain(module, adapter, mono, parts, layout, torch_run)

    exported: list[tuple[str, ExportedComponent]] = []
    ort_state: dict[str, Any] = {}  # the chain run with onnxruntime, one session alive at a time (memory)
    for part, feeds in zip(parts, part_feeds, strict=True):
        inputs, outputs = _part_tensor_specs(part, layout, mono, inter)
        example = {t.name: feeds[t.name] for t in inputs if t.name in feeds}
        spec = ExportSpec(inputs=inputs, outputs=outputs, example_inputs=example, opset=opset)
        with (
            progress(f"export {part.name}", None, "phase", heartbeat=True) as bar,
            export_attention(attention) as trace,
        ):
            art = export_onnx(part.module, spec, artifact_dir / "onnx", name=part.name, patches=patches, progress=bar)
        profile = part_profile(part, layout, module, mono_profile)
        entry: dict[str, Any] = {
            "part_of": comp,
            "kind": part.kind,
            "blocks": list(part.blocks),
            **({"segment": part.segment.to_json()} if part.segment else {}),
            **art.to_manifest(artifact_dir),
            "profile": profile.to_json(),
            "attention": trace.check_graph(
                art.op_types, f"{type(module).__name__} {part.name}" if part.kind == "blocks" else None
            ),
            "engines": [],
        }
        if check_onnxruntime:
            ort_state = _check_part_onnxruntime(art.path, part, layout, example, mono, torch_run, tol, entry, ort_state)
        exported.append((part.name, ExportedComponent(art.path, profile, entry)))
        log.info("cache part %s: %s", part.name, summarize_blocks(part.blocks) if part.blocks else part.kind)

    main: dict[str, Any] = {
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "inputs": exported[0][1].manifest["inputs"],
        "outputs": exported[-1][1].manifest["outputs"],
        "profile": mono_profile.to_json(),
        "engines": [],
        "parts": [name for name, _ in exported],
    }
    if check_onnxruntime:
        got = ort_state["output"]
        err = rel_l2(got, reference)
        main["parity"] = {
            "rel_l2": err,
            "max_abs": float((got.double() - reference.double()).abs().max()),
            "tolerance": tol,
            "split_rel_l2": split_err,
            "inputs": {k: list(v.shape) for k, v in mono.example_inputs.items()},
        }
        log.info("parity chained parts (onnxruntime) vs torch transformer: rel L2 %.2e", err)
        if not err <= tol:
            raise VerificationError(
                f"the chained onnxruntime parts differ from the torch transformer by rel L2 {err:.2e} > {tol:.0e}"
            )
    return main, exported
