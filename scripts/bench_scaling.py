#!/usr/bin/env python
"""Build-cost scaling: the FLUX transformer at real widths with 1, 2, 4, ... double+single blocks.

Input: depths to try. Output: a JSON table (wall time and peak RSS per phase and depth), a least-squares line
per phase, its extrapolation to FLUX.1-dev (19 double + 38 single blocks) and a PNG plot next to the JSON.

Every (depth, phase) runs in its own subprocess so each peak RSS is that phase's alone:

- ``export``: build ``FluxTransformer2DModel`` (hidden 3072 = 24 heads x 128, joint 4096, pooled 768,
  in_channels 64, guidance) in bf16 with random weights, then ``dtcompile.export.onnx.export_onnx`` with
  external data and no graph-surgeon cleanup: the path a full 23 GB FLUX.1-dev export takes.
- ``rtx``: ``engine_from_onnx`` for TensorRT-RTX sm_89 with the FLUX.1-dev profile of recipes/flux-dev.yaml
  (batch 1..2, 768..1344 px, text 512), opt level 3.
- ``ort``: onnxruntime session creation (what ``dtc run --backend onnxruntime`` pays at load). onnxruntime has
  no CPU bfloat16 kernels, so the graph is first retyped to float16 (same bytes per weight, same graph) in an
  untimed ``retype`` phase.

The export traces one forward at batch 1, 256x256 px (256 image tokens) + 512 text tokens; a real FLUX.1-dev
export traces at its opt shape (4096 + 512 tokens), which adds one forward (74.4 TFLOP) on top.

With ``--quant fp8,int8,nvfp4`` the quantized path is measured instead, per format and depth, each phase in its
own process as ``dtc build`` runs it (recipes/flux-realwidth.yaml in bfloat16: 256x256 px, 64 text tokens; the
pipeline's tiny text encoders and VAE around the real-width transformer, all bf16):

- ``calibrate``: ModelOpt PTQ on the pipeline's own denoising runs (``quant.calibration.calibrate``, a fresh
  cache, so it calibrates);
- ``accuracy``: the held-out report (a): the unquantized trace, the calibrated state restored, the fake-quant
  trace and teacher-forced pass (``quant.accuracy``); the fake-quant trace is kept for ``parity``;
- ``export``: ``quant.export.export_quantized`` (streamed weights, Q/DQ rewrite), the state restored first;
- ``parity``: parity (b), the graph in onnxruntime against the fake-quant model, both in float32
  (``quant.parity.parity_report``);
- ``rtx``: the TensorRT-RTX engine (sm_89; nvfp4, svdquant: sm_120, the FP4 arch) for the recipe's profile.

Restoring the calibrated state is timed apart (``restore_s``) and not counted in a phase's wall time.

    python scripts/bench_scaling.py --depths 1,2,3,4 --out docs/bench/scaling.json
    python scripts/bench_scaling.py --quant fp8,int8,nvfp4 --depths 1,2,3,4 --out docs/bench/scaling-quant.json
    python scripts/bench_scaling.py --reanalyse docs/bench/scaling.json    # refit and replot saved rows

Results and their reading: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from dtcompile.models.builtins.flux import FLUX_DEV_WIDTHS

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("export", "rtx", "retype", "ort")
TIMED = ("export", "rtx", "ort")  # retype only prepares the onnxruntime graph
FLUX_DEV_BLOCKS = (19, 38)  # double, single

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev transformer/config.json) minus the depth.
REAL_WIDTH = FLUX_DEV_WIDTHS


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak() -> None:
    """Restart this process's RSS high-water mark (VmHWM; Linux), so ``phase_peak_mb`` covers one phase."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def phase_peak_mb() -> float:
    """VmHWM in MiB: the peak RSS since ``reset_peak`` (the process's peak where it cannot be reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mb()


# --- FLOP count -----------------------------------------------------------------------------------------------


def flux_step_flops(
    img_tokens: int = 4096,
    txt_tokens: int = 512,
    hidden: int = 3072,
    mlp_ratio: int = 4,
    double: int = 19,
    single: int = 38,
) -> dict[str, float]:
    """Multiply-adds x 2 of one FLUX transformer call (batch 1), per part; embedders and modulation are ignored.

    Double block, per stream (image and text tokens apart): qkv (3h^2), out proj (h^2), MLP (2 * 4h^2) per token;
    joint attention over all N tokens: QK^T and AV, 2 * N^2 * h each. Single block, per token: fused qkv + MLP in
    (3h + 4h) * h, fused out ((h + 4h) * h); the same attention.
    """
    n = img_tokens + txt_tokens
    h, m = hidden, mlp_ratio * hidden
    double_linear = 2 * n * h * (3 * h + h + 2 * m)
    single_linear = 2 * n * (h * (3 * h + m) + (h + m) * h)
    attention = 2 * (2 * n * n * h)
    return {
        "double_block": double_linear + attention,
        "single_block": single_linear + attention,
        "linear": double * double_linear + single * single_linear,
        "attention": (double + single) * attention,
        "total": double * (double_linear + attention) + single * (single_linear + attention),
    }


# --- workers (one phase each, in a subprocess) ------------------------------------------------------------------


def _shapes(opt_px: int) -> Any:
    from dtcompile.core.graph import Range, Shapes

    px = Range(768, opt_px, 1344) if opt_px >= 768 else Range(opt_px, opt_px, 1344)
    return Shapes(batch=Range(1, 1, 2), height=px, width=px, text_len=Range(512, 512, 512))


def _model(depth: int) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16: no fp32 copy at any time
    try:
        return FluxTransformer2DModel(num_layers=depth, num_single_layers=depth, **REAL_WIDTH).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def work_export(depth: int, work: Path, stream_weights: bool = False) -> dict[str, Any]:
    import torch

    from dtcompile.export.onnx import export_onnx
    from dtcompile.models.flux import FluxAdapter

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    model = _model(depth)
    init_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    double = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    single = sum(p.numel() for p in model.single_transformer_blocks[0].parameters())
    adapter = FluxAdapter()
    spec = adapter.export_spec(model, {"vae_scale_factor": 8}, _shapes(256), torch.bfloat16)
    t1, c1 = time.perf_counter(), time.process_time()
    art = export_onnx(
        adapter.export_module(model), spec, work, external_data=True, optimize=False, stream_weights=stream_weights
    )
    return {
        "init_s": init_s,
        "wall_s": time.perf_counter() - t1,
        "cpu_s": time.process_time() - c1,
        "import_rss_mb": rss0,
        "params": params,
        "params_double_block": double,
        "params_single_block": single,
        "onnx_bytes": art.size,
        "n_nodes": art.n_nodes,
    }


def work_rtx(depth: int, work: Path) -> dict[str, Any]:
    from dtcompile.backends.tensorrt import engine_from_onnx
    from dtcompile.models.flux import FluxAdapter

    rss0 = peak_rss_mb()
    profile = FluxAdapter().shape_profile(_ConfigOnly(depth), {"vae_scale_factor": 8}, _shapes(1024))
    t0, c0 = time.perf_counter(), time.process_time()
    info = engine_from_onnx(work / "transformer.onnx", profile, "sm_89", "tensorrt-rtx", work / "sm_89.engine")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    (work / "sm_89.engine").unlink()
    return {"wall_s": wall, "cpu_s": cpu, "import_rss_mb": rss0, "engine_bytes": info.size}


class _ConfigOnly:
    """Stands in for the transformer where only its ``config`` is read (FluxAdapter.shape_profile)."""

    def __init__(self, depth: int) -> None:
        self.config = {**REAL_WIDTH, "num_layers": depth, "num_single_layers": depth}


def work_retype(depth: int, work: Path) -> dict[str, Any]:
    """bf16 -> fp16 copy of the graph (initializers, Cast targets, constants, value types), weights streamed."""
    import numpy as np
    import onnx
    from onnx import TensorProto

    bf16, fp16 = TensorProto.BFLOAT16, TensorProto.FLOAT16
    t0 = time.perf_counter()
    src = work / "transformer.onnx"
    dst_dir = work / "fp16"
    dst_dir.mkdir(exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)

    def to_fp16(raw: bytes) -> bytes:
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float16).tobytes()

    def retype_tensor(t: onnx.TensorProto, data: Any, out: Any) -> None:
        if t.data_type != bf16:
            if t.data_location == TensorProto.EXTERNAL:  # copy as is into the new data file
                info = {e.key: e.value for e in t.external_data}
                data.seek(int(info.get("offset", 0)))
                raw = data.read(int(info["length"]))
                _set_external(t, out, raw)
            return
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            data.seek(int(info.get("offset", 0)))
            raw = data.read(int(info["length"]))
            t.data_type = fp16
            _set_external(t, out, to_fp16(raw))
        else:
            raw = t.raw_data if t.raw_data else np.array(t.int32_data, dtype=np.uint16).tobytes()
            del t.int32_data[:]
            t.data_type = fp16
            t.raw_data = to_fp16(raw)

    with open(work / "transformer.onnx.data", "rb") as data, open(dst_dir / "transformer.onnx.data", "wb") as out:
        for t in model.graph.initializer:
            retype_tensor(t, data, out)
        for node in model.graph.node:
            for a in node.attribute:
                if a.name == "to" and a.i == bf16:
                    a.i = fp16
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf16:
                    retype_tensor(a.t, data, out)
        for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            if v.type.tensor_type.elem_type == bf16:
                v.type.tensor_type.elem_type = fp16
    onnx.save(model, str(dst_dir / "transformer.onnx"))
    return {"wall_s": time.perf_counter() - t0}


def _set_external(t: Any, out: Any, raw: bytes) -> None:
    out.write(b"\0" * (-out.tell() % 64))  # aligned, like export_onnx's data file
    offset = out.tell()
    out.write(raw)
    del t.external_data[:]
    for key, value in (("location", "transformer.onnx.data"), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def work_ort(depth: int, work: Path) -> dict[str, Any]:
    from dtcompile.backends.onnxruntime import OrtRunner

    rss0 = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    runner = OrtRunner(work / "fp16" / "transformer.onnx")  # optimization "all", as `dtc run` uses
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del runner
    return {"wall_s": wall, "cpu_s": cpu, "import_rss_mb": rss0}


WORKERS = {"export": work_export, "rtx": work_rtx, "retype": work_retype, "ort": work_ort}


# --- quantized path (--quant): one phase per process, as `dtc build` runs it ------------------------------------

QUANT_PHASES = ("calibrate", "accuracy", "export", "parity", "rtx")
QUANT_FORMATS = ("fp8", "int8", "nvfp4", "svdquant")
QUANT_ARCH = {"fp8": "sm_89", "int8": "sm_89", "nvfp4": "sm_120", "svdquant": "sm_120"}  # RTX's FP4 arch: sm_120
# Small on purpose: a calibration forward and an accuracy forward cost what they cost at any count; the
# per-forward figures (``per_forward_s``) scale to a real recipe's prompts x steps.
QUANT_CALIB = {"prompts": "builtin", "size": 1, "batch": 1, "steps": 2, "seed": 0}
QUANT_ACCURACY = {"prompts": 1, "steps": 1}


def _quant_recipe(fmt: str) -> Any:
    from dtcompile.recipe import load_recipe

    quant: dict[str, Any] = {"format": fmt, "calib": QUANT_CALIB, "accuracy": QUANT_ACCURACY}
    if fmt == "fp8":
        quant["quantize_mha"] = True
    overrides = [
        "dtype=bfloat16",
        "engine.backends=[tensorrt-rtx]",
        f"engine.targets=[{QUANT_ARCH[fmt]}]",
        "quant=" + json.dumps(quant),
    ]
    return load_recipe(ROOT / "recipes" / "flux-realwidth.yaml", overrides)


def _quant_pipeline(depth: int) -> tuple[Any, dict[str, Any]]:
    """recipes/flux-realwidth.yaml's pipeline (tiny encoders and VAE) with a depth-d transformer, made in bf16
    (no float32 copy at any time; the same seeds give the same weights in every process) and its sizes."""
    import torch

    from dtcompile.models.builtins.flux import REALWIDTH_FLUX_CONFIG, build_tiny_flux

    blocks = {"num_layers": depth, "num_single_layers": depth}
    config = {**REALWIDTH_FLUX_CONFIG, "transformer": {**REALWIDTH_FLUX_CONFIG["transformer"], **blocks}}
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    try:
        pipe = build_tiny_flux(0, config)
    finally:
        torch.set_default_dtype(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    info = {
        "init_s": time.perf_counter() - t0,
        "params": sum(p.numel() for p in model.parameters()),
        "params_double_block": sum(p.numel() for p in model.transformer_blocks[0].parameters()),
        "params_single_block": sum(p.numel() for p in model.single_transformer_blocks[0].parameters()),
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }
    return pipe, info


def _size(recipe: Any) -> dict[str, int]:
    s = recipe.export.shapes
    return {"height": s.height.opt, "width": s.width.opt, "max_sequence_length": s.text_len.opt}


def _calibrated(recipe: Any, pipe: Any, depth: int, work: Path) -> Any:
    """Calibrate ``pipe.transformer`` in place, or restore its state from ``work``'s calibration cache."""
    import hashlib

    from dtcompile.models.flux import FluxAdapter
    from dtcompile.quant.calibration import calibrate

    key = hashlib.sha256(f"bench_scaling flux depth {depth} seed 0".encode()).hexdigest()
    return calibrate(pipe, FluxAdapter(), recipe.quant, work / "calib", component_sha256=key, **_size(recipe))


