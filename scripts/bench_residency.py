#!/usr/bin/env python
"""Peak host memory of ``dtc run --residency all`` against ``--residency sequential``, side by side in one run.

Model: FLUX.1-dev's transformer at its real widths (``builtin:flux-realwidth-1``'s config: hidden 3072, 1 double +
1 single block, 545.5M parameters) with its text encoders and VAE at real widths too, so that they weigh what a
component weighs: a 1-layer T5 at T5-XXL's widths (d_model 4096, 64 heads x 64, d_ff 10240: 193M parameters),
a 1-layer CLIP-L (hidden 768) and FLUX.1's VAE decoder widths (128/256/512/512 channels, 2 layers per block).
Random weights, float32, generated into ``--workdir`` (not a built-in: it exists only for this measurement).

Phases:

1. generate the pipeline and ``dtc build`` it with ``components: [transformer, text_encoder, text_encoder_2,
   vae_decoder]`` (onnxruntime only), unless ``--workdir`` already holds the artifact;
2. ``dtc run`` it once per residency, each in its own process reading the child's peak RSS
   (``os.wait4``: ru_maxrss) and the swap lines the run logs; the two images are compared byte for byte.

    python scripts/bench_residency.py [--workdir /tmp/residency] [--steps 2] [--out docs/bench/residency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPONENTS = ["transformer", "text_encoder", "text_encoder_2", "vae_decoder"]


def pipeline_config() -> dict[str, Any]:
    """``flux-realwidth-1``'s config with real-width text encoders and VAE."""
    from dtcompile.models.builtins.flux import REALWIDTH_FLUX_CONFIG

    cfg = dict(REALWIDTH_FLUX_CONFIG)
    cfg["text_encoder_2"] = {**cfg["text_encoder_2"], "d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240,
                             "num_layers": 1}  # fmt: skip
    cfg["text_encoder"] = {**cfg["text_encoder"], "hidden_size": 768, "intermediate_size": 3072,
                           "num_attention_heads": 12, "num_hidden_layers": 1, "projection_dim": 768}  # fmt: skip
    cfg["vae"] = {**cfg["vae"], "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                  "norm_num_groups": 32}  # fmt: skip
    return cfg


def recipe(model_dir: Path, out_dir: Path) -> str:
    return f"""name: flux-realwidth-components
model:
  source: {model_dir}
dtype: float32
components: [{", ".join(COMPONENTS)}]
export:
  opset: 19
  shapes:
    batch: 1
    height: 256
    width: 256
    text_len: 64
engine:
  backends: [onnxruntime]
output:
  dir: {out_dir}
"""


def build(workdir: Path) -> Path:
    artifact = workdir / "engines" / "flux-realwidth-components"
    if (artifact / "manifest.json").is_file():
        print(f"reusing {artifact}", flush=True)
        return artifact
    model_dir = workdir / "model"
    if not (model_dir / "model_index.json").is_file():
        from dtcompile.models.builtins.flux import build_tiny_flux

        t0 = time.perf_counter()
        build_tiny_flux(0, pipeline_config()).save_pretrained(model_dir, safe_serialization=True)
        print(f"generated {model_dir} in {time.perf_counter() - t0:.0f}s", flush=True)
    path = workdir / "recipe.yaml"
    path.write_text(recipe(model_dir, workdir / "engines"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dtcompile", "build", "--recipe", str(path)], check=True)
    print(f"built {artifact} in {time.perf_counter() - t0:.0f}s", flush=True)
    return artifact


def run(artifact: Path, residency: str, out: Path, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dtcompile", "run", str(artifact), "--prompt", "a photo of a cat",
           "--steps", str(steps), "--backend", "onnxruntime", "--residency", residency, "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    swaps = [dict(zip(("action", "component", "seconds"), (m[0], m[1], float(m[2])), strict=True))
             for m in re.findall(r"residency: (load|release) (\S+) in ([0-9.]+)s", text)]  # fmt: skip
    return {"residency": residency, "peak_rss_mb": round(usage.ru_maxrss / 1024), "wall_s": round(wall, 1),
            "swaps": swaps, "command": " ".join(["dtc", *cmd[3:]]), "last_lines": text.strip().splitlines()[-3:]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/residency")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "residency.json"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    artifact = build(workdir)
    manifest = json.loads((artifact / "manifest.json").read_text())
    sizes = {}
    for name, comp in manifest["components"].items():
        onnx = next(e for e in comp["engines"] if e["backend"] == "onnxruntime")
        extra = sum(x["size"] for x in (comp.get("onnx") or {}).get("external_data", []))
        sizes[name] = round((onnx["size"] + extra) / 2**20)
    results = [run(artifact, r, workdir / f"{r}.png", args.steps) for r in ("all", "sequential")]
    same = (workdir / "all.png").read_bytes() == (workdir / "sequential.png").read_bytes()
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "steps": args.steps,
        "component_mb": sizes,
        "runs": results,
        "images_bit_identical": same,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not same:
        raise SystemExit("the two residencies made different images")


if __name__ == "__main__":
    main()
