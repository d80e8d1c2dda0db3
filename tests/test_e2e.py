"""The spine end to end: build tiny-flux for real, run it, compare with the plain diffusers pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtcompile.core.digests import sha256_file
from dtcompile.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox in the snow"


def dtc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtcompile", *args], capture_output=True, text=True, cwd=cwd)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_manifest_lists_real_engines(tiny_artifact: Path) -> None:
    m = read_manifest(tiny_artifact)
    engines = m.components["transformer"].engines
    got = {(e.backend, e.arch) for e in engines}
    assert got == {("onnxruntime", "any"), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")}
    for e in engines:
        path = tiny_artifact / e.file
        assert path.is_file() and path.stat().st_size == e.size > 0
        assert sha256_file(path) == e.sha256
    rtx = {e.arch: e for e in engines if e.backend == "tensorrt-rtx"}
    assert rtx["sm_89"].sha256 != rtx["sm_120"].sha256  # one compute capability per build
    assert m.components["transformer"].parity["rel_l2"] < 1e-4
    assert [s.name for s in m.stages] == ["load", "export", "build"]
    assert all(s.peak_rss_mb > 0 and s.wall_s > 0 for s in m.stages)
    assert m.versions["tensorrt_rtx"] and m.source.component_sha256
    assert m.skipped == []


def test_rebuild_is_a_no_op_with_the_same_key(tiny_artifact: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    recipe = load_recipe(ROOT / "recipes" / "tiny-flux.yaml", [f"output.dir={tiny_artifact.parent}"])
    before = (tiny_artifact / "manifest.json").read_bytes()
    report = run_build(recipe)
    assert report.up_to_date
    assert (tiny_artifact / "manifest.json").read_bytes() == before


def _reference_run(steps: int, seed: int, height: int, width: int, text_len: int) -> tuple[list, np.ndarray]:
    import torch
    from diffusers import FluxPipeline

    from dtcompile.models.builtin import builtin_model_path

    pipe = FluxPipeline.from_pretrained(builtin_model_path("tiny-flux"), dtype=torch.float32)
    preds: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    image = pipe(
        PROMPT,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=text_len,
    ).images[0]
    return preds, np.asarray(image)


@pytest.mark.parametrize("height,width", [(64, 64), (32, 96)])
def test_run_matches_diffusers_every_step(tiny_artifact: Path, height: int, width: int) -> None:
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import run_artifact

    steps = 4
    ref_preds, ref_image = _reference_run(steps, 7, height, width, 32)
    result = run_artifact(
        tiny_artifact, PROMPT, steps=steps, seed=7, height=height, width=width, backend="onnxruntime", trace=True
    )
    assert result.backend == "onnxruntime"
    assert len(result.trace) == len(ref_preds) == steps
    for step, (got, ref) in enumerate(zip(result.trace, ref_preds, strict=True)):
        assert got.shape == ref.shape
        assert rel_l2(got, ref) <= 1e-4, f"step {step}"
    assert psnr(np.asarray(result.image), ref_image) >= 40


def test_cli_demo_flow(tiny_artifact: Path, tmp_path: Path) -> None:
    png = tmp_path / "img.png"
    r = dtc("run", str(tiny_artifact), "--prompt", PROMPT, "--steps", "2", "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "onnxruntime" in r.stdout
    r = dtc("inspect", str(tiny_artifact), "--verify")
    assert r.returncode == 0, r.stderr
    assert "tensorrt-rtx  sm_89" in r.stdout and "tensorrt-rtx  sm_120" in r.stdout
    r = dtc("inspect", str(tiny_artifact), "--json")
    assert json.loads(r.stdout)["name"] == "tiny-flux"


def test_trt_backend_without_gpu_refuses_with_reason(tiny_artifact: Path) -> None:
    r = dtc("run", str(tiny_artifact), "--prompt", PROMPT, "--backend", "tensorrt-rtx")
    assert r.returncode != 0
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in r.stderr
    assert line == (
        "error: tensorrt-rtx engines (sm_89, sm_120) need an NVIDIA GPU to run and this machine has none; "
        "use --backend onnxruntime"
    )


def test_size_outside_profile_is_refused(tiny_artifact: Path) -> None:
    r = dtc("run", str(tiny_artifact), "--prompt", PROMPT, "--height", "256")
    assert r.returncode != 0
    assert r.stderr.strip() == (
        "error: --height 256 is outside the artifact's range 32..128; rebuild with export.shapes.height covering it"
    )


# --- bad input: one line, non-zero exit, nothing left in engines/ ---------------------------------------------

BAD_RECIPES = {
    "unknown key": ("engine:\n", "engine:\n  precison: fp8\n", "engine.precison: unknown key"),
    "wrong type": ("opset: 19", "opset: nineteen", "export.opset: 'nineteen': Input should be a valid integer"),
    "missing folder": (
        "builtin:tiny-flux",
        "./no/such/folder",
        "model.source: local model folder './no/such/folder' does not exist",
    ),
    "unknown arch": ("[sm_89, sm_120]", "[sm_89, sm_91]", "engine.targets[1]: 'sm_91' is not a known arch"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_one_line_no_partial_artifact(case: str, tmp_path: Path) -> None:
    old, new, expected = BAD_RECIPES[case]
    text = (ROOT / "recipes" / "tiny-flux.yaml").read_text()
    assert old in text
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text.replace(old, new, 1).replace("dir: engines", f"dir: {tmp_path / 'engines'}"))
    r = dtc("build", "--recipe", str(recipe), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


def test_truncated_engine_file_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny-flux"
    shutil.copytree(tiny_artifact, copy)
    m = read_manifest(copy)
    engines = {e.backend + ":" + e.arch: e for e in m.components["transformer"].engines}
    for key in ("onnxruntime:any", "tensorrt-rtx:sm_89"):
        path = copy / engines[key].file
        path.write_bytes(path.read_bytes()[: engines[key].size // 2])
    r = dtc("run", str(copy), "--prompt", PROMPT, "--backend", "onnxruntime", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "transformer.onnx" in r.stderr and "truncated or replaced" in r.stderr
    assert not (tmp_path / "x.png").exists()
    r = dtc("inspect", str(copy), "--verify")
    assert r.returncode == 2 and "truncated or replaced" in r.stderr


def test_failure_mid_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtcompile.core.errors import BuildError
    from dtcompile.recipe import load_recipe
    from dtcompile.stages import build as build_stage
    from dtcompile.stages.runner import run_build

    def boom(*args: object, **kwargs: object) -> None:
        raise BuildError("injected failure")

    monkeypatch.setattr(build_stage, "engines_from_onnx", boom)
    recipe = load_recipe(ROOT / "recipes" / "tiny-flux.yaml", [f"output.dir={tmp_path}"])
    with pytest.raises(BuildError):
        run_build(recipe)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_and_stop_after(tmp_path: Path) -> None:
    recipe = str(ROOT / "recipes" / "tiny-flux.yaml")
    r = dtc("build", "--recipe", recipe, "--set", f"output.dir={tmp_path}", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "tensorrt-rtx  sm_89   build" in r.stdout and "dry run: OK" in r.stdout
    assert list(tmp_path.iterdir()) == []
    r = dtc("build", "--recipe", recipe, "--set", f"output.dir={tmp_path}", "--stop-after", "export")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "tiny-flux")
    assert m.stopped_after == "export"
    assert (tmp_path / "tiny-flux" / m.components["transformer"].onnx.file).is_file()
    r = dtc("run", str(tmp_path / "tiny-flux"), "--prompt", "x")
    assert r.returncode == 2 and "stopped after stage 'export'" in r.stderr


def test_datacenter_target_without_gpu_is_reported(tmp_path: Path) -> None:
    recipe = str(ROOT / "recipes" / "tiny-flux.yaml")
    r = dtc(
        "build", "--recipe", recipe, "--set", f"output.dir={tmp_path}",
        "--set", "engine.backends=[onnxruntime, tensorrt]", "--set", "engine.targets=[sm_90]", "--dry-run",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "tensorrt      sm_90   will NOT build: " in r.stdout


def test_unreachable_hub_id_is_one_line(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # never download in tests
    r = subprocess.run(
        [sys.executable, "-m", "dtcompile", "build", "--recipe", str(ROOT / "recipes" / "tiny-flux.yaml"),
         "--set", "model.source=dtc-test/no-such-model", "--set", f"output.dir={tmp_path / 'engines'}"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model.source: cannot fetch 'dtc-test/no-such-model' from the Hugging Face hub")
    assert "Traceback" not in r.stderr and not (tmp_path / "engines").exists()
