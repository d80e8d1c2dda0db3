"""Runtime for cached artifacts: the part engines stitched into one module that skips cached block segments.

Input: an artifact whose denoisers were split (``components[comp]["parts"]``, see ``dtcompile.stages.cache_split``;
Wan2.2: both experts). Output: one ``CachedEngineModule`` per split denoiser, a stand-in with the same call
interface as ``dtcompile.backends.standin.EngineModule``. Each call (one denoising step of one ``cache_context``)
runs the prologue, then every block segment, then the epilogue; a segment that is cached on this step is not run:
its input plus the residual it produced on the last step it ran (output - input, for both streams) stands in for
its output.

- static mode: a segment of group G is cached on the steps G's rule names.
- first_block mode: the first block always runs; the rest is skipped when the relative L1 change of the first
  block's first-stream residual since the last full step is below ``threshold`` (at most
  ``max_consecutive_skips`` steps in a row); its residual is the rest's output minus its input at that step.
- teacache mode (TeaCache, ali-vilab/TeaCache): decided before any block runs, from the prologue's signal output
  (the manifest's ``cache.teacache.signal``): its relative L1 change since the previous call, rescaled by the
  polynomial ``cache.teacache.coefficients`` (clamped at 0: an estimated change is never negative), is
  accumulated; while the sum stays below ``threshold`` every block is skipped (the cached residual of all
  blocks added), else they run and the sum restarts. The first ``retention`` steps and the run's last step
  always run. ``TeaCacheFit`` collects (signal change, output change) pairs for ``dtc cache fit``.

The experts of one pipeline share a ``CacheRun``: steps are the pipeline's, counted per ``cache_context`` (e.g.
"cond"/"uncond") over every expert's calls, so static rules name the same steps whichever expert runs them. Cache
state (residuals, the first-block reference) is kept per expert and context and is dropped when the context's
previous call was another expert's: the first call after a switch computes every block. ``begin_run(num_steps)``
on any of them starts a run for all; ``cache_stats()`` reports block evaluations done and skipped over the run
(and, for first_block, each call's change), in total and per expert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtcompile.backends.standin import ComponentStandIn
from dtcompile.core.errors import ArtifactError
from dtcompile.core.metrics import rel_l1
from dtcompile.core.targets import REFERENCE_BACKEND
from dtcompile.manifest import EngineEntry, Manifest, Verifier
from dtcompile.recipe.cache import CacheSpec, Segment
from dtcompile.runtime.engines import select_engine

log = logging.getLogger("dtcompile.cache")

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
Streams = tuple[torch.Tensor, ...]


@dataclass
class _Branch:
    """One expert's cache state in one ``cache_context``: residuals per segment and the first-block reference."""

    residuals: dict[int, Streams] = field(default_factory=dict)
    first_residual: torch.Tensor | None = None
    consecutive: int = 0
    signal: torch.Tensor | None = None  # teacache: the previous call's signal
    accumulated: float = 0.0  # teacache: rescaled change since the last computed call


@dataclass(frozen=True)
class _Call:
    """One call of an expert, for the run report."""

    expert: str
    context: str
    step: int
    skipped: int
    change: float | None


class CacheRun:
    """What the experts standing in for a pipeline's denoisers share in one run: the pipeline step per
    ``cache_context``, each expert's ``_Branch`` per context, and the log of calls (in call order)."""

    def __init__(self) -> None:
        self.num_steps: int | None = None
        self.blocks_per_call: dict[str, int] = {}  # expert -> blocks it runs per uncached call
        self._reset()

    def _reset(self) -> None:
        self.steps: dict[str, int] = {}  # context -> pipeline step of its next call
        self.last_timestep: dict[str, float] = {}
        self.last_expert: dict[str, str] = {}
        self.branches: dict[tuple[str, str], _Branch] = {}
        self.calls: list[_Call] = []

    def begin(self, num_steps: int) -> None:
        """Start a run of ``num_steps`` pipeline steps: clear every expert's state and the log."""
        self.num_steps = num_steps
        self._reset()

    def enter(self, expert: str, context: str, timestep: torch.Tensor) -> tuple[int, _Branch]:
        """The pipeline step of ``expert``'s call in ``context`` and its state there (fresh at a new run or
        after another expert's call in this context)."""
        step = self.steps.get(context, 0)
        if self.num_steps is None:
            # No begin: a rising timestep means the pipeline started a new run (flow-matching schedules fall).
            t = float(timestep.detach().flatten()[0])
            new_run = context in self.last_timestep and t > self.last_timestep[context]
            self.last_timestep[context] = t
        else:
            new_run = step >= self.num_steps  # the next run of the same length
        if new_run:
            step = 0
            self.last_expert.pop(context, None)
            self.branches = {k: v for k, v in self.branches.items() if k[1] != context}
        if self.last_expert.get(context) != expert:  # a switch: never reuse what this expert held before it
            self.branches.pop((expert, context), None)
        self.last_expert[context] = expert
        return step, self.branches.setdefault((expert, context), _Branch())

    def record(self, call: _Call) -> None:
        """Log a finished call; its context moves on to the next step."""
        self.calls.append(call)
        self.steps[call.context] = call.step + 1

    def stats(self, expert: str | None = None) -> dict[str, Any]:
        """Block evaluations done and skipped over the run's calls (``expert``: that expert's calls only);
        call indices count every expert's calls in order."""
        calls = [(i, c) for i, c in enumerate(self.calls) if expert is None or c.expert == expert]
        skipped = sum(c.skipped for _, c in calls)
        total = sum(self.blocks_per_call[c.expert] for _, c in calls)
        return {
            "calls": [i for i, _ in calls],
            "steps": sorted({c.step for _, c in calls}),
            "blocks_evaluated": total - skipped,
            "blocks_skipped": skipped,
            "skipped_fraction": skipped / total if total else 0.0,
            "skipped_per_call": [c.skipped for _, c in calls],
            "cached_calls": [i for i, c in calls if c.skipped],
            "rel_change": [c.change for _, c in calls],
        }


