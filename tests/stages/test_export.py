"""Export stage: a tiny seeded FLUX transformer to ONNX, checked against torch in onnxruntime at other shapes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dtcompile.core.digests import sha256_file  # noqa: E402
from dtcompile.core.errors import BuildError  # noqa: E402
from dtcompile.core.graph import ExportSpec, TensorSpec  # noqa: E402
from dtcompile.export.onnx import OnnxArtifact, export_onnx  # noqa: E402

INPUTS = (
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
)


class FluxWrapper(torch.nn.Module):
    """Graph inputs positionally -> the single output tensor (as ModelAdapter.export_module returns)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]


def tiny_flux(dtype: torch.dtype = torch.float32) -> FluxWrapper:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return FluxWrapper(model.eval().to(dtype))


def flux_inputs(batch: int, img_tokens: int, text_len: int, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1000 * batch + 10 * img_tokens + text_len)
    side = int(img_tokens**0.5)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(img_tokens // side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).reshape(-1, 3).float()
    feed = {
        "hidden_states": torch.randn(batch, img_tokens, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_len, 3),
        "guidance": torch.full((batch,), 3.5),
    }
    return {k: v.to(dtype) for k, v in feed.items()}


def flux_spec(dtype: torch.dtype = torch.float32, dynamic_text: bool = False) -> ExportSpec:
    dt = str(dtype).removeprefix("torch.")
    text = "text_len" if dynamic_text else 8
    dims = {
        "hidden_states": ("batch", "img_tokens", 16),
        "encoder_hidden_states": ("batch", text, 32),
        "pooled_projections": ("batch", 32),
        "timestep": ("batch",),
        "img_ids": ("img_tokens", 3),
        "txt_ids": (text, 3),
        "guidance": ("batch",),
    }
    return ExportSpec(
        inputs=[TensorSpec(n, dt, dims[n]) for n in INPUTS],
        outputs=[TensorSpec("latent", dt, ("batch", "img_tokens", 16))],
        example_inputs=flux_inputs(2, 64, 8, dtype),
    )


def ort_parity(onnx_path: Path, module: torch.nn.Module, feed: dict) -> dict[str, float]:
    """Relative L2 and max abs error of onnxruntime (CPU, basic optimizations) against torch."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(*feed.values()).float().numpy()
    out = session.run(None, {k: v.numpy() for k, v in feed.items()})[0].astype(np.float32)
    assert out.shape == ref.shape
    return {
        "rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "max_abs": float(np.abs(out - ref).max()),
    }


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory) -> tuple[FluxWrapper, OnnxArtifact]:
    module = tiny_flux()
    return module, export_onnx(module, flux_spec(), tmp_path_factory.mktemp("fp32"))


def test_artifact_describes_the_written_graph(fp32_export):
    _, art = fp32_export
    assert art.path.name == "transformer.onnx" and art.path.is_file()
    assert art.external_data is None and art.external_data_sha256 is None
    assert art.sha256 == sha256_file(art.path) and art.size == art.path.stat().st_size
    assert art.opset == 19 and art.files == (art.path,)
    assert [t.name for t in art.inputs] == list(INPUTS) and [t.name for t in art.outputs] == ["latent"]
    assert art.inputs[0] == TensorSpec("hidden_states", "float32", ("batch", "img_tokens", 16))
    assert art.inputs[4] == TensorSpec("img_ids", "float32", ("img_tokens", 3))
    assert art.inputs[5] == TensorSpec("txt_ids", "float32", (8, 3))
    assert art.n_nodes == sum(art.op_types.values())
    # the decomposed rms_norm symbolic is in the graph; graph-surgeon folding removed the Constant nodes
    assert art.op_types["ReduceMean"] >= 8 and "Constant" not in art.op_types
    assert sorted(p.name for p in art.path.parent.iterdir()) == ["transformer.onnx"]  # no scratch left


@pytest.mark.parametrize(("batch", "img_tokens"), [(2, 64), (1, 16), (3, 144)])
def test_onnxruntime_matches_torch_at_other_shapes(fp32_export, batch, img_tokens):
    module, art = fp32_export
    err = ort_parity(art.path, module, flux_inputs(batch, img_tokens, 8))
    assert err["rel_l2"] <= 1e-5, err


def test_dynamic_text_len(tmp_path):
    module = tiny_flux()
    art = export_onnx(module, flux_spec(dynamic_text=True), tmp_path, optimize=False)
    assert art.inputs[5].dims == ("text_len", 3)
    for batch, img_tokens, text_len in [(1, 16, 5), (2, 36, 12)]:
        err = ort_parity(art.path, module, flux_inputs(batch, img_tokens, text_len))
        assert err["rel_l2"] <= 1e-5, err


def test_size_one_example_stays_dynamic(tmp_path):
    """Examples of size 1 on every dynamic axis (batch 1, one token) are not baked into the graph."""
    module = tiny_flux()
    spec = flux_spec(dynamic_text=True)
    spec = ExportSpec(inputs=spec.inputs, outputs=spec.outputs, example_inputs=flux_inputs(1, 1, 1))
    art = export_onnx(module, spec, tmp_path)
    err = ort_parity(art.path, module, flux_inputs(3, 64, 5))
    assert err["rel_l2"] <= 1e-5, err


def test_rope_shapes_freeze_without_the_patch(tmp_path):
    """Guards the reason for _dynamic_rope: diffusers' reshape traces to constants and breaks other shapes."""
    module = tiny_flux()
    art = export_onnx(module, flux_spec(), tmp_path, patches=())
    assert ort_parity(art.path, module, flux_inputs(2, 64, 8))["rel_l2"] <= 1e-5
    with pytest.raises(Exception, match="Reshape"):
        ort_parity(art.path, module, flux_inputs(1, 16, 8))


def test_export_restores_diffusers_rope(fp32_export):
    from diffusers.models import embeddings
    from diffusers.models.transformers import transformer_flux

    assert transformer_flux.apply_rotary_emb is embeddings.apply_rotary_emb
    assert embeddings.apply_rotary_emb.__module__ == "diffusers.models.embeddings"


def test_external_data(tmp_path):
    module = tiny_flux()
    art = export_onnx(module, flux_spec(), tmp_path, name="flux", external_data=True)
    data = tmp_path / "flux.onnx.data"
    assert art.path == tmp_path / "flux.onnx" and art.external_data == data
    assert art.external_data_sha256 == sha256_file(data) and art.files == (art.path, data)
    assert art.size == art.path.stat().st_size + data.stat().st_size
    assert data.stat().st_size > 300_000 > art.path.stat().st_size  # weights moved out
    assert (data.stat().st_mode & 0o777) == (art.path.stat().st_mode & 0o777)
    locations = {
        e.value
        for t in onnx.load(str(art.path), load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "location"
    }
    assert locations == {"flux.onnx.data"}
    assert ort_parity(art.path, module, flux_inputs(3, 36, 8))["rel_l2"] <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_are_the_weights_torch_writes(tmp_path, dtype):
    """stream_weights keeps the weights out of torch's graph and writes them itself: same initializers (names,
    types, dims, bytes) as torch writes, all in the data file, and the same outputs."""
    from onnx import numpy_helper

    module = tiny_flux(dtype)
    spec = flux_spec(dtype)
    plain = export_onnx(module, spec, tmp_path / "plain", optimize=False, external_data=True)
    art = export_onnx(module, spec, tmp_path / "streamed", optimize=False, stream_weights=True)
    assert art.external_data == tmp_path / "streamed" / "transformer.onnx.data"

    def values(path):
        g = onnx.load(str(path)).graph
        return {t.name: (t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes()) for t in g.initializer}

    assert values(art.path) == values(plain.path)
    header = onnx.load(str(art.path), load_external_data=False).graph
    assert [(n.op_type, list(n.input)) for n in header.node] == [
        (n.op_type, list(n.input)) for n in onnx.load(str(plain.path), load_external_data=False).graph.node
    ]
    assert [i.name for i in header.input] == spec.input_names  # the weights are no graph inputs
    big = [t for t in header.initializer if t.dims and np.prod(t.dims) * 2 >= 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    with pytest.raises(BuildError, match="needs external_data=True or None"):
        export_onnx(module, spec, tmp_path / "inline", external_data=False, stream_weights=True)


def test_weights_stream_when_they_go_external_by_size(tmp_path, monkeypatch, caplog):
    """With external_data and stream_weights left to the size rule, a model over the threshold streams its
    weights (no graph between 1.5 and 2 GiB is serialized in memory); one under it keeps the in-memory path."""
    import dtcompile.export.onnx as export_mod

    module = tiny_flux()
    spec = flux_spec()
    small = export_onnx(module, spec, tmp_path / "small")
    assert small.external_data is None
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 1024)  # the tiny model now counts as large
    with caplog.at_level(logging.INFO, logger="dtcompile.export"):
        art = export_onnx(module, spec, tmp_path / "large")
    assert "weights streamed" in caplog.text
    assert art.external_data == tmp_path / "large" / "transformer.onnx.data"
    assert ort_parity(art.path, module, flux_inputs(3, 36, 8))["rel_l2"] <= 1e-5


def test_manifest_entry(tmp_path):
    art = export_onnx(tiny_flux(), flux_spec(), tmp_path / "onnx", external_data=True)
    m = art.to_manifest(tmp_path)
    data = art.external_data
    assert m["onnx"] == {
        "file": "onnx/transformer.onnx",
        "sha256": art.sha256,
        "size": art.path.stat().st_size,
        "external_data": [
            {"file": "onnx/transformer.onnx.data", "sha256": art.external_data_sha256, "size": data.stat().st_size}
        ],
    }
    assert m["inputs"][0] == {"name": "hidden_states", "dtype": "float32", "dims": ["batch", "img_tokens", 16]}
    assert m["opset"] == 19 and m["n_nodes"] == art.n_nodes
    with pytest.raises(BuildError, match="is not inside the artifact folder"):
        art.to_manifest(tmp_path / "elsewhere")


def test_export_is_deterministic(fp32_export, tmp_path):
    _, art = fp32_export
    assert export_onnx(tiny_flux(), flux_spec(), tmp_path).sha256 == art.sha256


def test_fp16_export(tmp_path):
    module = tiny_flux(torch.float16)
    art = export_onnx(module, flux_spec(torch.float16), tmp_path)
    assert {t.dtype for t in (*art.inputs, *art.outputs)} == {"float16"}
    err = ort_parity(art.path, module, flux_inputs(1, 36, 8, torch.float16))
    assert err["rel_l2"] <= 5e-3, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eps", [1e-6, None])
def test_rms_norm_symbolic(tmp_path, dtype, eps):
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.RMSNorm(16, eps=eps)).eval().to(dtype)
    with torch.no_grad():
        module[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 8).to(dtype) * 30  # fp16 squares above 256 overflow unless upcast
    spec = ExportSpec(
        inputs=[TensorSpec("x", str(dtype)[6:], ("batch", "seq", 8))],
        outputs=[TensorSpec("y", str(dtype)[6:], ("batch", "seq", 16))],
        example_inputs={"x": x},
    )
    art = export_onnx(module, spec, tmp_path)
    err = ort_parity(art.path, module, {"x": torch.randn(3, 7, 8).to(dtype) * 30})
    assert err["rel_l2"] <= (1e-6 if dtype == torch.float32 else 2e-3), err


def test_example_inputs_must_match_spec(tmp_path):
    spec = flux_spec()
    del spec.example_inputs["guidance"]
    with pytest.raises(BuildError, match=r"missing \['guidance'\]"):
        export_onnx(tiny_flux(), spec, tmp_path)


def test_input_dropped_by_exporter_is_reported(tmp_path):
    class IgnoresY(torch.nn.Module):
        def forward(self, x, y):
            return x * 2

    spec = ExportSpec(
        inputs=[TensorSpec("x", "float32", ("n",)), TensorSpec("y", "float32", ("n",))],
        outputs=[TensorSpec("out", "float32", ("n",))],
        example_inputs={"x": torch.ones(3), "y": torch.ones(3)},
    )
    with pytest.raises(BuildError, match=r"\['y'\] of the ExportSpec are missing from the exported graph"):
        export_onnx(IgnoresY(), spec, tmp_path)


def test_dtype_mismatch_is_reported(tmp_path):
    spec = ExportSpec(
        inputs=[TensorSpec("x", "float16", ("n",))],
        outputs=[TensorSpec("out", "float32", ("n",))],
        example_inputs={"x": torch.ones(3)},
    )
    with pytest.raises(BuildError, match="example input 'x' is float32 but the ExportSpec says float16"):
        export_onnx(torch.nn.Identity(), spec, tmp_path)


def test_static_dim_mismatch_is_reported(tmp_path):
    spec = flux_spec()
    spec.example_inputs["txt_ids"] = torch.zeros(9, 3)
    with pytest.raises(BuildError, match=r"'txt_ids' has shape \(9, 3\), which does not fit the spec's \(8, 3\)"):
        export_onnx(tiny_flux(), spec, tmp_path)


def test_output_dtype_mismatch_is_reported(tmp_path):
    spec = ExportSpec(
        inputs=[TensorSpec("x", "float32", ("n",))],
        outputs=[TensorSpec("out", "float16", ("n",))],
        example_inputs={"x": torch.ones(3)},
    )
    with pytest.raises(BuildError, match="output 'out' is float32 in the graph but float16 in the ExportSpec"):
        export_onnx(torch.nn.ReLU(), spec, tmp_path)


def test_exporter_failure_is_a_build_error(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    spec = ExportSpec(
        inputs=[TensorSpec("x", "float32", ("n",))],
        outputs=[TensorSpec("out", "float32", ("n",))],
        example_inputs={"x": torch.ones(4)},
    )
    with pytest.raises(BuildError, match="ONNX export of Unexportable failed: "):
        export_onnx(Unexportable(), spec, tmp_path)


def test_import_is_lazy():
    heavy = "('torch', 'onnx', 'onnxruntime', 'diffusers', 'onnx_graphsurgeon')"
    code = f"import sys, dtcompile.export.onnx, dtcompile.stages.export; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
