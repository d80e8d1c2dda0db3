"""Quantize stage on the tiny FLUX pipeline: calibration over the denoising loop, the state cache, exclusions,
accuracy against the unquantized model. CPU only: NVFP4 runs through the pure-torch stand-in."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("modelopt")

from dtcompile.core.errors import RecipeError, UnsupportedError  # noqa: E402
from dtcompile.models.builtins.flux import build_tiny_flux  # noqa: E402
from dtcompile.models.flux import FluxAdapter  # noqa: E402
from dtcompile.quant import accuracy as acc  # noqa: E402
from dtcompile.quant import calibration as cal  # noqa: E402
from dtcompile.recipe.quant import parse_quant_spec  # noqa: E402

PROMPTS = ["a cat", "a dog on a beach", "a red car", "an old house"]
RUN = {"height": 32, "width": 32, "max_sequence_length": 16}
ADAPTER = FluxAdapter()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec(fmt: str = "fp8", **fields: object) -> object:
    calib = {"prompts": PROMPTS, "size": 4, "batch": 2, "steps": 2, **fields.pop("calib", {})}
    return parse_quant_spec({"format": fmt, "calib": calib, **fields})


def pipeline() -> object:
    pipe = build_tiny_flux(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def example(pipe: object) -> dict:
    """One step's transformer inputs (recorded from a real pipeline run)."""
    trace = acc.trace_pipeline(pipe, ADAPTER, ["a bird"], steps=1, **RUN)
    return trace.inputs[0][0]


def quantizers(module: torch.nn.Module) -> dict[str, object]:
    return {n: m for n, m in module.named_modules() if type(m).__name__.endswith("TensorQuantizer")}


def test_nvfp4_stand_in_matches_modelopt() -> None:
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from dtcompile.quant.nvfp4 import nvfp4_fake_quant

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 64, generator=gen) * torch.rand(64, generator=gen) * 3
    x[..., :16] = 0  # an all-zero block
    amax = x.abs().max() * 1.3
    qt, scale, scale_2 = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=amax / (6 * 448))
    expected = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    assert torch.equal(nvfp4_fake_quant(x, 16, amax), expected)


def test_fp8_calibration_is_cached_and_restored(tmp_path: Path) -> None:
    s = spec("fp8", quantize_mha=True)
    pipe = pipeline()
    inputs = example(pipe)
    with torch.no_grad():
        plain = pipe.transformer(**inputs, return_dict=False)[0]
    res = cal.calibrate(pipe, ADAPTER, s, tmp_path, **RUN)
    assert not res.cache_hit and res.state_path.is_file()
    assert res.exclude == list(ADAPTER.default_exclude) and res.n_prompts == 4
    assert len(res.fp8_attention) == 4  # 2 double + 2 single blocks, head size 16
    manifest = res.to_manifest()
    assert manifest["format"] == "fp8" and manifest["calib"]["key"] == res.key
    json.dumps(manifest)

    qz = quantizers(pipe.transformer)
    assert qz["transformer_blocks.0.attn.to_q.weight_quantizer"].is_enabled
    assert qz["transformer_blocks.0.attn.q_bmm_quantizer"].is_enabled
    assert not qz["transformer_blocks.0.norm2.input_quantizer"].is_enabled  # LayerNorm stays high precision
    for name, quantizer in qz.items():
        if name.startswith(("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")):
            assert not quantizer.is_enabled, name
    with torch.no_grad():
        quantized = pipe.transformer(**inputs, return_dict=False)[0]
    err = float((quantized - plain).norm() / plain.norm())
    assert 0 < err < 0.05

    again = pipeline()
    hit = cal.calibrate(again, ADAPTER, s, tmp_path, **RUN)
    assert hit.cache_hit and hit.key == res.key and hit.fp8_attention == res.fp8_attention
    with torch.no_grad():
        assert torch.equal(again.transformer(**inputs, return_dict=False)[0], quantized)


@pytest.mark.parametrize("fmt", ["int8", "nvfp4", "svdquant"])
def test_the_cached_state_holds_only_what_calibration_added_or_changed(tmp_path: Path, fmt: str) -> None:
    """The state file keeps the quantizer ranges and the tensors calibration changed (SVDQuant's smoothed
    weights and low-rank branch), not the unchanged weights; restored over a fresh pipeline it computes the
    very same outputs."""
    s = spec(fmt, rank=4) if fmt == "svdquant" else spec(fmt)
    pipe = pipeline()
    inputs = example(pipe)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = cal.calibrate(pipe, ADAPTER, s, tmp_path, **RUN)
    saved = torch.load(res.state_path, weights_only=False)["model_state_dict"]
    unchanged = [k for k, v in saved.items() if k in weights and torch.equal(v, weights[k])]
    assert saved and not unchanged
    changed = [k for k, v in pipe.transformer.state_dict().items() if k in weights and not torch.equal(v, weights[k])]
    assert set(changed) <= set(saved)  # every weight calibration changed is in the file
    with torch.no_grad(), acc.quantized_forward_ctx():
        quantized = pipe.transformer(**inputs, return_dict=False)[0]
    again = pipeline()
    assert cal.calibrate(again, ADAPTER, s, tmp_path, **RUN).cache_hit
    calibrated, restored = pipe.transformer.state_dict(), again.transformer.state_dict()
    assert calibrated.keys() == restored.keys()
    assert all(torch.equal(calibrated[k], restored[k]) for k in calibrated)
    with torch.no_grad(), acc.quantized_forward_ctx():
        got = again.transformer(**inputs, return_dict=False)[0]
    if fmt == "svdquant":  # ModelOpt's own full mto.save/restore differs from the calibrated module as much
        torch.testing.assert_close(got, quantized, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, quantized)


