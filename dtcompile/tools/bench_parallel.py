"""``dtc bench --parallel cfg=2``: step latency of one request split over ranks against one rank, side by side.

Input: an artifact whose family has guidance branches (``runtime/parallel.py``) and the run's settings. One rank
runs in this process; the ranks are spawned (gloo on CPUs, NCCL on GPUs). A run's per-step latencies are the
times between consecutive step callbacks (the first step, which pays first-call costs, is dropped); after one
warm-up run, ``repeat`` runs per setting. Output: a report dict with both medians, their ratio and the bytes
each rank sent per step.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path
from typing import Any

from dtcompile.runtime.parallel import ParallelSpec, run_parallel


def timed_runs(
    artifact: Path, settings: dict[str, Any], repeat: int, spec: ParallelSpec | None, threads: int | None,
    rank: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Warm-up plus ``repeat`` runs in this process (one rank of ``spec``, or the one-rank baseline)."""
    import torch

    from dtcompile.runtime.session import Session

    if threads is not None:
        torch.set_num_threads(threads)
    settings = dict(settings)
    session = Session(artifact, settings.pop("backend", "auto"), parallel=spec, threads=threads)
    session.load()
    steps: list[float] = []
    sent: list[float] = []
    for r in range(repeat + 1):
        marks: list[float] = []

        def step_end(pipe: Any, i: int, t: Any, kw: dict[str, Any], marks: list[float] = marks) -> dict[str, Any]:
            marks.append(time.perf_counter())
            return kw

        out = session.generate(session.request(callback=step_end, **settings))
        if r:  # the first run warms up
            steps += [b - a for a, b in zip(marks, marks[1:], strict=False)]
            if out.parallel:
                sent.append(out.parallel["bytes_sent_per_step"])
    return {"step_ms": [1000 * s for s in steps], "bytes_sent_per_step": statistics.median(sent) if sent else 0.0,
            "backend": session.entry.backend if session.entry else None}  # fmt: skip


def bench_parallel(
    artifact: Path, spec: ParallelSpec, settings: dict[str, Any], *, repeat: int = 3, threads: int | None = None
) -> dict[str, Any]:
    """One rank, then ``spec.world`` ranks, on the same request ``settings`` (``Session.request``'s keywords and
    ``backend``); medians of the per-step latency, their ratio and the bytes each rank sent per step."""
    from dtcompile.runtime.session import Session

    checked = dict(settings)
    checked.pop("backend", None)
    Session(artifact, settings.get("backend", "auto"), parallel=spec).request(**checked)  # errors before any run
    one = timed_runs(artifact, dict(settings), repeat, None, threads)
    job = functools.partial(timed_runs, artifact, dict(settings), repeat, spec, threads)
    many = run_parallel(spec, job, threads=threads)
    m1, m2 = statistics.median(one["step_ms"]), statistics.median(many["step_ms"])
    return {
        "artifact": str(artifact),
        "parallel": {"cfg": spec.cfg, "ulysses": spec.ulysses, "ranks": spec.world},
        "settings": {k: v for k, v in settings.items() if k != "callback"},
        "threads_per_rank": threads,
        "repeat": repeat,
        "backend": one["backend"],
        "one_rank_step_ms_median": m1,
        "ranks_step_ms_median": m2,
        "ratio": m2 / m1,
        "bytes_sent_per_rank_per_step": many["bytes_sent_per_step"],
        "steps_timed": [len(one["step_ms"]), len(many["step_ms"])],
    }


def format_parallel_report(report: dict[str, Any]) -> str:
    """One line: both medians, the ratio and the bytes per step."""
    r = report
    return (
        f"dtc bench --parallel cfg={r['parallel']['cfg']} {Path(r['artifact']).name} ({r['backend']}, "
        f"{r['threads_per_rank'] or 'default'} thread(s) per rank): 1 rank {r['one_rank_step_ms_median']:.2f} ms/step, "
        f"{r['parallel']['ranks']} ranks {r['ranks_step_ms_median']:.2f} ms/step (ratio {r['ratio']:.2f}); "
        f"{r['bytes_sent_per_rank_per_step']:.0f} bytes sent per rank per step"
    )
