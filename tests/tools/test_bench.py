"""`dtc bench` on the tiny artifact: the report's fields, ratios from its own measurements, JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtcompile.tools.bench import BASELINE, RATIO_METRICS, ratios, write_report


def dtc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtcompile", *args], capture_output=True, text=True)


def test_bench_cli_tiny(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench" / "tiny.json"
    # one thread: torch's OpenMP barriers stall on a busy 2-core machine, which only slows the test down
    r = dtc("-q", "bench", str(tiny_artifact), "--steps", "2", "--repeat", "1", "--backend", "onnxruntime",
            "--threads", "1", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "pytorch" in r.stdout and "onnxruntime/pytorch" in r.stdout
    report = json.loads(out.read_text())
    assert report["schema"] == "dtc-bench/1" and report["name"] == "tiny-flux"
    s = report["settings"]
    assert (s["steps"], s["repeat"], s["batch"], s["height"], s["width"]) == (2, 1, 1, 64, 64)
    assert s["timer"] == "perf_counter_ns" and s["device"] == "cpu" and s["baseline_matches_artifact"] is True
    assert s["threads"] == 1 and s["threads_set"] is True
    by_name = {res["name"]: res for res in report["results"]}
    assert set(by_name) == {BASELINE, "onnxruntime"}
    for res in by_name.values():
        assert res["steps_timed"] == 2 and len(res["step_ms"]) == 2 and res["calls_per_step"] == 1
        assert all(t > 0 for t in res["step_ms"])
        # a run is its transformer steps plus text encoding and decoding
        assert res["e2e_median_s"] * 1000 > sum(res["step_ms"])
        assert res["images_per_s"] == pytest.approx(1 / res["e2e_median_s"])
        assert res["host_mb"] >= 0 and res["device_mb"] is None
    base, ort = by_name[BASELINE], by_name["onnxruntime"]
    q = report["ratios"]["onnxruntime"]
    for metric in RATIO_METRICS:
        if metric != "device_mb":
            assert q[metric] == pytest.approx(ort[metric] / base[metric]), metric
    assert q["device_mb"] is None
    assert q["step_speedup"] == pytest.approx(base["step_median_ms"] / ort["step_median_ms"])
    # same seed, prompt and size: the onnxruntime image matches torch's (fp32 parity)
    assert ort["psnr_db_vs_pytorch"] == "inf" or ort["psnr_db_vs_pytorch"] >= 40
    assert [st["name"] for st in report["build"]["stages"]][0] == "load"
    assert {(e["backend"], e["arch"]) for e in report["build"]["engines"]} >= {("tensorrt-rtx", "sm_89")}
    png = out.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in r.stdout
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_size_outside_the_artifact(tiny_artifact: Path) -> None:
    r = dtc("bench", str(tiny_artifact), "--height", "256")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: --height 256 is outside the artifact's range 32..128; rebuild with export.shapes.height covering it"
    )


def _result(name: str, step: float, e2e: float, host: float) -> dict[str, object]:
    return {"name": name, "step_median_ms": step, "step_p90_ms": step * 2, "e2e_median_s": e2e,
            "e2e_p90_s": e2e, "images_per_s": 1 / e2e, "host_mb": host, "device_mb": None}  # fmt: skip


def test_ratios_are_value_over_baseline() -> None:
    q = ratios([_result(BASELINE, 100.0, 2.0, 50.0), _result("tensorrt-rtx", 25.0, 1.0, 100.0)])["tensorrt-rtx"]
    assert q["step_median_ms"] == 0.25 and q["step_p90_ms"] == 0.25 and q["e2e_median_s"] == 0.5
    assert q["images_per_s"] == 2.0 and q["host_mb"] == 2.0 and q["device_mb"] is None
    assert q["step_speedup"] == 4.0


def test_without_matplotlib_json_is_still_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = {"results": [_result(BASELINE, 1.0, 1.0, 1.0)], "ratios": {}, "x": float("inf")}
    written, note = write_report(report, tmp_path / "r.json")
    assert written == [tmp_path / "r.json"] and not (tmp_path / "r.png").exists()
    assert note == "matplotlib is not installed (pip install 'dtcompile[bench]'): no PNG written"
    assert json.loads((tmp_path / "r.json").read_text())["x"] == "inf"


def test_realwidth_builtin_has_flux_dev_widths() -> None:
    """builtin:flux-realwidth-1: FLUX.1-dev's transformer widths (checked on the meta device, no weights)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from dtcompile.models.builtins.flux import BUILTINS, REALWIDTH_FLUX_CONFIG

    cfg = REALWIDTH_FLUX_CONFIG
    t = cfg["transformer"]
    assert t["attention_head_dim"] * t["num_attention_heads"] == 3072
    assert t["joint_attention_dim"] == cfg["text_encoder_2"]["d_model"] == 4096
    assert t["pooled_projection_dim"] == cfg["text_encoder"]["hidden_size"] == 768
    assert t["in_channels"] == 4 * cfg["vae"]["latent_channels"] == 64
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
    assert 2 ** (len(cfg["vae"]["block_out_channels"]) - 1) == 8  # FLUX.1's VAE scale factor: real token counts
    with torch.device("meta"):
        model = FluxTransformer2DModel(**dict(t, axes_dims_rope=tuple(t["axes_dims_rope"])))
    per_block = {name: sum(p.numel() for p in blocks[0].parameters())
                 for name, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks))}  # fmt: skip
    # FLUX.1-dev's per-block sizes: 19 double + 38 single blocks of these make its 11.9B parameters
    assert per_block == {"double": 339_831_296, "single": 141_591_808}
    assert BUILTINS["flux-realwidth-1"].cache_key() != BUILTINS["tiny-flux"].cache_key()
