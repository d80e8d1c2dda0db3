"""``dtc bench --parallel cfg=2|ulysses=N|cfg=2,ulysses=N``: step latency of one request split over ranks against
one rank, side by side.

Input: an artifact whose family has guidance branches or a sequence-parallel form (``runtime/parallel.py``,
``runtime/ulysses.py``) and the run's settings. One rank runs in this process (the engine; with Ulysses also the
same torch path on one rank, since the ranks run the denoiser in torch); the ranks are spawned (gloo on CPUs,
NCCL on GPUs). A run's per-step latencies are the
times between consecutive step callbacks (the first step, which pays first-call costs, is dropped); after one
warm-up run, ``repeat`` runs per setting. Output: a report dict with the medians, their ratios and the bytes
each rank sent per step (with Ulysses: next to the prediction from the shapes).
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
    """Warm-up plus ``repeat`` runs in this process (one rank of ``spec``, or the one-rank baseline), with torch's
    thread count ``threads`` for their duration."""
    from dtcompile.core.threads import torch_threads

    with torch_threads(threads):
        return _timed_runs(artifact, settings, repeat, spec, threads, rank)


def _timed_runs(
    artifact: Path, settings: dict[str, Any], repeat: int, spec: ParallelSpec | None, threads: int | None, rank: int
) -> dict[str, Any]:

    from dtcompile.runtime.session import Session

    settings = dict(settings)
    session = Session(artifact, settings.pop("backend", "auto"), parallel=spec, threads=threads)
    session.load()
    steps: list[float] = []
    sent: list[dict[str, Any]] = []
    for r in range(repeat + 1):
        marks: list[float] = []

        def step_end(pipe: Any, i: int, t: Any, kw: dict[str, Any], marks: list[float] = marks) -> dict[str, Any]:
            marks.append(time.perf_counter())
            return kw

        out = session.generate(session.request(callback=step_end, **settings))
        if r:  # the first run warms up
            steps += [b - a for a, b in zip(marks, marks[1:], strict=False)]
            if out.parallel:
                sent.append(out.parallel)
    last = sent[-1] if sent else {}
    return {"step_ms": [1000 * s for s in steps], "backend": out.backend,
            "bytes_sent_per_step": statistics.median(p["bytes_sent_per_step"] for p in sent) if sent else 0.0,
            "ulysses": {k: v for k, v in last.items() if k.startswith("ulysses_")}}  # fmt: skip


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
    torch_one = None
    if spec.ulysses > 1:  # the ranks run the denoiser in torch: the same path on one rank, no collectives
        torch_one = timed_runs(artifact, dict(settings), repeat, ParallelSpec(cfg=1, ulysses=1), threads)
    job = functools.partial(timed_runs, artifact, dict(settings), repeat, spec, threads)
    many = run_parallel(spec, job, threads=threads)
    m1, m2 = statistics.median(one["step_ms"]), statistics.median(many["step_ms"])
    extra: dict[str, Any] = {}
    if torch_one is not None:
        mt = statistics.median(torch_one["step_ms"])
        u = many["ulysses"]
        extra = {"one_rank_torch_step_ms_median": mt, "ratio_to_torch": m2 / mt,
                 "ulysses_bytes_per_rank_per_step": u.get("ulysses_bytes_per_step"),
                 "ulysses_predicted_bytes_per_rank_per_step": u.get("ulysses_predicted_bytes_per_step"),
                 "ulysses_predicted_per_call": u.get("ulysses_predicted_per_call"),
                 "ulysses_calls_per_step": u.get("ulysses_calls_per_step")}  # fmt: skip
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
        "ranks_backend": many["backend"],
        **extra,
    }


def format_parallel_report(report: dict[str, Any]) -> str:
    """One line (two with Ulysses): the medians, the ratios and the bytes per step."""
    r, p = report, report["parallel"]
    text = ",".join(f"{k}={p[k]}" for k in ("cfg", "ulysses") if p[k] > 1)
    line = (
        f"dtc bench --parallel {text} {Path(r['artifact']).name} ({r['backend']}, "
        f"{r['threads_per_rank'] or 'default'} thread(s) per rank): 1 rank {r['one_rank_step_ms_median']:.2f} ms/step, "
        f"{p['ranks']} ranks ({r['ranks_backend']}) {r['ranks_step_ms_median']:.2f} ms/step (ratio {r['ratio']:.2f}); "
        f"{r['bytes_sent_per_rank_per_step']:.0f} bytes sent per rank per step"
    )
    if "one_rank_torch_step_ms_median" in r:
        line += (
            f"\nulysses: 1 rank torch {r['one_rank_torch_step_ms_median']:.2f} ms/step (ratio "
            f"{r['ratio_to_torch']:.2f}); {r['ulysses_bytes_per_rank_per_step']:.0f} bytes per rank per step in "
            f"all-to-alls and the output gather, predicted from the shapes "
            f"{r['ulysses_predicted_bytes_per_rank_per_step']:.0f}"
        )
    return line