class CachedEngineModule(ComponentStandIn):
    """Stands in for ``pipe.transformer`` (or another expert: ``name``): runs prologue, block segments and
    epilogue, skipping cached segments.

    ``runners`` maps part names to callables (feeds -> outputs); ``parts`` are the manifest's part entries in
    execution order (``kind``, ``segment``). ``streams`` are the tensors each block updates (it returns
    ``<stream>_out``; the first is the one first_block mode measures), ``shared`` the prologue's other outputs,
    ``epilogue_inputs`` what the epilogue reads (``dtcompile.models.base.CacheLayout``).
    ``enabled=False`` runs every block (``dtc run --cache off``). ``run``: the ``CacheRun`` shared with the
    pipeline's other experts (None: a run of its own).
    """

    def __init__(
        self,
        runners: dict[str, Runner],
        parts: list[tuple[str, str, Segment | None]],
        spec: CacheSpec,
        config: dict[str, Any],
        input_names: list[str],
        output_name: str,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        *,
        streams: tuple[str, ...],
        shared: tuple[str, ...],
        epilogue_inputs: tuple[str, ...],
        enabled: bool = True,
        name: str = "transformer",
        run: CacheRun | None = None,
        teacache: dict[str, Any] | None = None,
        threshold: float | None = None,
    ) -> None:
        super().__init__(config, input_names, output_name, dtype, device)
        self.teacache = teacache  # the manifest's cache.teacache: signal, coefficients, source
        self.threshold = spec.threshold if threshold is None else threshold
        self.fit: TeaCacheFit | None = None  # set by dtc cache fit: records every call's changes
        self.runners = runners
        self.streams, self.shared, self.epilogue_inputs = streams, shared, epilogue_inputs
        self.prologue = next(part for part, kind, _ in parts if kind == "prologue")
        self.epilogue = next(part for part, kind, _ in parts if kind == "epilogue")
        self.segments: list[tuple[str, Segment]] = [(part, seg) for part, kind, seg in parts if seg is not None]
        self.spec = spec
        self.groups = {g.name: g for g in spec.groups or []}
        self.enabled = enabled
        self.name = name
        self._context_name = "default"
        self.blocks_per_call = sum(len(seg.blocks) for _, seg in self.segments)
        self.run = run if run is not None else CacheRun()
        if name in self.run.blocks_per_call:
            raise ValueError(f"expert {name!r} is already part of this cache run")
        self.run.blocks_per_call[name] = self.blocks_per_call

    @property
    def num_steps(self) -> int | None:
        """The run's length (set by ``begin_run``)."""
        return self.run.num_steps

    @property
    def calls(self) -> int:
        """This expert's calls in the current run."""
        return sum(c.expert == self.name for c in self.run.calls)

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Pipelines wrap their conditional and unconditional calls in contexts; each keeps its own cache."""
        previous, self._context_name = self._context_name, name
        try:
            yield
        finally:
            self._context_name = previous

    def begin_run(self, num_steps: int) -> None:
        """Start a run of ``num_steps`` steps for every expert sharing this run: check the static rules against
        it, clear caches and counters."""
        if self.enabled:
            self.spec.check_run_steps(num_steps)
            if self.spec.steps is not None and self.spec.steps != num_steps:
                log.warning("cache rules are written for %d steps; this run has %d", self.spec.steps, num_steps)
        self.run.begin(num_steps)

    def cache_stats(self) -> dict[str, Any]:
        """Counters of the current run over every expert sharing it: block evaluations done and skipped, per call,
        the rule settings, and the same per expert (``experts``: each one's calls, pipeline steps, skips and,
        for first_block, changes)."""
        total = self.run.stats()
        stats: dict[str, Any] = {
            "mode": self.spec.mode if self.enabled else "off",
            "calls": len(total["calls"]),
            "blocks_per_call": self.blocks_per_call,
            **{k: total[k] for k in ("blocks_evaluated", "blocks_skipped", "skipped_fraction")},
            **{k: total[k] for k in ("skipped_per_call", "cached_calls")},
            "experts": {name: self.run.stats(name) for name in self.run.blocks_per_call},
        }
        if self.spec.mode == "first_block":
            stats["threshold"] = self.threshold
            stats["max_consecutive_skips"] = self.spec.max_consecutive_skips
            stats["rel_change"] = total["rel_change"]
        elif self.spec.mode == "teacache":
            stats["threshold"] = self.threshold
            stats["retention"] = self.spec.retention or 1
            stats["coefficients"] = (self.teacache or {}).get("coefficients")
            stats["rel_change"] = total["rel_change"]
        else:
            stats["groups"] = {g.name: g.describe() for g in self.groups.values()}
            for expert in stats["experts"].values():
                del expert["rel_change"]
        return stats

    def forward(self, return_dict: bool = True, joint_attention_kwargs: Any = None, **kwargs: Any) -> Any:
        feeds = self.graph_feeds(kwargs, joint_attention_kwargs)
        context = self._context_name
        step, branch = self.run.enter(self.name, context, feeds["timestep"])
        pro = self.runners[self.prologue](feeds)
        shared = {k: pro[k] for k in self.shared}
        streams = tuple(pro[k] for k in self.streams)
        change = None
        if self.enabled and self.spec.mode == "first_block":
            streams, skipped, change = self._first_block(branch, streams, shared)
        elif self.enabled and self.spec.mode == "teacache":
            streams, skipped, change = self._teacache(branch, step, streams, shared, pro[self._signal_name()])
        else:
            streams, skipped = self._static(branch, step, streams, shared)
        state = {**pro, **dict(zip(self.streams, streams, strict=True))}  # prologue outputs, updated streams
        out = self.runners[self.epilogue]({k: state[k] for k in self.epilogue_inputs})[self.output_name]
        out = self.check_finite(out.to(self._device, self._dtype), step, step + 1)
        if self.fit is not None:
            self.fit.observe(self.name, context, step, pro[self._signal_name()], out)
        self.run.record(_Call(self.name, context, step, skipped, change))
        if self.trace is not None:
            self.trace.append(out.detach().clone())
        return (out,) if not return_dict else {"sample": out}

    def _run(self, name: str, streams: Streams, shared: dict[str, torch.Tensor]) -> Streams:
        out = self.runners[name]({**dict(zip(self.streams, streams, strict=True)), **shared})
        return tuple(out[f"{k}_out"] for k in self.streams)

    def _static(
        self, branch: _Branch, step: int, streams: Streams, shared: dict[str, torch.Tensor]
    ) -> tuple[Streams, int]:
        skipped = 0
        for name, seg in self.segments:
            group = self.groups.get(seg.group) if self.enabled and seg.group else None
            cached = branch.residuals.get(seg.index)
            if group and group.cached_at(step) and cached and cached[0].shape == streams[0].shape:
                streams = _plus(streams, cached)
                skipped += len(seg.blocks)
                continue
            new = self._run(name, streams, shared)
            if group:
                branch.residuals[seg.index] = _minus(new, streams)
            streams = new
        return streams, skipped

    def _first_block(
        self, branch: _Branch, streams: Streams, shared: dict[str, torch.Tensor]
    ) -> tuple[Streams, int, float | None]:
        (first_name, _), rest = self.segments[0], self.segments[1:]
        new = self._run(first_name, streams, shared)
        residual = new[0] - streams[0]
        streams = new
        change = None
        if branch.first_residual is not None and branch.first_residual.shape == residual.shape:
            change = rel_l1(residual, branch.first_residual)
        cached = branch.residuals.get(1)
        threshold = self.spec.threshold or 0.0
        if (
            change is not None
            and change < threshold
            and branch.consecutive < (self.spec.max_consecutive_skips or 0)
            and cached
        ):
            branch.consecutive += 1
            return _plus(streams, cached), sum(len(seg.blocks) for _, seg in rest), change
        start = streams
        for name, _ in rest:
            streams = self._run(name, streams, shared)
        branch.residuals[1] = _minus(streams, start)
        branch.first_residual = residual
        branch.consecutive = 0
        return streams, 0, change

    def _signal_name(self) -> str:
        if not self.teacache:
            raise ArtifactError(f"{self.name}: the artifact records no TeaCache signal (built with another cache mode)")
        return str(self.teacache["signal"])

    def _teacache(
        self, branch: _Branch, step: int, streams: Streams, shared: dict[str, torch.Tensor], signal: torch.Tensor
    ) -> tuple[Streams, int, float | None]:
        change = None
        if branch.signal is not None and branch.signal.shape == signal.shape:
            change = rel_l1(signal, branch.signal)
        branch.signal = signal.detach()
        cached = branch.residuals.get(0)
        last = self.run.num_steps is not None and step >= self.run.num_steps - 1
        retention = 1 if self.spec.retention is None else self.spec.retention
        skip = False
        if change is None or step < retention or last or not cached or cached[0].shape != streams[0].shape:
            branch.accumulated = 0.0
        else:
            branch.accumulated += max(rescale(self.teacache["coefficients"], change), 0.0)  # type: ignore[index]
            skip = branch.accumulated < (self.threshold or 0.0)
            if not skip:
                branch.accumulated = 0.0
        if skip:
            assert cached is not None
            return _plus(streams, cached), self.blocks_per_call, change
        start = streams
        for name, _ in self.segments:
            streams = self._run(name, streams, shared)
        branch.residuals[0] = _minus(streams, start)
        return streams, 0, change


def rescale(coefficients: list[float], x: float) -> float:
    """The polynomial ``coefficients`` (highest power first, as numpy.poly1d) at ``x`` (Horner)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


