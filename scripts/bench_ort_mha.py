#!/usr/bin/env python
"""onnxruntime's CPU attention kernels against PyTorch's SDPA at FLUX's head shape (24 heads x 128), fp32.

Three forms of one attention call, interleaved, medians of ``--repeat``: torch ``scaled_dot_product_attention``;
the ``com.microsoft.MultiHeadAttention`` contrib op ((B, S, H*D) inputs); MatMul-Softmax-MatMul (what
``export.attention: decomposed`` emits). Answers whether exporting attention as onnxruntime's fused op would
bring the onnxruntime reference backend to PyTorch's speed (docs/attention.md).

    python scripts/bench_ort_mha.py --tokens 1088 1536 4608

``--gemm`` also times the step's dominant matmul shapes (FLUX's 3072-wide projections and MLP at 1152 tokens)
in both libraries, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1088, 1536, 4608])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gemm", action="store_true", help="also time the step's dominant GEMM shapes")
    args = ap.parse_args()
    b, h, d = 1, 24, 128
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def session(graph: object, opsets: list[object]) -> object:
        model = helper.make_model(graph, opset_imports=opsets)
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("tokens  torch ms  mha ms  decomposed ms  mha/torch  decomposed/torch  mha rel err")
    for s in args.tokens:
        flat = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, s, h * d]) for n in "qkv"]
        mha = session(
            helper.make_graph(
                [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=h)],
                "mha", flat, [helper.make_tensor_value_info("o", TensorProto.FLOAT, [b, s, h * d])],
            ),
            [helper.make_opsetid("", 19), helper.make_opsetid("com.microsoft", 1)],
        )  # fmt: skip
        four = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, h, s, d]) for n in "qkv"]
        nodes = [
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Mul", ["s", "scale"], ["s2"]),
            helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["o"]),
        ]
        scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(d)])
        out = [helper.make_tensor_value_info("o", TensorProto.FLOAT, [b, h, s, d])]
        dec = session(helper.make_graph(nodes, "dec", four, out, [scale]), [helper.make_opsetid("", 19)])
        q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        feeds_mha = {n: t.transpose(1, 2).reshape(b, s, h * d).numpy() for n, t in zip("qkv", (q, k, v), strict=True)}
        feeds_dec = {n: t.numpy() for n, t in zip("qkv", (q, k, v), strict=True)}
        got = torch.from_numpy(mha.run(None, feeds_mha)[0]).reshape(b, s, h, d).transpose(1, 2)
        err = float((got - ref).norm() / ref.norm())
        runs = {
            "torch": lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            "mha": lambda mha=mha, f=feeds_mha: mha.run(None, f),
            "dec": lambda dec=dec, f=feeds_dec: dec.run(None, f),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        print(f"{s:6d} {med['torch']:9.1f} {med['mha']:7.1f} {med['dec']:14.1f} {med['mha'] / med['torch']:10.2f} "
              f"{med['dec'] / med['torch']:17.2f} {err:12.1e}")  # fmt: skip

    if args.gemm:
        gemms(so, args.repeat)


def gemms(so: object, repeat: int) -> None:
    """(tokens x K) @ (K x N) in onnxruntime (weights as initializers) and torch, fp32, interleaved medians."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    print("GEMM (M x K x N)       torch ms  onnxruntime ms  onnxruntime/torch")
    for m, k, n in ((1152, 3072, 3072), (1152, 3072, 12288), (1152, 12288, 3072)):
        w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])], [numpy_helper.from_array(w, "w")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = torch.randn(1, m, k)
        wt = torch.from_numpy(w)
        feeds = {"x": x.numpy()}
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.matmul(x, wt)
            times["torch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times["ort"].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        print(f"{m} x {k} x {n:<6} {med['torch']:12.1f} {med['ort']:15.1f} {med['ort'] / med['torch']:18.2f}")


if __name__ == "__main__":
    main()
