#!/usr/bin/env python
"""The cost of one per-request LoRA swap in `dtc serve --lora-dir` on onnxruntime, three ways side by side.

A swap makes the served denoiser hold the weights `dtc refit` would write for an adapter set: the touched
initializers are recomputed from the base (``LiveLoras.updates``: refit's plan), then a new onnxruntime session
is opened over the same graph with them replaced. Three ways to replace them, timed on the same updates:

- ``add_initializer``: ``SessionOptions.add_initializer(name, OrtValue)`` per initializer (what the server does);
- ``add_external_initializers``: ``SessionOptions.add_external_initializers(names, values)`` in one call;
- ``in_memory``: the graph loaded once as a ModelProto (weights included), the touched initializers' bytes
  replaced, serialized and opened from bytes (impossible over protobuf's 2 GiB).

Swaps alternate A -> B -> none -> A ...; each method's output on one random denoiser input is compared with
add_initializer's (they must agree exactly). Reports the median seconds per phase.

    python scripts/bench_lora_swap.py [--artifact DIR --lora A.safetensors --lora B.safetensors]
                                      [--repeats 6] [--threads N] [--json docs/bench/lora_swap.json]

Without ``--artifact`` it builds recipes/tiny-flux.yaml (onnxruntime only) into a temp folder and makes two
random PEFT adapters (rank 4 on the attention projections; rank 2 on to_q/proj_mlp/proj_out) as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tiny(work: Path) -> tuple[Path, list[Path]]:
    import torch
    from diffusers import FluxTransformer2DModel

    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build
    from tests.fixtures.lora import make_peft_lora

    recipe = load_recipe(
        ROOT / "recipes" / "tiny-flux.yaml",
        [f"output.dir={work}", "engine.backends=[onnxruntime]", "engine.targets=[]"],
    )
    art = run_build(recipe).artifact_dir
    module = FluxTransformer2DModel.from_pretrained(
        builtin_model_path("tiny-flux") / "transformer", dtype=torch.float32
    )
    a = make_peft_lora(module, work / "a.safetensors", rank=4, alpha=8.0, seed=1)
    b = make_peft_lora(
        module, work / "b.safetensors", rank=2, alpha=2.0, seed=2, targets=("to_q", "proj_mlp", "proj_out")
    )
    return art, [a, b]


def _opts(threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def _feeds(session: Any) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}[i.type]
        out[i.name] = rng.standard_normal(shape).astype(dtype) if dtype != np.int64 else np.zeros(shape, dtype)
    return out


def _kohya_pair(session: Any, work: Path) -> list[Path]:
    """Two random kohya/BFL-style FLUX adapters for the artifact's transformer, from its recorded config."""
    from types import SimpleNamespace

    from tests.fixtures.lora import make_kohya_flux_lora

    cfg = session.manifest.component(session.manifest.main_component()).config or {}
    dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    mlp = int(dim * float(cfg.get("mlp_ratio", 4.0)))
    module = SimpleNamespace(config=cfg, single_transformer_blocks=[SimpleNamespace(proj_mlp=SimpleNamespace(
        out_features=mlp))])  # fmt: skip
    return [make_kohya_flux_lora(module, work / f"{n}.safetensors", rank=16, seed=s) for n, s in (("a", 1), ("b", 2))]


