"""Runtime for cached artifacts: the part engines stitched into one module that skips cached block segments.

Input: an artifact whose transformer was split (``components[comp]["parts"]``, see ``dtcompile.stages.cache_split``).
Output: ``CachedEngineModule``, a stand-in for the split component with the same call interface as
``dtcompile.backends.standin.EngineModule``. Each call (one denoising step of one ``cache_context``) runs
the prologue, then every block segment, then the epilogue; a segment that is cached on this step is not run: its
input plus the residual it produced on the last step it ran (output - input, for both streams) stands in for
its output.

- static mode: a segment of group G is cached on the steps G's rule names.
- first_block mode: the first block always runs; the rest is skipped when the relative L1 change of the first
  block's first-stream residual since the last full step is below ``threshold`` (at most
  ``max_consecutive_skips`` steps in a row); its residual is the rest's output minus its input at that step.

``cache_stats()`` reports block evaluations done and skipped (and, for first_block, each step's change).
Steps are counted per ``cache_context`` (e.g. "cond"/"uncond"); ``begin_run(num_steps)`` starts a run.
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
from dtcompile.manifest import EngineEntry, Manifest, Verifier
from dtcompile.recipe.cache import CacheSpec, Segment

log = logging.getLogger("dtcompile.cache")

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
Streams = tuple[torch.Tensor, ...]


@dataclass
class _Context:
    """Cache state of one ``cache_context`` within a run."""

    step: int = 0
    last_timestep: float | None = None
    residuals: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    first_residual: torch.Tensor | None = None
    consecutive: int = 0


class CachedEngineModule(ComponentStandIn):
    """Stands in for ``pipe.transformer``: runs prologue, block segments and epilogue, skipping cached segments.

    ``runners`` maps part names to callables (feeds -> outputs); ``parts`` are the manifest's part entries in
    execution order (``kind``, ``segment``). ``streams`` are the tensors each block updates (it returns
    ``<stream>_out``; the first is the one first_block mode measures), ``shared`` the prologue's other outputs,
    ``epilogue_inputs`` what the epilogue reads (``dtcompile.models.base.CacheLayout``).
    ``enabled=False`` runs every block (``dtc run --cache off``).
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
    ) -> None:
        super().__init__(config, input_names, output_name, dtype, device)
        self.runners = runners
        self.streams, self.shared, self.epilogue_inputs = streams, shared, epilogue_inputs
        self.prologue = next(name for name, kind, _ in parts if kind == "prologue")
        self.epilogue = next(name for name, kind, _ in parts if kind == "epilogue")
        self.segments: list[tuple[str, Segment]] = [(name, seg) for name, kind, seg in parts if seg is not None]
        self.spec = spec
        self.groups = {g.name: g for g in spec.groups or []}
        self.enabled = enabled
        self.num_steps: int | None = None
        self._context_name = "default"
        self._contexts: dict[str, _Context] = {}
        self.blocks_per_call = sum(len(seg.blocks) for _, seg in self.segments)
        self._reset_stats()

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Pipelines wrap their conditional and unconditional calls in contexts; each keeps its own cache."""
        previous, self._context_name = self._context_name, name
        try:
            yield
        finally:
            self._context_name = previous

    def begin_run(self, num_steps: int) -> None:
        """Start a run of ``num_steps`` steps: check the static rules against it, clear caches and counters."""
        if self.enabled:
            self.spec.check_run_steps(num_steps)
            if self.spec.steps is not None and self.spec.steps != num_steps:
                log.warning("cache rules are written for %d steps; this run has %d", self.spec.steps, num_steps)
        self.num_steps = num_steps
        self._contexts.clear()
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.calls = 0
        self.blocks_evaluated = 0
        self.blocks_skipped = 0
        self.skipped_per_call: list[int] = []
        self.rel_change: list[float | None] = []

    def cache_stats(self) -> dict[str, Any]:
        """Counters of the current run: block evaluations done and skipped, per call, and the rule settings."""
        total = self.blocks_evaluated + self.blocks_skipped
        stats: dict[str, Any] = {
            "mode": self.spec.mode if self.enabled else "off",
            "calls": self.calls,
            "blocks_per_call": self.blocks_per_call,
            "blocks_evaluated": self.blocks_evaluated,
            "blocks_skipped": self.blocks_skipped,
            "skipped_fraction": self.blocks_skipped / total if total else 0.0,
            "skipped_per_call": list(self.skipped_per_call),
            "cached_calls": [i for i, n in enumerate(self.skipped_per_call) if n],
        }
        if self.spec.mode == "first_block":
            stats["threshold"] = self.spec.threshold
            stats["max_consecutive_skips"] = self.spec.max_consecutive_skips
            stats["rel_change"] = list(self.rel_change)
        else:
            stats["groups"] = {g.name: g.describe() for g in self.groups.values()}
        return stats

    def _context(self, timestep: torch.Tensor) -> _Context:
        ctx = self._contexts.setdefault(self._context_name, _Context())
        if self.num_steps is None:
            # No begin_run: a rising timestep means the pipeline started a new run (flow-matching schedules fall).
            t = float(timestep.detach().flatten()[0])
            if ctx.last_timestep is not None and t > ctx.last_timestep:
                ctx = self._contexts[self._context_name] = _Context()
            ctx.last_timestep = t
        elif ctx.step >= self.num_steps:
            ctx = self._contexts[self._context_name] = _Context()  # the next run of the same length
        return ctx

    def forward(self, return_dict: bool = True, joint_attention_kwargs: Any = None, **kwargs: Any) -> Any:
        feeds = self.graph_feeds(kwargs, joint_attention_kwargs)
        ctx = self._context(feeds["timestep"])
        pro = self.runners[self.prologue](feeds)
        shared = {k: pro[k] for k in self.shared}
        streams = tuple(pro[k] for k in self.streams)
        if self.enabled and self.spec.mode == "first_block":
            streams, skipped = self._first_block(ctx, streams, shared)
        else:
            streams, skipped = self._static(ctx, streams, shared)
        state = {**pro, **dict(zip(self.streams, streams, strict=True))}  # prologue outputs, updated streams
        out = self.runners[self.epilogue]({k: state[k] for k in self.epilogue_inputs})[self.output_name]
        out = self.check_finite(out.to(self._device, self._dtype), self.calls)
        ctx.step += 1
        self.calls += 1
        self.blocks_skipped += skipped
        self.blocks_evaluated += self.blocks_per_call - skipped
        self.skipped_per_call.append(skipped)
        if self.trace is not None:
            self.trace.append(out.detach().clone())
        return (out,) if not return_dict else {"sample": out}

    def _run(self, name: str, streams: Streams, shared: dict[str, torch.Tensor]) -> Streams:
        out = self.runners[name]({**dict(zip(self.streams, streams, strict=True)), **shared})
        return tuple(out[f"{k}_out"] for k in self.streams)

    def _static(self, ctx: _Context, streams: Streams, shared: dict[str, torch.Tensor]) -> tuple[Streams, int]:
        skipped = 0
        for name, seg in self.segments:
            group = self.groups.get(seg.group) if self.enabled and seg.group else None
            cached = ctx.residuals.get(seg.index)
            if group and group.cached_at(ctx.step) and cached and cached[0].shape == streams[0].shape:
                streams = _plus(streams, cached)
                skipped += len(seg.blocks)
                continue
            new = self._run(name, streams, shared)
            if group:
                ctx.residuals[seg.index] = _minus(new, streams)
            streams = new
        return streams, skipped

    def _first_block(self, ctx: _Context, streams: Streams, shared: dict[str, torch.Tensor]) -> tuple[Streams, int]:
        (first_name, _), rest = self.segments[0], self.segments[1:]
        new = self._run(first_name, streams, shared)
        residual = new[0] - streams[0]
        streams = new
        change = None
        if ctx.first_residual is not None and ctx.first_residual.shape == residual.shape:
            change = rel_l1(residual, ctx.first_residual)
        self.rel_change.append(change)
        cached = ctx.residuals.get(1)
        threshold = self.spec.threshold or 0.0
        if (
            change is not None
            and change < threshold
            and ctx.consecutive < (self.spec.max_consecutive_skips or 0)
            and cached
        ):
            ctx.consecutive += 1
            return _plus(streams, cached), sum(len(seg.blocks) for _, seg in rest)
        start = streams
        for name, _ in rest:
            streams = self._run(name, streams, shared)
        ctx.residuals[1] = _minus(streams, start)
        ctx.first_residual = residual
        ctx.consecutive = 0
        return streams, 0


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
) -> tuple[CachedEngineModule, EngineEntry]:
    """The stitched module of a split artifact and the prologue's engine entry (names the backend and arch).

    Every part runs on the same backend: the one ``select_engine`` picks for the prologue.
    """
    from dtcompile.backends import get_backend
    from dtcompile.runtime.run import select_engine

    centry = manifest.component(component)
    if not centry.parts or centry.cache is None:
        raise ArtifactError(f"component {component!r} is not split into cache parts; rebuild the artifact")
    spec = CacheSpec.model_validate(centry.cache["spec"])
    entries = {name: manifest.component(name) for name in centry.parts}
    first = select_engine(manifest, centry.parts[0], backend, gpu)
    chosen = first.backend
    backend_impl = get_backend(chosen)
    runners: dict[str, Runner] = {}
    device: Any = "cpu"
    for name, part in entries.items():
        entry = select_engine(manifest, name, chosen, gpu)
        path = verifier.check(entry)
        for extra in part.onnx.external_data if part.onnx and chosen == "onnxruntime" else []:
            verifier.check(extra)
        runner = backend_impl.open_runner(path, entry.to_json())
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
    )
    return module, first
