"""`dtc build` with a quant section, end to end on tiny-flux for every format (CPU, real TensorRT-RTX builds)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtcompile.core.digests import sha256_file
from dtcompile.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
# Small calibration and evaluation so each build takes seconds; the shipped recipes use more.
FAST = ["quant.calib.size=2", "quant.calib.batch=2", "quant.calib.steps=2", "quant.accuracy.prompts=1",
        "quant.accuracy.steps=2"]  # fmt: skip
EXPECTED = {
    "fp8": ({"onnxruntime:any", "tensorrt-rtx:sm_89", "tensorrt-rtx:sm_120"}, set()),
    "int8": ({"onnxruntime:any", "tensorrt-rtx:sm_86", "tensorrt-rtx:sm_89", "tensorrt-rtx:sm_120"}, set()),
    "nvfp4": ({"tensorrt-rtx:sm_120"}, {"onnxruntime:any"}),
    "svdquant": ({"tensorrt-rtx:sm_120"}, set()),
}


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_quantized_build(fmt: str, tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    recipe = load_recipe(ROOT / "recipes" / f"tiny-flux-{fmt}.yaml", [f"output.dir={tmp_path}", *FAST])
    m = run_build(recipe).manifest.to_json()
    comp = m["components"]["transformer"]
    built = {f"{e['backend']}:{e['arch']}" for e in comp["engines"]}
    want, not_built = EXPECTED[fmt]
    assert built == want
    assert {f"{s['backend']}:{s['arch']}" for s in m["skipped"]} == not_built
    for e in comp["engines"]:
        assert sha256_file(tmp_path / recipe.name / e["file"]) == e["sha256"]
    q = comp["quant"]
    assert q["format"] == fmt and m["precision"].startswith(fmt)
    # (a) quantized vs unquantized on held-out prompts: measured, recorded, and sane for a tiny model
    assert 0.99 < q["accuracy"]["summary"]["min_cos"] <= 1.0
    assert q["accuracy"]["psnr_db"]
    # what the report cost next to calibration (this build calibrated unless an earlier one cached the state)
    assert q["calibration_s"] > 0 and q["accuracy_s"] > 0
    if not q["cache_hit"]:
        assert q["accuracy_to_calibration"] == pytest.approx(q["accuracy_s"] / q["calibration_s"], rel=1e-2)
    # (b) exported graph vs fake-quant torch within the gate (the build fails otherwise): the format's tolerance
    # or twice the model's own rounding noise, measured on the same steps and recorded
    p = q["parity"]
    assert p["gate"] == pytest.approx(max(p["tolerance"], p["noise"]["margin"] * p["noise"]["max_rel_err"]), rel=1e-5)
    assert len(p["noise"]["rel_err_max"]) == len(p["teacher_forced"]["rel_err_max"])
    assert p["summary"]["max_rel_err"] <= p["gate"]
    if fmt == "fp8":  # `dtc inspect` names both checks and the gate parity (b) passed
        from click.testing import CliRunner

        from dtcompile.cli.inspect import inspect_cmd

        out = CliRunner().invoke(inspect_cmd, [str(tmp_path / recipe.name)]).output
        assert "  quant fp8 (a) vs unquantized: max rel err " in out
        assert f"gate {p['gate']:.2e} (tolerance 1e-03, own noise {p['noise']['max_rel_err']:.2e})" in out
    graph = q["graph"]
    if fmt == "fp8":
        assert graph["fp8_qdq"] > 0 and graph["custom_ops"] == {} and graph["fp8_attention"] == 4
    elif fmt == "int8":
        assert graph["int8_qdq"] > 0 and graph["custom_ops"] == {}
    else:
        assert graph["fp4_weights"] > 0 and "trt::TRT_FP4DynamicQuantize" in graph["custom_ops"]
        assert graph["onnxruntime_runnable"] is False


def test_impossible_quant_recipe_fails_dry_run_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dtcompile", "build", "--recipe", str(ROOT / "recipes" / "tiny-flux-fp8.yaml"),
         "--set", "engine.targets=[sm_86]", "--set", f"output.dir={tmp_path}", "--dry-run"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fp8" in lines[0] and "sm_86" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())


def test_quantized_artifact_runs_in_onnxruntime(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build

    recipe = load_recipe(
        ROOT / "recipes" / "tiny-flux-int8.yaml", [f"output.dir={tmp_path}", "engine.targets=[sm_89]", *FAST]
    )
    artifact = run_build(recipe).artifact_dir
    result = run_artifact(artifact, "a red fox", steps=2, backend="onnxruntime", trace=True)
    assert len(result.trace) == 2 and result.image.size == (64, 64)
    assert read_manifest(artifact).to_json()["components"]["transformer"]["quant"]["format"] == "int8"


def _build_quantize(tmp_path: Path, *extra: str) -> list[str]:
    """`dtc build` of tiny-flux-fp8 up to the quantize stage, calibrating afresh (its own cache folder)."""
    return [sys.executable, "-m", "dtcompile", "build", "--recipe", str(ROOT / "recipes" / "tiny-flux-fp8.yaml"),
            "--set", f"output.dir={tmp_path / 'out'}", "--set", "quant.calib.size=4", "--set",
            "quant.accuracy.prompts=1", "--set", "quant.accuracy.steps=2", "--stop-after", "quantize",
            *extra]  # fmt: skip


def test_build_shows_a_calibration_bar_on_a_terminal_and_nothing_with_quiet(tmp_path: Path) -> None:
    import os

    leader, follower = os.openpty()  # a real pseudo-terminal (0 x 0: no size, as under `script` or CI)
    env = {**os.environ, "DTC_CACHE_DIR": str(tmp_path / "cache-tty")}
    try:
        proc = subprocess.Popen(_build_quantize(tmp_path), stdout=follower, stderr=follower, env=env)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the build closed its side
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=600) == 0
    finally:
        os.close(leader)
    shown = b"".join(chunks).decode(errors="replace")
    # 4 prompts, batch 2, 4 steps: 8 steps, drawn with count, elapsed<remaining (the ETA) and rate
    bar = r"calibrate transformer: +\d+%\|.*\| +[1-7]/8 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)"
    assert re.search(bar, shown), shown[-3000:]
    assert re.search(r"calibrate transformer: 8 steps in [\d.]+ s", shown)

    env["DTC_CACHE_DIR"] = str(tmp_path / "cache-quiet")  # calibrates again: the loop runs, silently
    r = subprocess.run(_build_quantize(tmp_path, "--quiet"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "built:" in r.stdout
    assert not re.search(r"calibrate|accuracy|steps? in|step/s", r.stderr), r.stderr
