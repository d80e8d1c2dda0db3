"""Prototype of Ulysses' engine form for Wan: one transformer block split at its self-attention into two engines.

Input: a Wan source model (``builtin:NAME`` or a pipeline folder; its first block), a video size and a rank
count. Output: a report dict (parity and per-block latencies, docs/parallel.md "The engine form").

Each rank runs ``pre`` (norm1 + modulation, q/k/v projections, q/k norms, RoPE on its rows: an onnxruntime
engine), the attention in torch with the two all-to-alls (``runtime.ulysses.SequenceGroup.attention``), and
``post`` (output projection, gated residual, cross-attention over the whole text, feed-forward: a second
engine). It is measured against the same block as one engine over the whole sequence on one rank, the split
engines on one rank (the cost of the boundary alone) and the torch block. The block parts are
``models.wan.ulysses_block_parts``; a build stage making these engines for every block is not written: this
measures whether it would pay.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dtcompile.runtime.parallel import ParallelSpec, run_parallel


def _block_inputs(transformer: Any, frames: int, height: int, width: int, text_len: int) -> dict[str, Any]:
    """Seeded inputs of block 0 at one size: hidden (1, tokens, width), tproj, context and the RoPE tables."""
    import torch

    from dtcompile.models.wan import latent_frames

    cfg = transformer.config
    pt, ph, pw = cfg.patch_size
    g = torch.Generator().manual_seed(0)
    latents = torch.zeros(1, cfg.in_channels, latent_frames(frames, 4), height // 8, width // 8)
    cos, sin = transformer.rope(latents)
    tokens = latents.shape[2] // pt * (latents.shape[3] // ph) * (latents.shape[4] // pw)
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    return {
        "hidden": torch.randn(1, tokens, inner, generator=g),
        "tproj": torch.randn(1, 6, inner, generator=g) * 0.1,
        "cos": cos.float().contiguous(),
        "sin": sin.float().contiguous(),
        "context": torch.randn(1, text_len, inner, generator=g),
    }


def _export(block: Any, inputs: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``pre``, ``post`` and the whole ``block`` as onnxruntime graphs (token count dynamic)."""
    import torch

    from dtcompile.core.graph import ExportSpec, TensorSpec
    from dtcompile.export.onnx import export_onnx
    from dtcompile.models.wan import ulysses_block_parts

    pre_cls, post_cls = ulysses_block_parts()
    heads, head = block.attn1.heads, inputs["cos"].shape[-1]
    inner = inputs["hidden"].shape[-1]
    with torch.no_grad():
        qkv = pre_cls(block)(inputs["hidden"], inputs["tproj"], inputs["cos"], inputs["sin"])
    attn = qkv[0]  # any tensor of the attention output's shape serves as the example
    hid = TensorSpec("hidden", "float32", (1, "tokens", inner))
    tproj = TensorSpec("tproj", "float32", (1, 6, inner))
    rope = [TensorSpec(n, "float32", (1, "tokens", 1, head)) for n in ("cos", "sin")]
    ctx = TensorSpec("context", "float32", (1, inputs["context"].shape[1], inner))
    out = TensorSpec("out", "float32", (1, "tokens", inner))

    class Whole(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, hidden: Any, tproj: Any, cos: Any, sin: Any, context: Any) -> Any:
            return self.block(hidden, context, tproj, (cos, sin))

    ex = {k: inputs[k] for k in ("hidden", "tproj", "cos", "sin")}
    graphs = {
        "pre": (pre_cls(block), [hid, tproj, *rope], [TensorSpec("qkv", "float32", (3, 1, "tokens", heads, head))], ex),
        "post": (post_cls(block), [hid, tproj, TensorSpec("attn", "float32", (1, "tokens", heads, head)), ctx], [out],
                 {"hidden": inputs["hidden"], "tproj": inputs["tproj"], "attn": attn, "context": inputs["context"]}),
        "block": (Whole(), [hid, tproj, *rope, ctx], [out], {**ex, "context": inputs["context"]}),
    }  # fmt: skip
    paths = {}
    for name, (module, ins, outs, example) in graphs.items():
        spec = ExportSpec(ins, outs, example, opset=19)
        paths[name] = export_onnx(module.eval(), spec, out_dir, name=name, patches=("wan_rope",)).path
    return paths


