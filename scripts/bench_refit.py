#!/usr/bin/env python
"""LoRA refit vs full rebuild, side by side in one process, on the real-width FLUX-architecture transformer.

Model: ``builtin:flux-realwidth-1`` (FLUX.1-dev's transformer widths: hidden 3072 = 24 heads x 128, joint 4096,
pooled 768, in_channels 64, guidance; 1 double + 1 single block; random init), built in float16 (1.1 GB):
onnxruntime has no CPU bfloat16 kernels, and the fp32 graph (2.2 GB) is over protobuf's 2 GiB limit, where
the export currently fails (Constant-node tensors left in the exporter's scratch files).
Adapter: a random PEFT LoRA, rank 16 (alpha 16), on every attention projection (to_q/k/v, to_out.0,
add_q/k/v_proj, to_add_out) of both blocks, saved as a diffusers LoRA file.

Phases, all timed in this one process after the heavy imports (so none pays them alone):

1. ``build base``: ``dtc build`` of the recipe (load, export with the weight map, onnxruntime parity).
2. ``rebuild with LoRA``: the same recipe with ``lora: [{source: <file>}]`` (load, fuse, export, parity).
3. ``refit``: ``dtc refit`` of the base artifact with the same file (to a new folder).
4. accuracy: onnxruntime noise prediction of the refit artifact vs the rebuild (fp16), and the same for a
   weight-only fp8 Q/DQ copy of both (``weight_only_qdq_artifact``): the requantization gap.

A second section (``tiny_fp8_calibrated``) measures the same on a calibrated fp8 artifact: recipes/tiny-flux-fp8.yaml
(ModelOpt PTQ, fp8 attention) built plain and with the LoRA fused before calibration, the plain one refit; all
against fp32 builds, plus a 4-step pipeline run (per-step noise, image PSNR) of refit vs rebuild.

    python scripts/bench_refit.py [--out docs/bench/refit.json] [--workdir /tmp/x] [--rank 16] [--no-fp8]
                                  [--skip-realwidth | --skip-calibrated]  (a skipped section keeps the file's)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ONNX = "onnx/transformer.onnx"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def recipe_yaml(out_dir: Path, lora: Path | None) -> str:
    text = f"""name: {"rebuild" if lora else "base"}
model:
  source: builtin:flux-realwidth-1
dtype: float16
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
    if lora:
        text += f"lora:\n  - source: {lora}\n    scale: 1.0\n"
    return text


def feeds(manifest: dict[str, Any]) -> dict[str, Any]:
    """Fixed inputs at the artifact's opt shapes (inputs of the exported graph)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    profile = manifest["components"]["transformer"]["profile"]
    out = {}
    for name, shapes in profile.items():
        shape = shapes["opt"]
        if name in ("timestep",):
            out[name] = torch.full(shape, 0.6)
        elif name == "guidance":
            out[name] = torch.full(shape, 3.5)
        elif name == "txt_ids":
            out[name] = torch.zeros(shape)
        elif name == "img_ids":
            out[name] = torch.rand(shape, generator=gen) * 16
        else:
            out[name] = torch.randn(shape, generator=gen)
    return out


def output(artifact: Path) -> Any:
    from dtcompile.backends.onnxruntime import OrtRunner
    from dtcompile.manifest import read_manifest

    m = read_manifest(artifact)
    runner = OrtRunner(artifact / m["components"]["transformer"]["onnx"]["file"], optimization="basic")
    return runner(feeds(m))["latent"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "refit.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where artifacts go (default: a temp folder)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-fp8", action="store_true", help="skip the fp8 requantization gap")
    ap.add_argument("--skip-realwidth", action="store_true", help="keep the file's realwidth section")
    ap.add_argument("--skip-calibrated", action="store_true", help="keep the file's tiny_fp8_calibrated section")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(message)s")

    import diffusers  # noqa: F401  (imported up front: no phase pays the imports)
    import onnxruntime  # noqa: F401

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dtc-bench-refit-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}", flush=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "realwidth": old.get("realwidth") if args.skip_realwidth else realwidth(work, args.rank, not args.no_fp8),
        "tiny_fp8_calibrated": old.get("tiny_fp8_calibrated") if args.skip_calibrated else calibrated_fp8(work),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def timed(rows: list[dict[str, Any]], name: str, fn: Any) -> Any:
    """Run ``fn`` as a named phase: wall time and this phase's peak RSS (sampled) go into ``rows``."""
    from dtcompile.core.progress import stage

    with stage(name) as st:
        result = fn()
    rows.append({"phase": name, "wall_s": round(st.wall_s, 2), "peak_rss_mb": round(st.peak_rss_mb)})
    print(f"  {name:<32} {rows[-1]['wall_s']:8.2f} s", flush=True)
    return result


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("\n| phase | wall s | peak RSS MB |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['wall_s']:.2f} | {r['peak_rss_mb']} |")