def test_calibration_key_covers_every_field() -> None:
    base = dict(
        spec=spec("int8"),
        exclude=["proj_out"],
        prompts=PROMPTS,
        component_sha256="a" * 64,
        dtype="float32",
        height=32,
        width=32,
        max_sequence_length=16,
        guidance_scale=None,
    )

    def key(**change: object) -> str:
        args = {**base, **change}
        return cal.calibration_key(
            args.pop("spec"), args.pop("exclude"), args.pop("prompts"), args.pop("component_sha256"), **args
        )  # noqa: E501

    variants = [
        key(),
        key(spec=spec("int8", alpha=0.5)),
        key(spec=spec("int8", calib={"steps": 3})),
        key(spec=spec("int8", calib={"seed": 1})),
        key(spec=spec("int8", calib={"percentile": 0.5})),
        key(spec=spec("int8", calib={"batch": 1})),
        key(spec=spec("fp8")),
        key(spec=spec("fp8", quantize_mha=True)),
        key(exclude=["proj_out", "norm_out"]),
        key(prompts=[*PROMPTS[:3], "a blue car"]),
        key(component_sha256="b" * 64),
        key(dtype="float16"),
        key(height=64),
        key(max_sequence_length=32),
        key(guidance_scale=4.0),
    ]
    assert len(set(variants)) == len(variants)
    assert key() == variants[0]


def test_percentile_stops_the_denoising_loop_after_the_collected_steps() -> None:
    pipe = pipeline()
    calls: list[int] = []
    handle = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        for percentile, expected in ((0.5, 2 * 2), (1.0, 2 * 4)):
            calls.clear()
            s = spec("fp8", calib={"prompts": PROMPTS[:3], "size": 3, "steps": 4, "percentile": percentile})
            cal._forward_loop(pipe, ADAPTER, s.calib, PROMPTS[:3], 32, 32, 16, None)(pipe.transformer)
            assert len(calls) == expected  # 2 batches (2 + 1 prompts) x collected steps
    finally:
        handle.remove()


def test_wrong_exclude_or_rank_fails_before_calibrating(tmp_path: Path) -> None:
    pipe = pipeline()
    with pytest.raises(RecipeError, match=r"quant.exclude\[1\]: pattern 'x_embeder' matches no module"):
        cal.calibrate(pipe, ADAPTER, spec("fp8", exclude=["proj_out", "x_embeder"]), tmp_path, **RUN)
    with pytest.raises(
        UnsupportedError, match=r"quant.rank 64 must be below .* is 64 wide; set quant.rank to at most 63"
    ):
        cal.calibrate(pipe, ADAPTER, spec("svdquant", rank=64), tmp_path, **RUN)
    assert not list(tmp_path.iterdir())  # nothing calibrated, nothing cached


def test_int8_smoothquant_and_fp4_formats_calibrate_on_cpu(tmp_path: Path) -> None:
    int8 = pipeline()
    cal.calibrate(int8, ADAPTER, spec("int8"), tmp_path, **RUN)
    to_q = int8.transformer.transformer_blocks[0].attn.to_q
    assert to_q.input_quantizer.pre_quant_scale is not None  # SmoothQuant's per-channel migration
    assert to_q.weight_quantizer.num_bits == 8 and to_q.weight_quantizer.axis == 0

    for fmt, extra in (("nvfp4", {}), ("svdquant", {"rank": 8})):
        pipe = pipeline()
        inputs = example(pipe)
        with torch.no_grad():
            plain = pipe.transformer(**inputs, return_dict=False)[0]
        s = spec(fmt, calib={"prompts": PROMPTS[:2], "size": 2, "steps": 1}, **extra)
        cal.calibrate(pipe, ADAPTER, s, tmp_path, **RUN)
        with torch.no_grad(), acc.quantized_forward_ctx():
            out = pipe.transformer(**inputs, return_dict=False)[0]
        err = float((out - plain).norm() / plain.norm())
        assert 0 < err < 0.1, (fmt, err)
        if fmt == "svdquant":
            weight_q = pipe.transformer.transformer_blocks[0].attn.to_q.weight_quantizer
            assert tuple(weight_q.svdquant_lora_a.shape) == (8, 64)