def _diff(out: dict[str, float], key: str, session: Any, feeds: dict[str, Any], ref: Any) -> None:
    import numpy as np

    out[key] = max(out.get(key, 0.0), float(np.abs(session.run(None, feeds)[0] - ref).max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--lora", type=Path, action="append", default=[])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from dtcompile.backends.onnxruntime import OrtRunner, ort_value
    from dtcompile.runtime.session import Session
    from dtcompile.tools.live_lora import LiveLoras

    tmp = tempfile.TemporaryDirectory(prefix="lora-swap-")
    art, loras = (args.artifact, args.lora) if args.artifact else _tiny(Path(tmp.name))
    session = Session(art, "onnxruntime", threads=args.threads)  # opened, not loaded: the swaps are timed alone
    if not loras:
        loras = _kohya_pair(session, Path(tmp.name))
    comp = session.manifest.main_component()
    graph_path = art / session.manifest.component(comp).onnx.file
    live = LiveLoras(session, {p.stem: p for p in loras})
    if live.refused:
        raise SystemExit(f"refused: {live.refused}")
    names = list(live.adapters)
    cycle = [((names[0], 1.0),), ((names[1], 1.0),), ()]
    size = sum(p.stat().st_size for p in graph_path.parent.iterdir() if p.name.startswith(graph_path.name + "."))
    size += graph_path.stat().st_size
    in_memory = size < 2**31  # one serialized ModelProto holds at most 2 GiB
    proto, by_name, original = None, {}, {}
    proto_load_s = None
    if in_memory:
        t0 = time.perf_counter()
        proto = onnx.load(str(graph_path))  # with its weights: the in-memory way's one-time cost
        proto_load_s = round(time.perf_counter() - t0, 3)
        by_name = {t.name: t for t in proto.graph.initializer}
    times: dict[str, list[float]] = {k: [] for k in ("plan", "add_initializer", "add_external_initializers",
                                                      "in_memory", "base_open")}  # fmt: skip
    mismatch: dict[str, float] = {}
    refused: dict[str, str] = {}
    if not in_memory:
        refused["in_memory"] = f"the graph is {size / 2**30:.2f} GiB: over protobuf's 2 GiB for one serialized model"
    feeds = None
    for i in range(args.repeats * len(cycle)):
        choice = cycle[i % len(cycle)]
        if not choice:  # back to the artifact's own weights: the graph opened as it is
            t0 = time.perf_counter()
            OrtRunner(graph_path, threads=args.threads)
            times["base_open"].append(time.perf_counter() - t0)
            continue
        t0 = time.perf_counter()
        updates = live.updates(choice)
        times["plan"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        r1 = OrtRunner(graph_path, threads=args.threads, initializers=updates)
        times["add_initializer"].append(time.perf_counter() - t0)
        feeds = feeds or _feeds(r1.session)
        ref = r1.session.run(None, feeds)[0]
        del r1

        t0 = time.perf_counter()
        opts = _opts(args.threads)
        values = [ort_value(v) for v in updates.values()]
        opts.add_external_initializers(list(updates), values)
        try:
            s2 = ort.InferenceSession(str(graph_path), opts, providers=["CPUExecutionProvider"])
            times["add_external_initializers"].append(time.perf_counter() - t0)
            _diff(mismatch, "add_external_initializers", s2, feeds, ref)
            del s2
        except Exception as exc:  # onnxruntime replaces only initializers stored as external data
            refused["add_external_initializers"] = str(exc).splitlines()[0][:200]

        if proto is not None:
            t0 = time.perf_counter()
            for name, t in original.items():  # the previous swap's replacements undone
                by_name[name].CopyFrom(t)
            original = {}
            for name, v in updates.items():
                original[name] = onnx.TensorProto()
                original[name].CopyFrom(by_name[name])
                by_name[name].CopyFrom(numpy_helper.from_array(v.contiguous().numpy(), name))
            s3 = ort.InferenceSession(proto.SerializeToString(), _opts(args.threads),
                                      providers=["CPUExecutionProvider"])  # fmt: skip
            times["in_memory"].append(time.perf_counter() - t0)
            _diff(mismatch, "in_memory", s3, feeds, ref)
            del s3
    result = {
        "artifact": str(art),
        "graph_bytes": size,
        "touched_initializers": len(live.updates(cycle[0])),
        "threads": args.threads,
        "adapter_swaps": len(times["plan"]),
        "base_swaps": len(times["base_open"]),
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items() if v},
        "not_applicable": refused,
        "in_memory_proto_load_s": proto_load_s,
        "max_abs_diff_vs_add_initializer": mismatch,
        "onnxruntime": ort.__version__,
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