def realwidth(work: Path, rank: int, fp8: bool) -> dict[str, Any]:
    """Refit vs rebuild on the real-width model (float16), plus the weight-only fp8 requantization gap."""
    import torch

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact
    from dtcompile.weights.onnx_weights import OnnxWeights
    from tests.fixtures.lora import make_peft_lora
    from tests.fixtures.qdq import weight_only_qdq_artifact

    rows: list[dict[str, Any]] = []
    model_dir = builtin_model_path("flux-realwidth-1")  # generated once into the cache, untimed
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer", dtype=torch.float16)
    n_params = sum(p.numel() for p in transformer.parameters())
    lora = make_peft_lora(transformer, work / "lora" / "r16.safetensors", rank=rank, alpha=rank, targets=TARGETS)
    del transformer

    (work / "base.yaml").write_text(recipe_yaml(work / "engines", None))
    (work / "rebuild.yaml").write_text(recipe_yaml(work / "engines", lora))
    base = timed(rows, "build base", lambda: run_build(load_recipe(work / "base.yaml"), force=True)).artifact_dir
    rebuild = timed(rows, "full rebuild with LoRA", lambda: run_build(load_recipe(work / "rebuild.yaml"), force=True))
    rebuild = rebuild.artifact_dir
    report = timed(
        "refit with LoRA", lambda: refit_artifact(base, [(str(lora), 1.0)], out_dir=work / "engines" / "refit")
    )
    refit = report.artifact_dir

    ref = output(rebuild)
    # size of the update: ||W' - W|| / ||W|| over the touched weights (the adapter's strength)
    b_w, r_w = OnnxWeights(base / ONNX), OnnxWeights(refit / ONNX)
    touched = [n for n in r_w.inits if not torch.equal(b_w.tensor(n), r_w.tensor(n))]
    rel = [
        float((r_w.tensor(n).double() - b_w.tensor(n).double()).norm() / b_w.tensor(n).double().norm()) for n in touched
    ]
    result: dict[str, Any] = {
        "model": "builtin:flux-realwidth-1 (1 double + 1 single block, hidden 3072), float16",
        "parameters": n_params,
        "lora": {
            "rank": rank,
            "alpha": rank,
            "targets": list(TARGETS),
            "modules": report.adapters[0]["modules"],
        },
        "phases": rows,
        "refit_breakdown_s": {k: round(v, 3) for k, v in report.timings.items()},
        "refit_updated_initializers": report.updated,
        "lora_relative_weight_change": {"mean": sum(rel) / len(rel), "max": max(rel), "weights": len(rel)},
        "speedup_rebuild_over_refit": round(rows[1]["wall_s"] / rows[2]["wall_s"], 1),
        "accuracy": {
            "fp16_refit_vs_rebuild_rel_l2": rel_l2(output(refit), ref),
            "fp16_lora_effect_rel_l2": rel_l2(output(base), ref),
        },
    }
    if fp8:
        q_base = timed(
            rows, "fp8 weights: base copy", lambda: weight_only_qdq_artifact(base, work / "engines" / "q-base")
        )
        q_rebuild = timed(
            "fp8 weights: rebuild copy", lambda: weight_only_qdq_artifact(rebuild, work / "engines" / "q-rebuild")
        )
        q_report = timed(
            "fp8 weights: refit",
            lambda: refit_artifact(q_base, [(str(lora), 1.0)], out_dir=work / "engines" / "q-refit"),
        )
        q_ref = output(q_rebuild)
        result["accuracy"].update(
            {
                "fp8_refit_vs_fp8_rebuild_rel_l2": rel_l2(output(q_report.artifact_dir), q_ref),
                "fp8_rebuild_vs_fp16_rebuild_rel_l2": rel_l2(q_ref, ref),
            }
        )
    result["phases"] = rows
    print_rows(rows)
    print(f"\nrebuild / refit: {result['speedup_rebuild_over_refit']}x; refit breakdown {result['refit_breakdown_s']}")
    print(f"LoRA update ||dW||/||W||: {result['lora_relative_weight_change']}")
    for k, v in result["accuracy"].items():
        print(f"{k}: {v:.3e}")
    return result