def _split_block(runners: dict[str, Any], comm: Any, x: dict[str, Any]) -> Any:
    """pre engine -> attention with the all-to-alls -> post engine, on this rank's rows of ``x``."""
    qkv = runners["pre"]({k: x[k] for k in ("hidden", "tproj", "cos", "sin")})["qkv"]
    attn = comm.attention(qkv[0], qkv[1], qkv[2]).contiguous()
    return runners["post"]({"hidden": x["hidden"], "tproj": x["tproj"], "attn": attn, "context": x["context"]})["out"]


def _timed(fn: Any, repeat: int) -> tuple[float, Any]:
    """Median ms of ``repeat`` calls after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), out


def _open(paths: dict[str, Path], threads: int | None) -> dict[str, Any]:
    from dtcompile.backends.onnxruntime import OrtRunner

    return {k: OrtRunner(p, threads=threads) for k, p in paths.items()}


def _rank_job(paths: dict[str, Path], inputs_path: Path, ranks: int, repeat: int, threads: int | None,
              rank: int) -> dict[str, Any]:  # fmt: skip
    """One rank of the split block: its rows of the inputs through the split engines; the gathered output."""
    import torch
    import torch.distributed as dist

    from dtcompile.runtime.ulysses import SequenceGroup

    inputs = torch.load(inputs_path)
    comm = SequenceGroup(dist.group.WORLD, ranks, rank)
    x = {k: (comm.shard(v, 1) if k in ("hidden", "cos", "sin") else v) for k, v in inputs.items()}
    runners = _open(paths, threads)
    ms, out = _timed(lambda: _split_block(runners, comm, x), repeat)
    sent = comm.bytes_sent // (repeat + 1)
    return {"ms": ms, "bytes_per_block": sent, "out": comm.gather(out, 1)}


def prototype(
    source: str, *, frames: int, height: int, width: int, text_len: int = 512, ranks: int = 2, repeat: int = 3,
    threads: int | None = 1,
) -> dict[str, Any]:  # fmt: skip
    """Export block 0 of ``source``'s Wan transformer as pre/post/whole engines, run and time them (module
    docstring); ``threads`` per rank for torch and onnxruntime."""
    from dtcompile.core.threads import torch_threads

    with torch_threads(threads):
        return _prototype(source, frames, height, width, text_len, ranks, repeat, threads)


def _prototype(
    source: str, frames: int, height: int, width: int, text_len: int, ranks: int, repeat: int, threads: int | None
) -> dict[str, Any]:
    import diffusers
    import torch

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.runtime.ulysses import SequenceGroup

    folder = builtin_model_path(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)
    transformer = diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer", dtype=torch.float32).eval()
    block = transformer.blocks[0]
    inputs = _block_inputs(transformer, frames, height, width, text_len)
    with tempfile.TemporaryDirectory(prefix="dtc-ulysses-engine-") as tmp:
        paths = _export(block, inputs, Path(tmp))
        torch.save(inputs, Path(tmp) / "inputs.pt")
        runners = _open(paths, threads)
        with torch.inference_mode():
            torch_ms, ref = _timed(lambda: block(inputs["hidden"], inputs["context"], inputs["tproj"],
                                                 (inputs["cos"], inputs["sin"])), repeat)  # fmt: skip
            whole_ms, whole = _timed(lambda: runners["block"](inputs)["out"], repeat)
            split1_ms, split1 = _timed(lambda: _split_block(runners, SequenceGroup(None, 1, 0), inputs), repeat)
        job = functools.partial(_rank_job, paths, Path(tmp) / "inputs.pt", ranks, repeat, threads)
        many = run_parallel(ParallelSpec(ulysses=ranks), job, threads=threads)
    return {
        "source": source, "tokens": int(inputs["hidden"].shape[1]), "width": int(inputs["hidden"].shape[2]),
        "heads": int(block.attn1.heads), "text_len": text_len, "ranks": ranks, "threads_per_rank": threads,
        "repeat": repeat,
        "ms": {"torch_block": torch_ms, "engine_block": whole_ms, "split_engines_1_rank": split1_ms,
               f"split_engines_{ranks}_ranks": many["ms"]},
        "rel_l2_to_torch": {"engine_block": rel_l2(whole, ref), "split_engines_1_rank": rel_l2(split1, ref),
                            f"split_engines_{ranks}_ranks": rel_l2(many["out"], ref)},
        "bytes_per_rank_per_block": many["bytes_per_block"],
    }  # fmt: skip
