"""CFG parallel step latency: 2 ranks x 1 thread against 1 rank x 1 thread on the same request, side by side.

    python scripts/bench_parallel.py engines/tiny-wan21 --steps 8 --repeat 5 [--frames 17 --height 96 --width 96]
        [--json docs/bench/parallel.json]

One rank runs in this process; the two ranks are spawned (gloo, ``dtcompile.runtime.parallel``). Each timed
run's per-step latency is the time between consecutive step callbacks (the first step, which pays first-call
costs, is dropped); after one warm-up run, ``--repeat`` runs per setting, alternating one rank and two ranks, and
the medians and their ratio are reported with the bytes each rank sent per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _timed_runs(artifact: Path, settings: dict[str, Any], repeat: int, parallel: bool, rank: int = 0) -> dict:
    """Warm-up plus ``repeat`` runs in one process (a rank, or the single-rank baseline): step latencies."""
    import torch

    from dtcompile.runtime.parallel import ParallelSpec
    from dtcompile.runtime.session import Session

    torch.set_num_threads(1)
    session = Session(artifact, "onnxruntime", parallel=ParallelSpec(cfg=2) if parallel else None, threads=1)
    session.load()
    steps: list[float] = []
    sent: list[float] = []
    for r in range(repeat + 1):
        marks: list[float] = []

        def step_end(pipe: Any, i: int, t: Any, kw: dict[str, Any], marks: list[float] = marks) -> dict[str, Any]:
            marks.append(time.perf_counter())
            return kw

        out = session.generate(session.request("a cat playing piano", callback=step_end, **settings))
        if r:  # the first run warms up
            steps += [b - a for a, b in zip(marks, marks[1:], strict=False)]
            if out.parallel:
                sent.append(out.parallel["bytes_sent_per_step"])
    return {"step_ms": [1000 * s for s in steps], "bytes_sent_per_step": statistics.median(sent) if sent else 0.0}


def _rank_job(artifact: Path, settings: dict[str, Any], repeat: int, rank: int) -> dict:
    return _timed_runs(artifact, settings, repeat, True, rank)


def main() -> None:
    import functools

    from dtcompile.runtime.parallel import ParallelSpec, run_parallel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = {"steps": args.steps, "seed": 0, "guidance": 5.0, "negative_prompt": "blurry",
                "frames": args.frames, "height": args.height, "width": args.width}  # fmt: skip
    one = _timed_runs(args.artifact, settings, args.repeat, False)
    two = run_parallel(ParallelSpec(cfg=2), functools.partial(_rank_job, args.artifact, settings, args.repeat),
                       threads=1)  # fmt: skip
    m1, m2 = statistics.median(one["step_ms"]), statistics.median(two["step_ms"])
    report = {
        "artifact": str(args.artifact),
        "settings": settings,
        "repeat": args.repeat,
        "one_rank_step_ms_median": m1,
        "two_ranks_step_ms_median": m2,
        "ratio": m2 / m1,
        "bytes_sent_per_rank_per_step": two["bytes_sent_per_step"],
        "steps_timed": [len(one["step_ms"]), len(two["step_ms"])],
    }
    print(f"{args.artifact.name}: 1 rank x 1 thread {m1:.2f} ms/step, 2 ranks x 1 thread {m2:.2f} ms/step "
          f"(ratio {m2 / m1:.2f}); {two['bytes_sent_per_step']:.0f} bytes sent per rank per step")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