def _restored(recipe: Any, pipe: Any, depth: int, work: Path) -> float:
    t0 = time.perf_counter()
    if not _calibrated(recipe, pipe, depth, work).cache_hit:
        raise RuntimeError("no calibrated state to restore: run the calibrate phase first")
    return time.perf_counter() - t0


def qwork_calibrate(fmt: str, depth: int, work: Path) -> dict[str, Any]:
    shutil.rmtree(work / "calib", ignore_errors=True)  # this phase measures calibrating, never a restore
    recipe = _quant_recipe(fmt)
    pipe, info = _quant_pipeline(depth)
    t0, c0 = time.perf_counter(), time.process_time()
    reset_peak()
    result = _calibrated(recipe, pipe, depth, work)
    wall, cpu, peak = time.perf_counter() - t0, time.process_time() - c0, phase_peak_mb()
    forwards = QUANT_CALIB["size"] * QUANT_CALIB["steps"]
    return {**info, "wall_s": wall, "cpu_s": cpu, "phase_peak_mb": peak, "forwards": forwards, "per_forward_s": wall / forwards,
            "cache_hit": result.cache_hit, "quantizers": result.enabled_quantizers}  # fmt: skip


def qwork_accuracy(fmt: str, depth: int, work: Path) -> dict[str, Any]:
    import torch

    from dtcompile.models.flux import FluxAdapter
    from dtcompile.quant.accuracy import HELDOUT_PROMPTS, accuracy_report, trace_pipeline

    recipe = _quant_recipe(fmt)
    pipe, info = _quant_pipeline(depth)
    adapter, acc = FluxAdapter(), recipe.quant.accuracy
    reset_peak()  # the phase's peak covers the restore between its two parts too
    t0, c0 = time.perf_counter(), time.process_time()
    reference = trace_pipeline(pipe, adapter, HELDOUT_PROMPTS[: acc.prompts], steps=acc.steps,
                               seed=recipe.quant.calib.seed, label="accuracy unquantized", **_size(recipe))  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    restore_s = _restored(recipe, pipe, depth, work)
    t0, c0 = time.perf_counter(), time.process_time()
    report, trace = accuracy_report(pipe, adapter, reference, label="accuracy quantized")
    wall, cpu, peak = wall + time.perf_counter() - t0, cpu + time.process_time() - c0, phase_peak_mb()
    torch.save(trace, work / "trace.pt")
    forwards = 3 * acc.prompts * acc.steps  # unquantized, fake-quant, teacher-forced
    return {**info, "wall_s": wall, "cpu_s": cpu, "phase_peak_mb": peak, "restore_s": restore_s, "forwards": forwards,
            "per_forward_s": wall / forwards, "min_cos": report.min_cos, "max_rel_err": report.max_rel_err}  # fmt: skip