def test_accuracy_against_the_unquantized_model(tmp_path: Path) -> None:
    pipe = pipeline()
    reference = acc.trace_pipeline(pipe, ADAPTER, acc.HELDOUT_PROMPTS[:2], steps=2, **RUN)
    assert len(reference.noise) == 2 and len(reference.noise[0]) == 2
    assert reference.images[0].shape == (3, 32, 32)
    cal.calibrate(pipe, ADAPTER, spec("fp8"), tmp_path, **RUN)
    report, trace = acc.accuracy_report(pipe, ADAPTER, reference)
    assert 0.999 < report.min_cos < 1.0
    assert 0 < report.max_rel_err < 0.05
    assert all(40 < p < acc.PSNR_IDENTICAL for p in report.psnr_db)
    data = report.to_manifest()
    assert len(data["teacher_forced"]["cos_min"]) == 2 and len(data["free_running"]["rel_err_max"]) == 2
    assert json.loads(json.dumps(data))["summary"]["min_cos"] == pytest.approx(report.min_cos, rel=1e-5)
    # The report is reproducible: same prompts and seeds give the same numbers.
    again, _ = acc.accuracy_report(pipe, ADAPTER, reference)
    assert again.to_manifest() == data
    assert trace.prompts == reference.prompts


class _Terminal(io.StringIO):
    """stderr as a terminal: tqdm draws the bar on it."""

    def isatty(self) -> bool:
        return True


def test_calibration_and_accuracy_draw_bars_with_eta_on_a_terminal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dtcompile.core.progress import Progress

    caplog.set_level(logging.INFO, logger="dtcompile")
    monkeypatch.setattr(Progress, "redraw_s", 0.0)  # every step redrawn, however fast the tiny model runs
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    pipe = pipeline()
    reference = acc.trace_pipeline(pipe, ADAPTER, acc.HELDOUT_PROMPTS[:1], steps=2, label="accuracy unquantized", **RUN)
    cal.calibrate(pipe, ADAPTER, spec("fp8", calib={"steps": 3}), tmp_path, **RUN)  # 2 calls x 3 steps
    acc.accuracy_report(pipe, ADAPTER, reference)
    drawn = term.getvalue()
    # tqdm's count, elapsed<remaining and rate: "calibrate transformer:  67%|...| 4/6 [00:00<00:00, 9.1step/s]"
    assert re.search(r"calibrate transformer: +\d+%\|.*\| [1-5]/6 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)", drawn)
    for label in ("accuracy unquantized", "accuracy quantized", "accuracy quantized teacher-forced"):
        assert re.search(rf"{label}: +\d+%\|.*\| 1/2 \[\d\d:\d\d<\d\d:\d\d", drawn), label
    summaries = [r.getMessage() for r in caplog.records if r.name == "dtcompile"]
    assert any(re.fullmatch(r"calibrate transformer: 6 steps in [\d.]+ s, [\d.]+ step/s", m) for m in summaries)


def test_calibration_logs_progress_lines_off_a_terminal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dtcompile.core.progress import Progress

    caplog.set_level(logging.INFO, logger="dtcompile")
    monkeypatch.setattr(Progress, "min_gap_s", 0.0)  # a line at every tenth, however fast the tiny model runs
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    cal.calibrate(pipeline(), ADAPTER, spec("fp8", calib={"steps": 3}), tmp_path, **RUN)
    assert sys.stderr.getvalue() == ""  # no bar in a log
    got = [r.getMessage() for r in caplog.records if r.name == "dtcompile" and r.getMessage().startswith("calibrate")]
    assert [m.split(",")[0] for m in got[:-1]] == [f"calibrate transformer: {i}/6 steps" for i in range(1, 6)]
    assert re.fullmatch(r"calibrate transformer: 3/6 steps, [\d.]+ step/s, ETA [\d.]+ s", got[2]), got
    assert got[-1].startswith("calibrate transformer: 6 steps in ")


def test_manifest_records_the_cost_of_the_accuracy_report() -> None:
    from types import SimpleNamespace

    from dtcompile.stages.quantize import QuantizedComponent

    def cost(calib_s: float, cache_hit: bool) -> dict:
        result = SimpleNamespace(calib_s=calib_s, cache_hit=cache_hit)
        return QuantizedComponent(result, None, None, accuracy_s=3.0).cost()  # type: ignore[arg-type]

    assert cost(30.0, False) == {"calibration_s": 30.0, "accuracy_s": 3.0, "accuracy_to_calibration": 0.1}
    # a cache hit only restored the state: no ratio against a calibration that did not run
    assert cost(0.2, True) == {"calibration_s": 0.2, "accuracy_s": 3.0}
