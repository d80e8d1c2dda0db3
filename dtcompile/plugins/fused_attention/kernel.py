"""Flash-attention forward in Triton: one pass over K/V per query block with an online softmax.

Input: q (B, H, Sq, D), k and v (B, H, Sk, D) of one dtype (float16, bfloat16 or float32), a softmax scale.
Output: (B, H, Sq, D) in the input dtype, equal to ``softmax(q @ k^T * scale) @ v``.

The kernel keeps a running row maximum and row sum in fp32 (the "online softmax"), so the (Sq, Sk) score matrix
is never written to memory; products accumulate in fp32 and the result is cast back once at the end. Sequence
lengths need not be multiples of the block sizes: out-of-range rows are masked on load and store, and
out-of-range key columns get a score of -inf.

On a CUDA device the kernel is compiled by Triton; on the CPU it runs under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported), which is how the tests check it against PyTorch
SDPA on a machine without a GPU.
``build.compile_kernel(arch, ...)`` compiles it ahead of time for a GPU arch without needing that GPU.
"""

# The kernel body uses ``tl`` (triton.language), bound in this module's globals by _kernel() so that importing
# the module needs no triton; O is the conventional name of the output pointer; constexpr if-blocks (not
# ternaries) are what Triton specializes at compile time.
# ruff: noqa: F821, E741, SIM108
from __future__ import annotations

import functools
import math
import os
from typing import Any

#: Head sizes the kernel is built for: tl.dot needs power-of-two tiles of at least 16.
HEAD_DIMS = (16, 32, 64, 128, 256)
BLOCK_M = 64
BLOCK_N = 64
_LOG2E = 1.4426950408889634


def _attn_fwd(
    Q,
    K,
    V,
    O,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    H,
    SEQ_Q,
    SEQ_K,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # One program per (query block, batch x head); the last dim of every tensor is contiguous.
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    row_ok = offs_m[:, None] < SEQ_Q
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, SEQ_K, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < SEQ_K
        # K is loaded transposed, (HEAD_DIM, BLOCK_N), so q @ kT is a plain dot.
        kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only: see _upcast_dot
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32))
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale  # log2 domain: qk_scale includes log2(e)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        p = p.to(v.dtype)  # P @ V runs in the input precision, as on the GPU
        if UPCAST_DOT:
            pv = tl.dot(p.to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel. Triton decides at ``triton.jit`` time whether a function is interpreted (from
    ``TRITON_INTERPRET``), so one wrapper is kept per setting; ``interpret`` is ``interpreting()`` at the call."""
    import triton
    import triton.language as tl

    # The kernel body refers to ``tl`` as a global: bind it in this module before Triton parses the function.
    globals()["tl"] = tl
    return triton.jit(_attn_fwd)


def _check_interpreter() -> None:
    """Triton jits its own library (``tl.max``, ``tl.sum``) when it is first imported, in the mode then set."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.max, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported (diffusers imports it), so Triton's library "
            "functions are compiled-mode only; set TRITON_INTERPRET=1 before the process starts"
        )


def _upcast_dot(dtype: Any, interpret: bool) -> bool:
    """Whether the dots run on fp32 copies of the (exactly representable) bf16 tiles.

    Triton 3.9's interpreter multiplies bfloat16 tiles as their raw bits (a 16x16 ``tl.dot`` is off by ~1e10),
    so under the interpreter bf16 tiles are widened to fp32 first; values, rounding of P and fp32 accumulation
    stay those of the compiled kernel. Compiled kernels always use the native bf16 dot.
    """
    import torch

    return interpret and dtype == torch.bfloat16


def check_inputs(q: Any, k: Any, v: Any) -> None:
    """Raise ValueError unless q/k/v are 4-D (B, H, S, D) tensors of one float dtype with a supported D."""
    import torch

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fused attention takes (B, H, S, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fused attention takes one of float16/bfloat16/float32 for q, k, v; got {q.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fused attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"fused attention supports head dims {HEAD_DIMS}, got {q.shape[-1]}")


def flash_attention(q: Any, k: Any, v: Any, scale: float | None = None, out: Any = None) -> Any:
    """``softmax(q @ k^T * scale) @ v`` for (B, H, S, D) tensors with the Triton kernel.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``. ``scale`` defaults to 1/sqrt(D).
    ``out``: a tensor of q's shape and dtype (last dim contiguous) to write into, e.g. a TensorRT output buffer.
    """
    import torch
    import triton

    check_inputs(q, k, v)
    interpret = interpreting()
    if q.device.type != "cuda" and not interpret:
        raise RuntimeError("the Triton fused-attention kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if interpret:
        _check_interpreter()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * _LOG2E
    grid = (triton.cdiv(sq, BLOCK_M), b * h)
    _kernel(interpret)[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, sq, sk, qk_scale,
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, UPCAST_DOT=_upcast_dot(q.dtype, interpret),
    )  # fmt: skip
    return out
