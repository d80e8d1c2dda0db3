#!/usr/bin/env python
"""The real-width VAE decoder as an engine at high resolution: export once, TensorRT-RTX engines for 1024 px
and 2048 px (and one 1024..2048 range), each phase in its own process with its wall time and peak RSS.

The VAE is FLUX.1's ``AutoencoderKL`` (black-forest-labs/FLUX.1-dev vae/config.json: 16 latent channels, block
widths 128/256/512/512, 2 layers per block; SD3's has the same shape) with random weights, in bfloat16. The
graph is ``dtcompile.models.components.VaeDecoderGraph``, the one ``components: [..., vae_decoder]`` exports;
the export traces at ``--example-px`` (the graph's height and width stay dynamic), then checks onnxruntime
against torch at that size in float32. A known failure of NVIDIA's demo is a VAE engine that cannot be built
at 2048 px: the ``rtx`` phases show whether ours builds, and what it costs.

    python scripts/bench_vae.py --out docs/bench/vae.json

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
PROFILES = {"1024": (1024, 1024, 1024), "2048": (2048, 2048, 2048), "1024-2048": (1024, 1536, 2048)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _shapes(px: tuple[int, int, int]) -> Any:
    from dtcompile.core.graph import Range, Shapes

    r = Range(*px)
    return Shapes(batch=Range(1, 1, 1), height=r, width=r, text_len=Range(512, 512, 512))


def _vae(dtype: Any) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**FLUX_VAE).to(dtype).eval()


def work_export(work: Path, example_px: int) -> dict[str, Any]:
    import torch

    from dtcompile.export.onnx import export_onnx
    from dtcompile.models.components import VaeDecoderGraph

    vae = _vae(torch.bfloat16)
    graph = VaeDecoderGraph(scale_factor=8)
    px = (example_px, example_px, example_px)
    spec = graph.export_spec(vae, _shapes(px), torch.bfloat16)
    t0 = time.perf_counter()
    art = export_onnx(graph.export_module(vae), spec, work, name="vae_decoder_bf16", patches=())
    wall = time.perf_counter() - t0
    params = sum(p.numel() for n, p in vae.named_parameters() if not n.startswith("encoder."))
    return {"wall_s": wall, "decoder_params": params, "onnx_bytes": art.size, "n_nodes": art.n_nodes}


def work_parity(work: Path, example_px: int) -> dict[str, Any]:
    """float32 graph vs torch at the example size (onnxruntime has no CPU bfloat16 kernels)."""
    import torch

    from dtcompile.export.onnx import export_onnx
    from dtcompile.models.components import VaeDecoderGraph
    from dtcompile.stages.export import check_parity

    vae = _vae(torch.float32)
    graph = VaeDecoderGraph(scale_factor=8)
    px = (example_px, example_px, example_px)
    spec = graph.export_spec(vae, _shapes(px), torch.float32)
    wrapper = graph.export_module(vae)
    art = export_onnx(wrapper, spec, work, name="vae_decoder_fp32", patches=())
    t0 = time.perf_counter()
    parity = check_parity(art.path, wrapper, spec, "float32")
    return {"wall_s": time.perf_counter() - t0, "rel_l2": parity["rel_l2"], "example_px": example_px}


def work_rtx(work: Path, profile: str) -> dict[str, Any]:
    from dtcompile.backends.tensorrt import engine_from_onnx
    from dtcompile.models.components import VaeDecoderGraph

    class ConfigOnly:
        config = type("C", (), {"latent_channels": FLUX_VAE["latent_channels"]})()

    prof = VaeDecoderGraph(scale_factor=8).shape_profile(ConfigOnly(), _shapes(PROFILES[profile]))
    out = work / f"vae_{profile}.engine"
    t0 = time.perf_counter()
    info = engine_from_onnx(work / "vae_decoder_bf16.onnx", prof, "sm_89", "tensorrt-rtx", out)
    wall = time.perf_counter() - t0
    out.unlink()
    return {"wall_s": wall, "engine_bytes": info.size, "profile": {k: list(v) for k, v in prof.max.items()}}


def worker(phase: str, work: Path, example_px: int) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    if phase == "export":
        result = work_export(work, example_px)
    elif phase == "parity":
        result = work_parity(work, example_px)
    else:
        result = work_rtx(work, phase.removeprefix("rtx-"))
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def run(phase: str, work: Path, example_px: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", phase, "--work", str(work), "--example-px", str(example_px)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "process_s": time.perf_counter() - t0}
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "process_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "vae.json")
    ap.add_argument("--work", type=Path, default=ROOT / "engines" / ".bench-vae")
    ap.add_argument("--example-px", type=int, default=256, help="pixel size the export traces at")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.example_px)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for phase in ("export", "parity", *(f"rtx-{p}" for p in PROFILES)):
        rows[phase] = run(phase, args.work, args.example_px, args.timeout)
        print(phase, json.dumps(rows[phase]), flush=True)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "command": "python scripts/bench_vae.py " + " ".join(sys.argv[1:]),
        "vae": FLUX_VAE,
        "phases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
