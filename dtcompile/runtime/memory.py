"""The memory plan of an artifact on a device: per component, its weights, its activation workspace and what the
residency policy keeps resident; with a device-memory budget, the residency that fits and each streamable engine's
weight-streaming budget (``dtc inspect --memory``, ``dtc run/serve --device-memory``, ``load_pipeline(...,
device_memory=...)``).

Input: a ``Manifest``, the backend the run selects, a budget in bytes (or None). Output: a frozen ``MemoryPlan``,
or one ``UnsupportedError`` line naming the component the budget cannot hold.

Where the figures come from:

- weights: the engine entry's ``weights_size`` (the graph's initializer bytes, recorded for streamable builds),
  else the size of the component's ONNX graph and its external data (initializers dominate it), else the engine
  file's (a TensorRT-RTX engine file also holds kernels, so it overstates the weights).
- workspace: the engine entry's ``device_memory_size`` where a build on a GPU recorded it, else an estimate from
  the profile: shape inference of the component's graph at the profile's max shapes (onnxruntime's symbolic
  inference, else ONNX's), then 3 x the largest
  intermediate tensor (an operator's input, its output and one temporary alive at once). Labelled ``estimate``.
- streamable: built with ``engine.weight_streaming`` (TensorRT only). How much of an engine can stream
  (``ICudaEngine.streamable_weights_size``) is known only once it is deserialised, on a GPU: the plan treats
  all of its weights as streamable and TensorRT keeps what cannot stream resident within the budget it is given.

The policy: ``all`` keeps every component resident at once (need: the sum), ``sequential`` one at a time (need:
the largest). Without an explicit residency, a budget picks ``all`` when everything fits, else ``sequential``.
A component that does not fit alone gets a streaming budget (the budget minus its workspace) when it streams;
otherwise the budget is refused, naming it.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import UnsupportedError
from dtcompile.manifest import artifact_path
from dtcompile.runtime.residency import Residency, check_residency

if TYPE_CHECKING:
    from dtcompile.manifest import EngineEntry, Manifest

log = logging.getLogger("dtcompile.run")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip

#: Backends whose engines can stream weights from host memory (and so take a device-memory budget).
STREAMING_BACKENDS = ("tensorrt", "tensorrt-rtx")


def parse_size(value: str | int, flag: str = "--device-memory") -> int:
    """Bytes of ``16GiB``, ``16G`` (binary), ``16000MB`` (decimal), ``512MiB`` or a plain byte count;
    UnsupportedError naming ``flag`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise UnsupportedError(f"{flag} {value!r}: expected a size such as 16GiB, 12G, 8000MB or 512MiB")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise UnsupportedError(f"{flag} {value!r}: expected a size above 0")
    return n


def format_size(n: int | None) -> str:
    """``n`` bytes as MiB or GiB (``-`` for None)."""
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class ComponentMemory:
    """One component's device memory: ``weights`` and ``workspace`` in bytes, where the workspace figure comes
    from (``engine`` or ``estimate``), whether its engine streams weights, and the streaming ``budget`` the plan
    gave it (None: all of its weights resident)."""

    name: str
    backend: str
    weights: int
    workspace: int
    workspace_source: str
    streamable: bool
    budget: int | None = None

    @property
    def need(self) -> int:
        """Bytes resident while it runs: its weights (or streaming budget) and its workspace."""
        return (self.weights if self.budget is None else self.budget) + self.workspace

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "weights": self.weights, "workspace": self.workspace,
                "workspace_source": self.workspace_source, "streamable": self.streamable, "budget": self.budget,
                "need": self.need}  # fmt: skip


@dataclass(frozen=True)
class MemoryPlan:
    """What a run keeps resident: the residency, the device-memory budget (None: none given) and each component."""

    residency: str
    budget: int | None
    components: tuple[ComponentMemory, ...]

    @property
    def peak(self) -> int:
        """Bytes resident at the worst moment: the sum under ``all``, the largest component under ``sequential``."""
        needs = [c.need for c in self.components]
        return sum(needs) if self.residency == "all" else max(needs, default=0)

    @property
    def budgets(self) -> dict[str, int]:
        """Component -> weight-streaming budget, for the components the plan streams."""
        return {c.name: c.budget for c in self.components if c.budget is not None}

    def to_json(self) -> dict[str, Any]:
        return {"residency": self.residency, "budget": self.budget, "peak": self.peak,
                "components": [c.to_json() for c in self.components]}  # fmt: skip

    def lines(self) -> list[str]:
        """The plan as a table for ``dtc inspect --memory``."""
        rows = [f"{'component':<18} {'backend':<13} {'weights':>11} {'workspace':>11} {'source':<9} "
                f"{'streams':<8} {'resident while it runs':>22}"]  # fmt: skip
        for c in self.components:
            held = format_size(c.need) + (f" (streams, budget {format_size(c.budget)})" if c.budget else "")
            rows.append(f"{c.name:<18} {c.backend:<13} {format_size(c.weights):>11} {format_size(c.workspace):>11} "
                        f"{c.workspace_source:<9} {'yes' if c.streamable else 'no':<8} {held:>22}")  # fmt: skip
        what = "every component at once" if self.residency == "all" else "one component at a time"
        budget = f" of a {format_size(self.budget)} budget" if self.budget else ""
        rows.append(f"residency {self.residency} ({what}): peak {format_size(self.peak)}{budget}")
        return rows


def component_memory(artifact_dir: Path, manifest: Manifest, name: str, entry: EngineEntry) -> ComponentMemory:
    """``name``'s weights and workspace as ``entry`` (the engine the run selects) records or estimates them."""
    centry = manifest.component(name)
    weights = entry.weights_size
    if weights is None:  # the graph's files (initializers dominate them), else the engine file
        onnx_entry = centry.onnx
        weights = entry.size if onnx_entry is None else onnx_entry.size + sum(x.size for x in onnx_entry.external_data)
    if entry.device_memory_size is not None:
        workspace, source = entry.device_memory_size, "engine"
    else:
        ranges = centry.profile or entry.profile or {}
        profile = {k: v["max"] for k, v in ranges.items() if isinstance(v, dict) and "max" in v}
        onnx = centry.onnx.file if centry.onnx is not None else None
        workspace = activation_estimate(str(artifact_path(artifact_dir, onnx)), _key(profile)) if onnx else 0
        source = "estimate"
    return ComponentMemory(name, entry.backend, int(weights), int(workspace), source, bool(entry.weight_streaming))


def _key(profile: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((k, tuple(int(d) for d in v)) for k, v in profile.items()))


def _infer_shapes(model: Any) -> Any:
    """onnxruntime's symbolic shape inference (it resolves the Reshape targets a transformer computes), else
    ONNX's own; None when neither runs on the graph."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # not installed, or an op it does not know: ONNX's inference
        pass
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference gives up on some custom ops: no estimate rather than a wrong one
        return None


@functools.lru_cache(maxsize=64)
def activation_estimate(onnx_path: str, max_shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> int:
    """3 x the largest intermediate tensor of the graph at ``max_shapes`` (shape inference, ``_infer_shapes``; the
    weights are not read). 0 when onnx is missing or inference resolves no shape."""
    try:
        import onnx
    except ImportError:
        return 0
    try:
        model = onnx.load(onnx_path, load_external_data=False)
    except Exception:  # an unreadable graph: the run's own checks report it
        return 0
    # weights carry no shapes inference needs: as typed graph inputs, their data is never read (small ones, which
    # may be Reshape targets, stay)
    kept = []
    for init in model.graph.initializer:
        if len(init.raw_data) > 4096 or init.data_location == onnx.TensorProto.EXTERNAL:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    shapes = dict(max_shapes)
    for inp in model.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name], strict=False):
                d.ClearField("dim_param")
                d.dim_value = v
    inferred = _infer_shapes(model)
    if inferred is None:
        return 0
    itemsize = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4}  # fmt: skip
    largest = 0
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if dims and all(dims):
            n = itemsize.get(t.elem_type, 1)
            for d in dims:
                n *= d
            largest = max(largest, n)
    return 3 * largest


def plan_memory(
    artifact_dir: Path,
    manifest: Manifest,
    entries: dict[str, EngineEntry],
    *,
    residency: str | None = None,
    budget: int | None = None,
    flag: str = "--device-memory",
) -> MemoryPlan:
    """The plan for the engines ``entries`` (component -> the entry a run selects): see the module docstring.

    ``residency`` None: chosen from ``budget`` (``all`` without one). A budget on onnxruntime engines, or one a
    component cannot fit in even alone (and that cannot stream), is an UnsupportedError naming it.
    """
    if residency is not None:
        check_residency(residency)
    comps = [component_memory(artifact_dir, manifest, n, e) for n, e in entries.items()]
    if budget is None:
        return MemoryPlan(residency or "all", None, tuple(comps))
    cpu = [c.name for c in comps if c.backend not in STREAMING_BACKENDS]
    if cpu:
        raise UnsupportedError(
            f"{flag}: onnxruntime runs {', '.join(cpu)} here and has no device-memory budget or weight streaming; "
            "drop the flag or run TensorRT engines (--backend tensorrt-rtx)"
        )
    if residency is None:
        residency = "all" if sum(c.need for c in comps) <= budget else "sequential"
    if residency == "all":
        return _fit_all(tuple(comps), budget, flag)
    return MemoryPlan("sequential", budget, tuple(_fit_alone(c, budget, flag) for c in comps))


def _fit_alone(c: ComponentMemory, budget: int, flag: str) -> ComponentMemory:
    if c.need <= budget:
        return c
    if not c.streamable:
        raise UnsupportedError(
            f"{flag} {format_size(budget)}: component {c.name} needs {format_size(c.need)} resident (weights "
            f"{format_size(c.weights)} + workspace {format_size(c.workspace)}) and its engine cannot stream weights; "
            "give a larger budget or rebuild it with engine.weight_streaming: true"
        )
    room = budget - c.workspace
    if room <= 0:
        raise UnsupportedError(
            f"{flag} {format_size(budget)}: component {c.name}'s workspace alone is {format_size(c.workspace)}; "
            "give a larger budget"
        )
    return replace(c, budget=room)


def _fit_all(comps: tuple[ComponentMemory, ...], budget: int, flag: str) -> MemoryPlan:
    """Every component resident: the streamable ones share what the others and every workspace leave, in
    proportion to their weights."""
    if sum(c.need for c in comps) <= budget:
        return MemoryPlan("all", budget, comps)
    fixed = sum(c.need for c in comps if not c.streamable) + sum(c.workspace for c in comps if c.streamable)
    streaming = [c for c in comps if c.streamable]
    room = budget - fixed
    if not streaming or room <= 0:
        held = {c.name: c.workspace if c.streamable else c.need for c in comps}
        largest = max(held, key=lambda n: held[n])
        raise UnsupportedError(
            f"{flag} {format_size(budget)}: with --residency all, {format_size(fixed)} cannot stream (workspaces and "
            f"non-streamable weights; the largest: component {largest}, {format_size(held[largest])}); give a larger "
            "budget, use --residency sequential or rebuild with engine.weight_streaming: true"
        )
    total = sum(c.weights for c in streaming)
    share = {c.name: room * c.weights // total for c in streaming}
    return MemoryPlan("all", budget, tuple(replace(c, budget=share[c.name]) if c.streamable else c for c in comps))


def session_residency(
    artifact_dir: Path,
    manifest: Manifest,
    backend: str,
    residency: str | None,
    device_memory: str | int | None,
    *,
    flag: str = "--device-memory",
) -> tuple[Residency, MemoryPlan | None]:
    """A ``Session``'s ``Residency`` (and, with a budget, the plan behind it): ``residency`` as asked, else chosen
    from ``device_memory`` (``all`` without one); weight-streaming budgets from the plan."""
    from dtcompile.core.targets import gpu_arch
    from dtcompile.runtime.engines import select_engine

    if residency is not None:
        check_residency(residency, "--residency" if flag.startswith("--") else "residency")
    if residency == "sequential":
        split = [n for n in manifest.component_names() if manifest.component(n).is_split]
        if split:
            raise UnsupportedError(
                f"--residency sequential: {manifest.name}'s {split[0]} is split into block engines (cache), which "
                "stay resident; use --residency all or build without the cache section"
            )
    if device_memory is None:
        return Residency(residency or "all"), None
    budget = parse_size(device_memory, flag)
    gpu = gpu_arch()
    entries = {n: select_engine(manifest, n, backend, gpu) for n in manifest.component_names()}
    plan = plan_memory(artifact_dir, manifest, entries, residency=residency, budget=budget, flag=flag)
    log.info("memory plan: %s", "; ".join(plan.lines()[1:]))
    return Residency(plan.residency, plan.budgets), plan


def planned_entries(manifest: Manifest, backend: str = "auto", arch: str | None = None) -> dict[str, EngineEntry]:
    """Component -> the engine a plan is for: the one a run on this machine selects (``runtime.engines``), or, with
    ``arch``, the ``backend`` engine built for that arch (auto: the first TensorRT flavour built for it), so that a
    plan for another machine's GPU can be made here. ArtifactError naming what the artifact has otherwise."""
    from dtcompile.core.errors import ArtifactError
    from dtcompile.core.targets import gpu_arch
    from dtcompile.runtime.engines import select_engine

    names = manifest.component_names()
    if arch is None:
        gpu = gpu_arch()
        return {n: select_engine(manifest, n, backend, gpu) for n in names}
    out = {}
    for n in names:
        engines = manifest.component(n).engines
        match = [e for e in engines if e.arch == arch and (backend == "auto" or e.backend == backend)]
        if not match:
            have = ", ".join(sorted({e.target for e in engines})) or "none"
            raise ArtifactError(f"--arch {arch}: {manifest.name}'s {n} has no engine for it (it has: {have})")
        out[n] = match[0]
    return out