def calibrated_fp8(work: Path) -> dict[str, Any]:
    """The requantizing refit of a calibrated fp8 artifact (recipes/tiny-flux-fp8.yaml: ModelOpt fp8 PTQ with
    fp8 attention) vs a rebuild that fuses the LoRA before calibration, both against fp32 references."""
    import numpy as np
    import torch
    from diffusers import FluxTransformer2DModel

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact
    from tests.fixtures.lora import make_peft_lora

    rows: list[dict[str, Any]] = []
    t = FluxTransformer2DModel.from_pretrained(builtin_model_path("tiny-flux") / "transformer", dtype=torch.float32)
    lora = make_peft_lora(t, work / "lora" / "tiny-r4.safetensors", rank=4, alpha=8.0, seed=1)
    over = [f"output.dir={work / 'tiny'}", "engine.backends=[onnxruntime]", "engine.targets=[]"]
    with_lora = f"lora=[{{source: '{lora}', scale: 0.7}}]"
    fp8, fp32 = ROOT / "recipes" / "tiny-flux-fp8.yaml", ROOT / "recipes" / "tiny-flux.yaml"

    def build(recipe: Path, *extra: str) -> Path:
        return run_build(load_recipe(recipe, [*over, *extra]), force=True).artifact_dir

    q_base = timed(rows, "tiny fp8: build base", lambda: build(fp8, "name=fp8-base"))
    q_rebuild = timed(rows, "tiny fp8: rebuild with LoRA", lambda: build(fp8, "name=fp8-lora", with_lora))
    q_refit = timed(
        rows, "tiny fp8: refit", lambda: refit_artifact(q_base, [(str(lora), 0.7)], out_dir=work / "tiny" / "fp8-refit")
    ).artifact_dir
    f_base, f_lora = build(fp32, "name=fp32-base"), build(fp32, "name=fp32-lora", with_lora)
    o = {
        k: output(v)
        for k, v in {"q_refit": q_refit, "q_rebuild": q_rebuild, "f_lora": f_lora, "f_base": f_base}.items()
    }
    kw = {"steps": 4, "seed": 0, "backend": "onnxruntime", "trace": True}
    runs = {
        k: run_artifact(v, "a red fox in the snow", **kw) for k, v in {"refit": q_refit, "rebuild": q_rebuild}.items()
    }
    img = [np.asarray(r.image).astype(np.float64) for r in runs.values()]
    mse = float(np.mean((img[0] - img[1]) ** 2))
    result = {
        "recipe": "recipes/tiny-flux-fp8.yaml (onnxruntime only), LoRA rank 4 alpha 8 at scale 0.7 on attention",
        "phases": rows,
        "accuracy": {
            "fp8_refit_vs_fp8_rebuild_rel_l2": rel_l2(o["q_refit"], o["q_rebuild"]),
            "fp8_rebuild_vs_fp32_rebuild_rel_l2": rel_l2(o["q_rebuild"], o["f_lora"]),
            "fp8_refit_vs_fp32_rebuild_rel_l2": rel_l2(o["q_refit"], o["f_lora"]),
            "fp32_lora_effect_rel_l2": rel_l2(o["f_base"], o["f_lora"]),
            "pipeline_steps_max_rel_l2": max(
                rel_l2(a, b) for a, b in zip(runs["refit"].trace, runs["rebuild"].trace, strict=True)
            ),
            "pipeline_image_psnr_db": float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse)),
        },
    }
    print_rows(rows)
    for k, v in result["accuracy"].items():
        print(f"{k}: {v:.3e}")
    return result


if __name__ == "__main__":
    main()
