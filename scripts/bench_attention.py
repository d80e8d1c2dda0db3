#!/usr/bin/env python
"""Benchmark of export.attention (native | plugin | decomposed) on FLUX-architecture transformers.

For each model (``tiny``: the built-in tiny FLUX; ``real-width``: FLUX.1's widths with 1 double + 1 single block)
and each mode, the transformer is exported with dtcompile's export patch and the graph is checked (one node per
attention call). Then, where a backend can run it on this machine:

- onnxruntime (CPU): median latency over ``--repeat`` runs and the noise prediction's relative L2 error against
  the decomposed export (and against torch);
- tensorrt-rtx: engine build for each ``--arch`` (time and size; building needs no GPU, running does).

The plugin graph runs on neither (onnxruntime has no kernel for ``dtc::FusedAttention``; TensorRT-RTX cannot
serve a Python plugin): the script records why. GPU latencies need a GPU and datacenter TensorRT.

    python scripts/bench_attention.py --models tiny real-width --attention-only --json /tmp/bench-attention.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dtcompile.models.builtins.flux import FLUX_DEV_WIDTHS

REAL_WIDTH = {**FLUX_DEV_WIDTHS, "num_layers": 1, "num_single_layers": 1}  # FLUX.1-dev widths (dtcompile.models.flux)


def build_model(name: str, dtype: Any) -> tuple[Any, int]:
    """(transformer, vae_scale_factor) for ``name``: seeded random weights, eval mode, in ``dtype``."""
    import torch

    if name == "tiny":
        from dtcompile.models.builtins.flux import build_tiny_flux

        pipe = build_tiny_flux()
        return pipe.transformer.to(dtype).eval(), int(pipe.vae_scale_factor)
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**REAL_WIDTH)
    return model.to(dtype).eval(), 8


def export_and_check(model: Any, vsf: int, mode: str, dtype: Any, tokens: int, text_len: int, out: Path) -> dict:
    """Export with ``mode``; returns the graph facts and the ExportSpec/wrapper for running it."""
    from dtcompile.attention.router import export_attention
    from dtcompile.core.graph import Range, Shapes
    from dtcompile.export.onnx import export_onnx
    from dtcompile.models.flux import FluxAdapter

    side = int(round(tokens**0.5)) * 2 * vsf
    shapes = Shapes(
        batch=Range(1, 1, 1), height=Range(side, side, side), width=Range(side, side, side),
        text_len=Range(text_len, text_len, text_len),
    )  # fmt: skip
    adapter = FluxAdapter()
    pipe_config = {"vae_scale_factor": vsf}
    spec = dataclasses.replace(adapter.export_spec(model, pipe_config, shapes, dtype), opset=23)
    wrapper = adapter.export_module(model)
    t0 = time.perf_counter()
    with export_attention(mode) as trace:
        art = export_onnx(wrapper, spec, out / mode, name="transformer")
    facts = trace.check_graph(art.op_types)
    return {
        "export_s": round(time.perf_counter() - t0, 1),
        "onnx_mb": round(art.size / 2**20, 1),
        "nodes": facts["nodes"],
        "calls": facts["calls"],
        "path": art.path,
        "spec": spec,
        "wrapper": wrapper,
        "profile": adapter.shape_profile(model, pipe_config, shapes),
    }


def ort_latency(path: Path, feed: dict, repeat: int) -> tuple[Any, float]:
    """(output, median seconds) of onnxruntime CPU on ``feed`` (one warm-up run first)."""
    from dtcompile.backends.onnxruntime import OrtRunner

    runner = OrtRunner(path, optimization="all")
    out = runner(feed)["latent"]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        runner(feed)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def rtx_build(path: Path, profile: Any, arch: str, out: Path) -> dict:
    from dtcompile.backends.tensorrt import engine_from_onnx
    from dtcompile.core.errors import DtcError

    try:
        info = engine_from_onnx(path, profile, arch, "tensorrt-rtx", out / f"{arch}.engine")
    except DtcError as exc:
        return {"built": False, "reason": str(exc)[:300]}
    return {"built": True, "build_s": round(info.build_s, 1), "engine_mb": round(info.size / 2**20, 1)}


def run(models: list[str], dtypes: list[str], archs: list[str], repeat: int, text_len: int, tokens: int) -> dict:
    import torch

    from dtcompile.attention.modes import RTX_PLUGIN_REASON
    from dtcompile.core.metrics import rel_l2

    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU",
        "versions": _versions(),
        "rows": [],
    }
    for name in models:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            model, vsf = build_model(name, dtype)
            n_tok = 256 if name == "tiny" else tokens
            t_len = 32 if name == "tiny" else text_len
            with tempfile.TemporaryDirectory(prefix="dtc-bench-attn-") as tmp:
                outs: dict[str, Any] = {}
                ref = None
                for mode in ("decomposed", "native", "plugin"):
                    print(f"[{name} {dtype_name}] {mode}: export ...", file=sys.stderr, flush=True)
                    ex = export_and_check(model, vsf, mode, dtype, n_tok, t_len, Path(tmp))
                    row: dict[str, Any] = {
                        "model": name, "dtype": dtype_name, "mode": mode, "img_tokens": n_tok, "text_len": t_len,
                        **{k: ex[k] for k in ("export_s", "onnx_mb", "nodes")},
                    }  # fmt: skip
                    feed = dict(ex["spec"].example_inputs)
                    if ref is None:
                        with torch.no_grad():
                            ref = ex["wrapper"](*feed.values())
                    if mode == "plugin":
                        row["onnxruntime"] = "not run: no kernel for dtc::FusedAttention"
                        row["tensorrt-rtx"] = f"not built: {RTX_PLUGIN_REASON.split(':')[0]}"
                    else:
                        print(f"[{name} {dtype_name}] {mode}: onnxruntime ...", file=sys.stderr, flush=True)
                        out, median = ort_latency(ex["path"], feed, repeat)
                        outs[mode] = out
                        row["ort_ms"] = round(median * 1e3, 1)
                        row["rel_vs_torch"] = float(f"{rel_l2(out, ref):.2e}")
                        if mode != "decomposed":
                            row["rel_vs_decomposed"] = float(f"{rel_l2(out, outs['decomposed']):.2e}")
                        if dtype_name != "float32" or mode == "decomposed":
                            for arch in archs:
                                print(f"[{name} {dtype_name}] {mode}: tensorrt-rtx {arch} ...", file=sys.stderr)
                                row[f"rtx_{arch}"] = rtx_build(ex["path"], ex["profile"], arch, Path(tmp) / mode)
                        else:
                            row["tensorrt-rtx"] = "not built: no fp32 fused attention kernel (see docs/attention.md)"
                    results["rows"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            del model
    return results


def attention_only(dtypes: list[str], seq: int, repeat: int) -> list[dict]:
    """onnxruntime latency of one attention at FLUX.1's shape (24 heads x 128, ``seq`` tokens) per mode."""
    import torch

    from dtcompile.attention.router import attention, export_attention
    from dtcompile.core.metrics import rel_l2

    class One(torch.nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q, k, v, mode=self.mode)

    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 24, seq, 128, generator=gen).to(dtype) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        with tempfile.TemporaryDirectory(prefix="dtc-bench-attn1-") as tmp:
            for mode in ("decomposed", "native"):
                path = Path(tmp) / f"{mode}.onnx"
                with export_attention(mode), torch.no_grad():
                    torch.onnx.export(One(mode), (q, k, v), str(path), input_names=["q", "k", "v"],
                                      output_names=["latent"], opset_version=23, dynamo=False)  # fmt: skip
                out, median = ort_latency(path, {"q": q, "k": k, "v": v}, repeat)
                rows.append({"shape": [1, 24, seq, 128], "dtype": dtype_name, "mode": mode,
                             "ort_ms": round(median * 1e3, 1), "rel_vs_fp32_sdpa": float(f"{rel_l2(out, ref):.2e}")})  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "diffusers", "onnxruntime", "tensorrt-rtx-cu13", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["tiny", "real-width"], choices=["tiny", "real-width"])
    ap.add_argument("--dtypes", nargs="+", default=["float16"], choices=["float16", "float32"])
    ap.add_argument("--arch", nargs="*", default=["sm_89", "sm_120"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--img-tokens", type=int, default=1024, help="real-width image tokens (a square number)")
    ap.add_argument("--text-len", type=int, default=512, help="real-width text tokens")
    ap.add_argument("--attention-only", action="store_true", help="also time one attention at FLUX.1's shape")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    results = run(args.models, args.dtypes, args.arch, args.repeat, args.text_len, args.img_tokens)
    if args.attention_only:
        results["attention_only"] = attention_only(["float32", "float16"], args.img_tokens + args.text_len, args.repeat)
    text = json.dumps(results, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
