"""The backend paths the CPU suite cannot run: a TensorRT engine built for this GPU, deserialized and run.

Every test builds a tiny recipe for the local arch with the local TensorRT flavour (tensorrt-rtx where it
targets the arch, else datacenter tensorrt: sm_90, sm_100) next to onnxruntime, and compares the engine with the
artifact's own ONNX graph run by onnxruntime: per engine on seeded inputs, and per pipeline run (every step's
noise prediction, the final image). Each skips with its reason where CUDA, the compute capability or a
TensorRT flavour for this GPU is absent. scripts/gpu_check.py runs them (`pytest -m gpu`); docs/gpu-check.md.
Not run on a GPU by this project yet: the tolerances (tests/fixtures/engine_parity.py) are first guesses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.engine_parity import (
    cache_decisions,
    compare_engines,
    compare_runs,
    lora_moved,
    run_settings,
    tolerance,
)
from tests.fixtures.gpu import (
    ENGINES_ENV,
    FLAVOUR,
    GPU_ARCH,
    LORA,
    LORA_FUSED,
    LORA_SCALE,
    REFITTABLE,
    build_for_gpu,
    requires_sm,
    requires_trt,
)

pytestmark = requires_trt


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """``built(recipe, *overrides, label=...)``: the artifact, built once per module and label into
    ``$DTC_GPU_CHECK_ENGINES/<label>/`` when set (scripts/gpu_check.py points it at its own builds, which the same
    overrides make up-to-date no-ops here), else into a temp folder."""
    root = Path(os.environ[ENGINES_ENV]) if os.environ.get(ENGINES_ENV) else tmp_path_factory.mktemp("gpu-engines")
    done: dict[str, Path] = {}

    def get(recipe: str, *overrides: str, label: str | None = None) -> Path:
        label = label or recipe
        if label not in done:
            done[label] = build_for_gpu(recipe, root / label, *overrides)
        return done[label]

    return get


def _run(artifact: Path, backend: str, **kw):
    """A traced run with the comparison settings (engine_parity.run_settings: prompt, steps, seed, ...)."""
    from dtcompile.runtime.session import run_artifact

    settings = run_settings(artifact)
    return run_artifact(artifact, settings.pop("prompt"), backend=backend, trace=True, **settings, **kw)


def _graphs(artifact: Path) -> set[str]:
    """The components with an ONNX graph (each must have an engine for this GPU too)."""
    m = json.loads((artifact / "manifest.json").read_text())
    return {n for n, c in m["components"].items() if any(e["backend"] == "onnxruntime" for e in c.get("engines", []))}


def _assert_engines_match(artifact: Path, components: set[str] | None = None) -> None:
    max_l2, _ = tolerance(artifact)
    rows = compare_engines(artifact, FLAVOUR, GPU_ARCH)
    assert {r["component"] for r in rows} == (components or _graphs(artifact))
    worst = max(rows, key=lambda r: r["rel_l2"])
    assert worst["rel_l2"] <= max_l2, worst


def _assert_runs_match(artifact: Path, got, ref) -> dict:
    max_l2, min_psnr = tolerance(artifact)
    assert (got.backend, got.arch) == (FLAVOUR, GPU_ARCH)
    assert ref.backend == "onnxruntime"
    assert len(got.trace) >= got.steps
    cmp = compare_runs(got, ref)
    assert cmp["max_step_rel_l2"] <= max_l2, cmp
    assert cmp["psnr_db"] >= min_psnr, cmp
    return cmp


@pytest.mark.parametrize("recipe", ["tiny-flux", pytest.param("tiny-flux-fp8", marks=requires_sm(89))])
def test_engine_for_this_gpu_deserializes_and_matches_onnxruntime(built, recipe: str) -> None:
    art = built(recipe)
    engines = json.loads((art / "manifest.json").read_text())["components"]["transformer"]["engines"]
    assert any(e["backend"] == FLAVOUR and e["arch"] == GPU_ARCH for e in engines)
    _assert_engines_match(art, {"transformer"})
    _assert_runs_match(art, _run(art, FLAVOUR), _run(art, "onnxruntime"))


def test_component_engines_run_and_match_onnxruntime(built) -> None:
    art = built("tiny-flux-components")
    _assert_engines_match(art, {"transformer", "text_encoder", "text_encoder_2", "vae_decoder"})
    _assert_runs_match(art, _run(art, FLAVOUR), _run(art, "onnxruntime"))


@pytest.mark.parametrize("recipe", ["tiny-sd3", "tiny-wan21", "tiny-wan22", "tiny-flux2"])
def test_family_engines_match_onnxruntime(built, recipe: str) -> None:
    art = built(recipe)
    _assert_engines_match(art)
    _assert_runs_match(art, _run(art, FLAVOUR), _run(art, "onnxruntime"))


def test_kontext_engine_edits_like_onnxruntime(built) -> None:
    from PIL import Image

    art = built("tiny-flux-kontext")
    ref_image = Image.new("RGB", (64, 64), (200, 40, 40))
    _assert_runs_match(art, _run(art, FLAVOUR, image=ref_image), _run(art, "onnxruntime", image=ref_image))


def test_refit_on_a_gpu_built_engine_equals_a_rebuild_with_the_lora_fused(built, tmp_path: Path) -> None:
    import dtcompile

    base = built("tiny-flux", REFITTABLE, label="refit-base")
    fused = built("tiny-flux", LORA_FUSED, label="lora-fused")
    report = dtcompile.refit(base, [(str(LORA), LORA_SCALE)], out=tmp_path / "refit")
    assert f"{FLAVOUR}:{GPU_ARCH}" in report.refit_engines and not report.dropped
    max_l2, min_psnr = tolerance(base)

    refit_run, fused_run = _run(report.artifact_dir, FLAVOUR), _run(fused, FLAVOUR)
    cmp = compare_runs(refit_run, fused_run)
    assert cmp["max_step_rel_l2"] <= max_l2 and cmp["psnr_db"] >= min_psnr, cmp
    base_run = _run(base, FLAVOUR)
    assert lora_moved(compare_runs(refit_run, base_run)["max_step_rel_l2"], cmp["max_step_rel_l2"])

    restored = dtcompile.refit(report.artifact_dir, [], out=tmp_path / "restored")
    again = compare_runs(_run(restored.artifact_dir, FLAVOUR), base_run)
    assert again["max_step_rel_l2"] <= 1e-4, again  # --lora none puts the base weights back


@pytest.mark.parametrize("recipe", ["tiny-flux-cache", "tiny-sd3-cache", "tiny-wan21-cache", "tiny-wan22-cache"])
def test_block_cache_parts_run_on_the_engine(built, recipe: str) -> None:
    art = built(recipe)
    _assert_engines_match(art)  # every part engine against its graph
    off = _run(art, FLAVOUR, cache=False)
    _assert_runs_match(art, off, _run(art, "onnxruntime", cache=False))
    assert off.cache_stats is not None and off.cache_stats["blocks_skipped"] == 0
    on, on_ref = _run(art, FLAVOUR), _run(art, "onnxruntime")
    assert on.cache_stats is not None and on.cache_stats["blocks_skipped"] > 0
    if cache_decisions(on.cache_stats) == cache_decisions(on_ref.cache_stats):
        _assert_runs_match(art, on, on_ref)
    else:  # a first-block change within rounding of its threshold: the two runs part ways there
        assert on.cache_stats["mode"] == "first_block", (on.cache_stats, on_ref.cache_stats)


def test_cache_off_engine_matches_the_monolithic_engine(built) -> None:
    mono, split = built("tiny-flux"), built("tiny-flux-cache")
    cmp = compare_runs(_run(split, FLAVOUR, cache=False), _run(mono, FLAVOUR))
    max_l2, min_psnr = tolerance(mono)
    assert cmp["max_step_rel_l2"] <= max_l2 and cmp["psnr_db"] >= min_psnr, cmp


def test_engine_refuses_shapes_outside_its_profile(built) -> None:
    from dtcompile.backends import get_backend
    from dtcompile.core.errors import ArtifactError
    from tests.fixtures.engine_parity import engine_feeds

    art = built("tiny-flux")
    comp = json.loads((art / "manifest.json").read_text())["components"]["transformer"]
    entry = next(e for e in comp["engines"] if e["backend"] == FLAVOUR)
    runner = get_backend(FLAVOUR).open_runner(art / entry["file"], entry)
    feed = engine_feeds(comp)
    batch = comp["profile"]["hidden_states"]["max"][0] + 1
    feed = {k: v.expand(batch, *v.shape[1:]) if k not in ("img_ids", "txt_ids") else v for k, v in feed.items()}
    with pytest.raises(ArtifactError, match="outside the engine's profile"):
        runner(feed)


def test_bench_times_the_engine_with_cuda_events(built) -> None:
    from dtcompile.tools.bench import bench_artifact

    report = bench_artifact(built("tiny-flux"), (FLAVOUR,), steps=2, repeat=1, warmup=1)
    assert report["settings"]["timer"] == "cuda_events"
    engine = next(r for r in report["results"] if r["backend"] == FLAVOUR)
    assert engine["arch"] == GPU_ARCH and engine["device_mb"] is not None and engine["step_median_ms"] > 0
    assert engine["psnr_db_vs_pytorch"] >= tolerance(built("tiny-flux"))[1]