def qwork_export(fmt: str, depth: int, work: Path) -> dict[str, Any]:
    import dataclasses

    import torch

    from dtcompile.attention.modes import resolve_attention
    from dtcompile.attention.router import export_attention
    from dtcompile.core.progress import rss_bytes
    from dtcompile.models.flux import FluxAdapter
    from dtcompile.quant.export import export_quantized
    from dtcompile.stages.export import adapter_patches, shapes_from_recipe

    recipe = _quant_recipe(fmt)
    pipe, info = _quant_pipeline(depth)
    restore_s = _restored(recipe, pipe, depth, work)
    adapter, module = FluxAdapter(), pipe.transformer
    shapes = shapes_from_recipe(recipe.export.shapes)
    spec = adapter.export_spec(module, adapter.pipe_config(pipe), shapes, torch.bfloat16)
    spec = dataclasses.replace(spec, opset=recipe.export.opset)
    attention = resolve_attention(recipe, [("tensorrt-rtx", QUANT_ARCH[fmt])])
    start_mb = rss_bytes() / 2**20
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    with export_attention(attention.mode):
        q = export_quantized(adapter.export_module(module), spec, work / "onnx", "transformer", quant_format=fmt,
                             dtype="bfloat16", patches=adapter_patches(adapter))  # fmt: skip
    wall, cpu, peak = time.perf_counter() - t0, time.process_time() - c0, phase_peak_mb()
    return {**info, "wall_s": wall, "cpu_s": cpu, "phase_peak_mb": peak, "restore_s": restore_s, "start_rss_mb": start_mb,
            "onnx_bytes": q.artifact.size, "n_nodes": q.artifact.n_nodes, "attention": attention.mode,
            "qdq": q.to_manifest()}  # fmt: skip