class TeaCacheFit:
    """(signal change, output change) per call, per expert, over full runs: what ``dtc cache fit`` fits
    TeaCache's polynomial to, as TeaCache's authors fit theirs (relative L1 of the signal and of the model output
    against the same branch's previous call)."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[float, float]]] = {}
        self._previous: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, expert: str, context: str, step: int, signal: torch.Tensor, out: torch.Tensor) -> None:
        key = (expert, context)
        previous = None if step == 0 else self._previous.get(key)
        if previous is not None and previous[0].shape == signal.shape:
            self.points.setdefault(expert, []).append((rel_l1(signal, previous[0]), rel_l1(out, previous[1])))
        self._previous[key] = (signal.detach().clone(), out.detach().clone())


def _plus(a: Streams, b: Streams) -> Streams:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _minus(a: Streams, b: Streams) -> Streams:
    return tuple(x - y for x, y in zip(a, b, strict=True))


def load_cached_module(
    artifact_dir: Path,
    manifest: Manifest,
    component: str,
    backend: str,
    *,
    gpu: str | None,
    verifier: Verifier,
    enabled: bool = True,
    run: CacheRun | None = None,
    threshold: float | None = None,
    threads: int | None = None,
) -> tuple[CachedEngineModule, EngineEntry]:
    """The stitched module of split denoiser ``component`` and the prologue's engine entry (names the backend and
    arch). ``run``: the ``CacheRun`` of the pipeline's other experts (Wan2.2), so they count the same steps;
    ``threshold``: replaces the recipe's (first_block, teacache: ``dtc run --cache-threshold``).

    Every part runs on the same backend: the one ``select_engine`` picks for the prologue.
    """
    from dtcompile.backends import get_backend

    centry = manifest.denoiser(component)
    if not centry.parts or centry.cache is None:
        raise ArtifactError(f"component {component!r} is not split into cache parts; rebuild the artifact")
    spec = CacheSpec.model_validate(centry.cache["spec"])
    entries = {name: manifest.part(name) for name in centry.parts}
    first = select_engine(manifest, centry.parts[0], backend, gpu)
    chosen = first.backend
    backend_impl = get_backend(chosen)
    runners: dict[str, Runner] = {}
    device: Any = "cpu"
    for name, part in entries.items():
        entry = select_engine(manifest, name, chosen, gpu)
        path = verifier.check(entry)
        for extra in part.onnx.external_data if part.onnx and chosen == REFERENCE_BACKEND else []:
            verifier.check(extra)
        runner = backend_impl.open_runner(path, entry.to_json(), threads=threads)
        runners[name] = runner
        device = getattr(runner, "device", "cpu")
    parts = [
        (name, part.kind, Segment.from_json(part.segment) if part.segment else None) for name, part in entries.items()
    ]
    block = next(entries[name] for name, kind, _ in parts if kind == "blocks")
    streams = tuple(name.removesuffix("_out") for name in block.output_names())
    module = CachedEngineModule(
        runners,
        parts,
        spec,
        centry.config or {},
        centry.input_names(),
        centry.output_name(),
        getattr(torch, manifest.dtype),
        device,
        streams=streams,
        shared=tuple(name for name in block.input_names() if name not in streams),
        epilogue_inputs=tuple(entries[parts[-1][0]].input_names()),
        enabled=enabled,
        name=component,
        run=run,
        teacache=centry.cache.get("teacache"),
        threshold=threshold,
    )
    return module, first
