"""Time to first denoising step of `dtc run`, recorded verification versus a full sha256, side by side.

    python scripts/bench_startup.py engines/flux-realwidth --repeat 3 [--json docs/bench/startup.json]

Each run is a fresh process (imports, manifest, verification, pipeline load, engine session, first step),
alternating the two modes so both see the same page cache and machine load; reports medians and the ratio.
The clock starts before ``import dtcompile`` and stops when the first step's callback fires.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import time
t0 = time.perf_counter()
import json, sys
from pathlib import Path
import torch
from dtcompile.models import adapter_for
from dtcompile.models.base import GenerationRequest
from dtcompile.runtime.session import load_engine_pipeline
artifact, mode = Path(sys.argv[1]), sys.argv[2]
pipe, module, manifest, entry = load_engine_pipeline(artifact, "onnxruntime", verify=mode)
t_loaded = time.perf_counter()
first = {}
def step_end(p, i, t, kw):
    first.setdefault("t", time.perf_counter())
    return kw
shapes = manifest.shapes
req = GenerationRequest("a lighthouse", 1, shapes["height"].opt, shapes["width"].opt,
                        generator=torch.Generator("cpu").manual_seed(0), text_len=shapes["text_len"].opt,
                        callback=step_end)
adapter = adapter_for(manifest.source.pipeline_class)
pipe(**adapter.call_kwargs(req))
print(json.dumps({"load_s": t_loaded - t0, "first_step_s": first["t"] - t0}))
"""


def once(artifact: str, mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, artifact, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    once(a.artifact, "recorded")  # warm the page cache and make sure a record exists
    runs: dict[str, list[dict[str, float]]] = {"recorded": [], "full": []}
    for _ in range(a.repeat):
        for mode in ("recorded", "full"):
            runs[mode].append(once(a.artifact, mode))
    report = {
        mode: {key: round(statistics.median(r[key] for r in rs), 3) for key in ("load_s", "first_step_s")}
        for mode, rs in runs.items()
    }
    report["ratio_full_over_recorded"] = round(report["full"]["first_step_s"] / report["recorded"]["first_step_s"], 2)
    report["runs"] = runs
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