def qwork_parity(fmt: str, depth: int, work: Path) -> dict[str, Any]:
    import torch

    from dtcompile.core.progress import rss_bytes
    from dtcompile.models.flux import FluxAdapter
    from dtcompile.quant.parity import parity_report

    recipe = _quant_recipe(fmt)
    pipe, info = _quant_pipeline(depth)
    restore_s = _restored(recipe, pipe, depth, work)
    trace = torch.load(work / "trace.pt", weights_only=False)  # written by this script's accuracy phase
    start_mb = rss_bytes() / 2**20
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    result = parity_report(pipe, FluxAdapter(), trace, work / "onnx" / "transformer.onnx", fmt)
    wall, cpu, peak = time.perf_counter() - t0, time.process_time() - c0, phase_peak_mb()
    e2e = result.end_to_end
    return {**info, "wall_s": wall, "cpu_s": cpu, "phase_peak_mb": peak, "restore_s": restore_s, "start_rss_mb": start_mb,
            "max_rel_err": result.report.max_rel_err, "tolerance": result.tolerance,
            "noise": result.noise.max_rel_err if result.noise is not None else None,
            "gate": result.noise.gate(result.tolerance) if result.noise is not None else result.tolerance,
            "end_to_end_max_rel_err": e2e.max_rel_err if e2e is not None else None}  # fmt: skip


