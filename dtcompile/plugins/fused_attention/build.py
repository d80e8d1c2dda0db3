"""Ahead-of-time build of the fused-attention kernel: Triton source in, one cubin per (arch, dtype, head dim) out.

Input: GPU arches (``sm_89``), dtypes and head dims. Output: ``<out>/<arch>/fused_attention_<dtype>_d<D>.cubin``
plus ``<out>/kernels.json`` listing each file with its sha256, entry name, shared memory and warp count.
Triton compiles for a target it is told about (``GPUTarget``), so this runs on a machine without a GPU.

    python -m dtcompile.plugins.fused_attention.build --arch sm_89 sm_120 --out build/fused_attention
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python dtcompile/plugins/fused_attention/build.py): find dtcompile
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from dtcompile.plugins.fused_attention import kernel  # noqa: E402 - after the script-mode path fix

_TRITON_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def compile_kernel(arch: str, dtype: str, head_dim: int) -> dict[str, Any]:
    """Compile the kernel for ``arch`` ("sm_89"), ``dtype`` and ``head_dim``; returns cubin bytes and metadata."""
    import triton
    from triton.backends.compiler import GPUTarget

    if dtype not in _TRITON_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(_TRITON_TYPES)}, got {dtype!r}")
    if head_dim not in kernel.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {kernel.HEAD_DIMS}, got {head_dim}")
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise ValueError(f"arch must look like 'sm_89', got {arch!r}")
    if kernel.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET to compile the kernel (the interpreter does not compile)")
    fn = kernel._kernel(False)
    ptr = _TRITON_TYPES[dtype]
    signature = dict(zip(fn.arg_names, [ptr] * 4 + ["i32"] * 15 + ["fp32"] + ["constexpr"] * 4, strict=True))
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": kernel.BLOCK_M, "BLOCK_N": kernel.BLOCK_N, "UPCAST_DOT": False}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch[3:]), 32))
    return {
        "cubin": compiled.asm["cubin"],
        "entry": compiled.metadata.name,
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "block_m": kernel.BLOCK_M,
        "triton": triton.__version__,
    }


def build(archs: list[str], dtypes: list[str], head_dims: list[int], out: Path) -> dict[str, Any]:
    """Compile every combination into ``out`` and write ``kernels.json``; returns its content."""
    out = Path(out)
    entries = []
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                res = compile_kernel(arch, dtype, d)
                path = out / arch / f"fused_attention_{dtype}_d{d}.cubin"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(res.pop("cubin"))
                sha = hashlib.sha256(path.read_bytes()).hexdigest()
                entries.append({"file": path.relative_to(out).as_posix(), "arch": arch, "dtype": dtype,
                                "head_dim": d, "sha256": sha, **res})  # fmt: skip
    index = {"kernels": entries}
    (out / "kernels.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sm_89", "sm_120"])
    ap.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    index = build(args.arch, args.dtype, args.head_dim, args.out)
    for e in index["kernels"]:
        print(f"{e['file']}  {e['sha256'][:12]}  shared {e['shared']} B, {e['num_warps']} warps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
