"""OrtRunner options."""

from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def test_low_memory_runner_keeps_no_arena_and_computes_the_same(tmp_path: Path) -> None:
    from onnx import TensorProto as T
    from onnx import helper as h

    from dtcompile.backends.onnxruntime import OrtRunner

    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "x"], ["m"]), h.make_node("Relu", ["m"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, [8, 8])],
    )
    path = tmp_path / "g.onnx"
    onnx.save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 19)]), str(path))
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    default, low = OrtRunner(path, optimization="basic"), OrtRunner(path, optimization="basic", low_memory=True)
    opts = low.session.get_session_options()
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
    assert default.session.get_session_options().enable_cpu_mem_arena
    assert torch.equal(low({"x": x})["y"], default({"x": x})["y"])