def qwork_rtx(fmt: str, depth: int, work: Path) -> dict[str, Any]:
    from dtcompile.backends.tensorrt import engine_from_onnx
    from dtcompile.models.flux import FluxAdapter
    from dtcompile.stages.export import shapes_from_recipe

    recipe = _quant_recipe(fmt)
    arch = QUANT_ARCH[fmt]
    shapes = shapes_from_recipe(recipe.export.shapes)
    profile = FluxAdapter().shape_profile(_ConfigOnly(depth), {"vae_scale_factor": 8}, shapes)
    out = work / f"{arch}.engine"
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    info = engine_from_onnx(work / "onnx" / "transformer.onnx", profile, arch, "tensorrt-rtx", out,
                            opt_level=recipe.engine.opt_level)  # fmt: skip
    wall, cpu, peak = time.perf_counter() - t0, time.process_time() - c0, phase_peak_mb()
    out.unlink()
    return {"wall_s": wall, "cpu_s": cpu, "phase_peak_mb": peak, "arch": arch, "engine_bytes": info.size}


QUANT_WORKERS = {"calibrate": qwork_calibrate, "accuracy": qwork_accuracy, "export": qwork_export,
                 "parity": qwork_parity, "rtx": qwork_rtx}  # fmt: skip


def worker_main(phase: str, depth: int, work: Path, fmt: str | None = None, stream: bool = False) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    if fmt:
        result = QUANT_WORKERS[phase](fmt, depth, work)
    elif phase == "export":
        result = work_export(depth, work, stream_weights=stream)
    else:
        result = WORKERS[phase](depth, work)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# --- driver -------------------------------------------------------------------------------------------------------


def run_phase(
    phase: str, depth: int, work: Path, timeout: float, fmt: str | None = None, stream: bool = False
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", phase, "--depth", str(depth), "--work", str(work)]
    cmd += (["--format", fmt] if fmt else []) + (["--stream-weights"] if stream else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "process_s": time.perf_counter() - t0}
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "process_s": time.perf_counter() - t0}


def predict(rows: list[dict[str, Any]], depth: int, phases: list[str]) -> tuple[float, float]:
    """Predicted (largest phase peak RSS in MB, total seconds) at ``depth``: a line through the measured depths
    (proportional scaling from one depth), never below the last measurement."""
    peak = secs = 0.0
    for phase in phases:
        pts = [(r["depth"], r[phase]) for r in rows if "error" not in r.get(phase, {"error": 1})]
        if not pts:
            continue
        for metric in ("peak_rss_mb", "process_s"):
            a, b = fit_line([float(d) for d, _ in pts], [m[metric] for _, m in pts])
            value = max(a * depth + b, pts[-1][1][metric])
            if metric == "peak_rss_mb":
                peak = max(peak, value)
            else:
                secs += value
    return peak, secs


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of y = a * x + b (a single point: slope through the origin)."""
    n = len(x)
    if n == 1:
        return y[0] / x[0], 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    a = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx
    return a, my - a * mx


def fit_phase(
    rows: list[dict[str, Any]], phase: str, metric: str, units_per_depth: float, flux_units: float
) -> dict[str, Any]:
    """Least-squares line of ``metric`` against units (depth x ``units_per_depth``) over the rows that measured
    it, its value at ``flux_units`` and the marginal cost per unit between consecutive depths ({} with fewer
    than two depths: no line to fit)."""
    used = [r for r in rows if metric in r.get(phase, {})]
    pts = [(r["depth"] * units_per_depth, float(r[phase][metric])) for r in used]
    if len({x for x, _ in pts}) < 2:
        return {}
    a, b = fit_line([p[0] for p in pts], [p[1] for p in pts])
    return {
        "slope_per_double_block": a,
        "intercept": b,
        "max_abs_residual": max(abs(y - (a * x + b)) for x, y in pts),
        "flux_dev": a * flux_units + b,
        "depths": [r["depth"] for r in used],
        "marginal": [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False)],
    }


def analyse_quant(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per format, ``analyse``'s fits for every quantized phase (plus seconds per forward for calibration and
    accuracy), and each depth's phase peak RSS (``phase_peak_mb``: the process's RSS, pipeline included, at
    its highest during the phase) over the transformer's bf16 weights, measured and at FLUX.1-dev."""
    out: dict[str, Any] = {}
    for fmt in dict.fromkeys(r["format"] for r in rows):
        ok = [r for r in rows if r["format"] == fmt and "params" in r.get("calibrate", {})]
        if not ok:
            continue
        first = ok[0]["calibrate"]
        ratio = first["params_single_block"] / first["params_double_block"]
        flux_units = FLUX_DEV_BLOCKS[0] + FLUX_DEV_BLOCKS[1] * ratio
        extra = (FLUX_DEV_BLOCKS[0] - ok[0]["depth"]) * first["params_double_block"]
        extra += (FLUX_DEV_BLOCKS[1] - ok[0]["depth"]) * first["params_single_block"]
        flux_weights_mb = (first["params"] + extra) * 2 / 2**20
        fits: dict[str, Any] = {}
        for phase in QUANT_PHASES:
            for metric in ("wall_s", "cpu_s", "peak_rss_mb", "phase_peak_mb", "per_forward_s"):
                fit = fit_phase(ok, phase, metric, 1 + ratio, flux_units)
                if fit:
                    fits[f"{phase}.{metric}"] = fit
        over = {
            phase: {str(r["depth"]): r[phase]["phase_peak_mb"] / r["calibrate"]["weights_mb"] for r in ok
                    if "phase_peak_mb" in r.get(phase, {})}
            for phase in QUANT_PHASES
        }  # fmt: skip
        at_flux = {
            phase: fits[f"{phase}.phase_peak_mb"]["flux_dev"] / flux_weights_mb
            for phase in QUANT_PHASES
            if f"{phase}.phase_peak_mb" in fits
        }
        out[fmt] = {
            "single_over_double": ratio,
            "flux_dev_units": flux_units,
            "flux_dev_weights_mb": flux_weights_mb,
            "peak_over_bf16_weights": over,
            "flux_dev_peak_over_bf16_weights": at_flux,
            "fits": fits,
        }
    return out


def _noise_gate(parity: dict[str, Any]) -> str:
    """`` (noise N, gate G)`` where the parity phase measured the model's own rounding noise."""
    if parity.get("noise") is None:
        return ""
    return f" (noise {parity['noise']:.2e}, gate {parity['gate']:.2e})"


def markdown_quant(result: dict[str, Any]) -> str:
    """docs/benchmarks.md's tables of a ``--quant`` run: every row measured, then the fits at FLUX.1-dev."""
    gib = 1024.0
    lines = [
        "| format | depth | ONNX GiB | calibrate s/fwd (CPU) | accuracy s/fwd (CPU) | export wall / CPU s | "
        "phase peak GiB (x bf16 weights): calibrate, accuracy, export, parity, RTX | parity (b) max rel err "
        "(own noise, gate) | "
        "RTX wall / CPU s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["rows"]:
        if "skipped" in r or "calibrate" not in r or "error" in r["calibrate"]:
            continue
        w = r["calibrate"]["weights_mb"]

        def peak(phase: str, row: dict[str, Any] = r, weights: float = w) -> str:
            m = row.get(phase, {})
            if "phase_peak_mb" not in m:
                return "-"
            return f"{m['phase_peak_mb'] / gib:.2f} ({m['phase_peak_mb'] / weights:.2f}x)"

        def get(phase: str, key: str, fmt: str, row: dict[str, Any] = r) -> str:
            value = row.get(phase, {}).get(key)
            return "-" if value is None else format(value, fmt)

        cal, acc = r["calibrate"], r.get("accuracy", {})
        per_cal = f"{cal['cpu_s'] / cal['forwards']:.1f}"
        per_acc = f"{acc['cpu_s'] / acc['forwards']:.1f}" if "cpu_s" in acc else "-"
        lines.append(
            f"| {r['format']} | {r['depth']}+{r['depth']} | {r.get('export', {}).get('onnx_bytes', 0) / 2**30:.2f} | "
            f"{per_cal} | {per_acc} | "
            f"{get('export', 'wall_s', '.0f')} / {get('export', 'cpu_s', '.0f')} | "
            + ", ".join(peak(p) for p in QUANT_PHASES)
            + f" | {get('parity', 'max_rel_err', '.2e')}{_noise_gate(r.get('parity', {}))} | "
            f"{get('rtx', 'wall_s', '.0f')} / {get('rtx', 'cpu_s', '.0f')} |"
        )
    lines += [
        "",
        "| format | phase | per double block: CPU s / peak MiB | FLUX.1-dev CPU time | FLUX.1-dev peak GiB | "
        "/ bf16 weights (22.2 GiB) | marginal peak MiB per unit, depth by depth |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for fmt, a in result.get("analysis", {}).items():
        for phase in QUANT_PHASES:
            cpu, pk = a["fits"].get(f"{phase}.cpu_s"), a["fits"].get(f"{phase}.phase_peak_mb")
            if not cpu or not pk:
                continue
            per_fwd = a["fits"].get(f"{phase}.per_forward_s")
            flux_cpu = f"{cpu['flux_dev'] / 60:.1f} min" + (" (all its forwards)" if per_fwd else "")
            lines.append(
                f"| {fmt} | {phase} | {cpu['slope_per_double_block']:.1f} s / {pk['slope_per_double_block']:.0f} | "
                f"{flux_cpu} | {pk['flux_dev'] / gib:.1f} | {pk['flux_dev'] / a['flux_dev_weights_mb']:.2f}x | "
                + ", ".join(f"{m:.0f}" for m in pk["marginal"])
                + " |"
            )
    return "\n".join(lines)


def export_regime(row: dict[str, Any]) -> str:
    """How torch's exporter handled the depth: graphs of 2 GiB or more stream each tensor to its own file
    ("streamed", FLUX.1-dev's path); smaller ones are serialized in memory first ("in-memory")."""
    return "streamed" if row["export"]["onnx_bytes"] >= 2**31 else "in-memory"


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit cost = a * units + b per phase and metric, where units counts blocks weighted by parameters.

    One depth-d model has d double and d single blocks; the unit is one double block, a single block counts
    params_single / params_double of one. FLUX.1-dev then has 19 + 38 * ratio units. The export is fitted on
    the streamed depths only when there are two or more (the in-memory path has other costs and FLUX.1-dev
    never takes it). ``marginal`` is the cost per unit between consecutive depths: growth faster than linear
    shows as a marginal cost that rises with depth.
    """
    ok = [r for r in rows if "error" not in r["export"]]
    if not ok:
        return {}
    p_double = ok[0]["export"]["params_double_block"]
    p_single = ok[0]["export"]["params_single_block"]
    ratio = p_single / p_double
    flux_units = FLUX_DEV_BLOCKS[0] + FLUX_DEV_BLOCKS[1] * ratio
    fits: dict[str, Any] = {}
    for phase in TIMED:
        used = ok
        streamed = [r for r in ok if export_regime(r) == "streamed"]
        if phase == "export" and len(streamed) >= 2:
            used = streamed
        for metric in ("wall_s", "cpu_s", "peak_rss_mb"):
            fit = fit_phase(used, phase, metric, 1 + ratio, flux_units)
            if fit:
                fits[f"{phase}.{metric}"] = fit
    params_flux = ok[0]["export"]["params"] + (FLUX_DEV_BLOCKS[0] - ok[0]["depth"]) * p_double
    params_flux += (FLUX_DEV_BLOCKS[1] - ok[0]["depth"]) * p_single
    return {
        "params_double_block": p_double,
        "params_single_block": p_single,
        "single_over_double": ratio,
        "flux_dev_units": flux_units,
        "flux_dev_params": params_flux,
        "export_regime": {str(r["depth"]): export_regime(r) for r in ok},
        "fits": fits,
    }


def plot(result: dict[str, Any], png: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'dtcompile[bench]'); no PNG written"
    rows = [r for r in result["rows"] if "error" not in r["export"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (
        ("wall_s", 1, "wall time (s)"),
        ("cpu_s", 1, "CPU time, all threads (s)"),
        ("peak_rss_mb", 1024, "peak RSS (GiB)"),
    )
    for ax, (metric, div, label) in zip(axes, panels, strict=True):
        for phase in TIMED:
            pts = [(r["depth"], r[phase][metric] / div) for r in rows if metric in r.get(phase, {})]
            if not pts:
                continue
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=phase)
            if phase == "export":  # hollow: graphs under 2 GiB, which the exporter serializes in memory
                small = [(r["depth"], r[phase][metric] / div) for r in rows if export_regime(r) == "in-memory"]
                ax.plot([p[0] for p in small], [p[1] for p in small], "o", mfc="white", color=line.get_color())
        ax.set(xlabel="depth d (d double + d single blocks)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        "FLUX transformer at real widths (bf16): export, TensorRT-RTX sm_89 build, onnxruntime load "
        "(hollow: export under 2 GiB, serialized in memory)"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="1,2,3,4", help="comma-separated depths d (d double + d single blocks)")
    ap.add_argument(
        "--quant", metavar="FORMATS", help=f"measure the quantized path for these formats ({','.join(QUANT_FORMATS)})"
    )
    ap.add_argument("--max-rss-gib", type=float, default=20.0, help="skip a depth predicted to peak above this")
    ap.add_argument("--budget-min", type=float, default=25.0, help="skip a depth predicted to end past this")
    ap.add_argument(
        "--phases", default=None, help=f"default: {','.join(PHASES)}; with --quant {','.join(QUANT_PHASES)}"
    )
    ap.add_argument("--work", default=None, help="scratch folder, kept (default: a temp folder, removed at the end)")
    ap.add_argument("--out", default=None, help="JSON (default docs/bench/scaling.json; --quant: scaling-quant.json)")
    ap.add_argument("--update", action="store_true", help="merge this run's phases into --out's rows")
    ap.add_argument(
        "--stream-weights",
        action="store_true",
        help="bf16 export: keep the weights out of torch's exporter (export_onnx stream_weights, as dtc build "
        "does past 1.5 GiB) instead of letting torch write them",
    )
    ap.add_argument("--reanalyse", metavar="JSON", help="recompute the fits and the plot of an earlier run's JSON")
    ap.add_argument("--worker", choices=sorted({*PHASES, *QUANT_PHASES}), help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--format", choices=QUANT_FORMATS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker, args.depth, Path(args.work), args.format, args.stream_weights)
        return
    if args.reanalyse:
        path = Path(args.reanalyse)
        result = json.loads(path.read_text())
        _analysed(result)
        path.write_text(json.dumps(result, indent=1) + "\n")
        note = None if "quant" in result else plot(result, path.with_suffix(".png"))
        print(note or f"wrote {path}")
        if "quant" in result:
            print(markdown_quant(result))
        return

    import tempfile

    formats = [f for f in args.quant.split(",") if f] if args.quant else []
    bad = sorted(set(formats) - set(QUANT_FORMATS))
    if bad:
        ap.error(f"--quant: unknown format(s) {bad}; choose from {list(QUANT_FORMATS)}")
    all_phases = QUANT_PHASES if formats else PHASES
    phases = [p for p in all_phases if p in (args.phases or ",".join(all_phases)).split(",")]
    default_out = "scaling-quant.json" if formats else "scaling.json"
    out = Path(args.out or ROOT / "docs" / "bench" / default_out)
    base = Path(args.work or tempfile.mkdtemp(prefix="dtc-scaling-"))
    rows = measure([int(d) for d in args.depths.split(",")], formats or [None], phases, base, args)
    if not args.work:
        shutil.rmtree(base, ignore_errors=True)
    command = "python " + " ".join(
        [str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]]
    )
    if args.update and out.is_file():
        result = json.loads(out.read_text())
        result["rows"] = merge_rows(result["rows"], rows)
        result["command"] = [*([result["command"]] if isinstance(result["command"], str) else result["command"]),
                             command]  # fmt: skip
    else:
        result = {
            "date": date.today().isoformat(),
            "machine": {
                "cpu": _cpu_name(),
                "cores": os.cpu_count(),
                "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                "python": platform.python_version(),
                "shared": "other jobs ran on the same cores at the same time; wall times are upper bounds",
            },
            "command": command,
            "dtype": "bfloat16 (export, tensorrt-rtx); float16 retype for onnxruntime",
            "config": {**REAL_WIDTH, "axes_dims_rope": list(REAL_WIDTH["axes_dims_rope"])},
            "rows": rows,
            "versions": _versions(),
        }
        if formats:
            result["dtype"] = "bfloat16 (recipes/flux-realwidth.yaml with dtype=bfloat16)"
            result["quant"] = {"calib": QUANT_CALIB, "accuracy": QUANT_ACCURACY, "arch": QUANT_ARCH}
    _analysed(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not formats:
        note = plot(result, out.with_suffix(".png"))
        print(note or f"wrote {out.with_suffix('.png')}")


def _analysed(result: dict[str, Any]) -> None:
    rows = [r for r in result["rows"] if "skipped" not in r]
    if "quant" in result:
        result["analysis"] = analyse_quant(rows)
    else:
        result["analysis"] = analyse(rows)
        result["flops_1024px_step"] = flux_step_flops()


def measure(
    depths: list[int], formats: list[str | None], phases: list[str], base: Path, args: Any
) -> list[dict[str, Any]]:
    """Run every phase of every (depth, format) in its own process, depth by depth; stop a series before a depth
    predicted to exceed ``--max-rss-gib`` or end past ``--budget-min``, and after a failed phase."""
    rows: list[dict[str, Any]] = []
    stopped: set[str | None] = set()
    t_start = time.perf_counter()
    for depth in depths:
        for fmt in formats:
            if fmt in stopped:
                continue
            series = [r for r in rows if r.get("format") == fmt and "skipped" not in r]
            if series:
                peak, secs = predict(series, depth, phases)
                elapsed = time.perf_counter() - t_start
                if peak / 1024 > args.max_rss_gib or (elapsed + secs) / 60 > args.budget_min:
                    print(
                        f"{fmt or 'bf16'} depth {depth}: skipped (predicted peak {peak / 1024:.1f} GiB, "
                        f"{secs / 60:.1f} min; limits {args.max_rss_gib} GiB, {args.budget_min} min total)",
                        flush=True,
                    )
                    rows.append({**_label(fmt), "depth": depth, "skipped": {"predicted_peak_gib": peak / 1024,
                                                                             "predicted_s": secs}})  # fmt: skip
                    stopped.add(fmt)
                    continue
            work = base / f"d{depth}" / (fmt or "bf16")
            work.mkdir(parents=True, exist_ok=True)
            row: dict[str, Any] = {**_label(fmt), "depth": depth}
            for phase in phases:
                res = run_phase(phase, depth, work, timeout=3600, fmt=fmt, stream=args.stream_weights)
                row[phase] = res
                msg = res.get("error") or (
                    f"{res['wall_s']:.1f} s wall, {res.get('cpu_s', 0):.1f} s CPU, "
                    f"peak RSS {res['peak_rss_mb'] / 1024:.2f} GiB"
                )
                print(f"{fmt or 'bf16'} depth {depth} {phase:<9} {msg}", flush=True)
                if "error" in res:
                    stopped.add(fmt)
                    break
            rows.append(row)
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    return rows


def _label(fmt: str | None) -> dict[str, str]:
    return {"format": fmt} if fmt else {}


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with each (format, depth) row's phases replaced or added from ``new``'s row of the same key."""
    index = {(r.get("format"), r["depth"]): r for r in old}
    for row in new:
        key = (row.get("format"), row["depth"])
        if key in index and "skipped" not in row:
            index[key].update({k: v for k, v in row.items() if k not in ("format", "depth")})
        elif key not in index:
            old.append(row)
    return old


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str | None]:
    from dtcompile.core.versions import tool_versions

    return tool_versions()


if __name__ == "__main__":
    main()
