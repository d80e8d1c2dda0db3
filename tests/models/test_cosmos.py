"""Cosmos-Predict2 (Text2Image and Video2World) through the same build and run paths: the tiny built-ins built for
real and compared with diffusers' own Cosmos2 pipelines at every transformer call (1e-4 rel L2, fp32,
onnxruntime) and on the decoded pixels (PSNR >= 40 dB)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dtcompile.core.errors import RecipeError
from tests.fixtures.images import psnr

ROOT = Path(__file__).resolve().parents[2]
PROMPT, NEGATIVE = "a robot arm in a warehouse", "blurry"


def _build(tmp_path_factory: pytest.TempPathFactory, recipe: str) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-cosmos")
    sets = [
        f"output.dir={out}",
        "engine.backends=[onnxruntime]",
        "engine.targets=[]",
    ]  # the parity is onnxruntime fp32; keep it quick
    return run_build(load_recipe(ROOT / "recipes" / recipe, sets)).artifact_dir


@pytest.fixture(scope="module")
def t2i(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-cosmos2-t2i.yaml")


def _reference(cls_name: str, builtin: str, **call: Any) -> tuple[Any, list[Any]]:
    """diffusers' own pipeline on the built-in's files: its output and every transformer output."""
    import diffusers
    import torch

    from dtcompile.models.builtin import builtin_model_path

    pipe = getattr(diffusers, cls_name).from_pretrained(builtin_model_path(builtin), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    preds: list[Any] = []
    pipe.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, max_sequence_length=32,
               generator=torch.Generator("cpu").manual_seed(3), **call)  # fmt: skip
    return out, preds


@pytest.mark.parametrize(("height", "width"), [(32, 48), (64, 64)])
def test_t2i_run_matches_cosmos2_text2image_every_call(t2i: Path, height: int, width: int) -> None:
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import run_artifact

    want, preds = _reference("Cosmos2TextToImagePipeline", "tiny-cosmos2-t2i", height=height, width=width)
    got = run_artifact(t2i, PROMPT, steps=4, seed=3, height=height, width=width, guidance=5.0,
                       negative_prompt=NEGATIVE, backend="onnxruntime", trace=True)  # fmt: skip
    assert len(got.trace) == len(preds) == 8  # 4 steps x (conditional + unconditional)
    errors = [rel_l2(a, b) for a, b in zip(got.trace, preds, strict=True)]
    for call, (a, err) in enumerate(zip(got.trace, errors, strict=True)):
        assert tuple(a.shape) == (1, 16, 1, height // 8, width // 8) and err <= 1e-4, f"call {call}: {err:.2e}"
    a, b = np.asarray(got.image), np.asarray(want.images[0])
    assert a.shape == b.shape == (height, width, 3)
    assert psnr(a, b) >= 40
    print(f"cosmos2 t2i {width}x{height}: max rel L2 {max(errors):.2e}, PSNR {psnr(a, b):.1f} dB")


def test_t2i_recipe_rules_in_the_dry_run(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import make_plan

    recipe = ROOT / "recipes" / "tiny-cosmos2-t2i.yaml"
    cases = {
        "export.shapes.height={min: 32, opt: 40, max: 64}": "export.shapes.height.opt",
        "export.shapes.text_len=600": "export.shapes.text_len.max: 600 is above 512",
        "export.shapes.frames=5": "makes images, not videos",
    }
    for override, message in cases.items():
        with pytest.raises(RecipeError, match=message):
            make_plan(load_recipe(recipe, [override, f"output.dir={tmp_path}"]))
    assert make_plan(load_recipe(ROOT / "recipes" / "tiny-cosmos2-t2i-fp8.yaml", [f"output.dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def v2w(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-cosmos2-v2w.yaml")


def _first_frame(height: int, width: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(5)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize(("frames", "height", "width"), [(9, 32, 48), (5, 64, 64)])
def test_v2w_run_from_an_image_matches_cosmos2_video2world_every_call(
    v2w: Path, frames: int, height: int, width: int
) -> None:
    """``dtc run --image``: the VAE encoder engine encodes the conditioning video (the image then copies of it,
    padded to the built 9 frames for 5), the transformer engine denoises; both equal diffusers' pipeline."""
    from dtcompile.core.metrics import rel_l2
    from dtcompile.manifest import read_manifest
    from dtcompile.runtime.media import video_uint8
    from dtcompile.runtime.session import run_artifact

    assert {c for c in read_manifest(v2w).components} == {"transformer", "vae_encoder"}
    image = _first_frame(40, 56)
    want, preds = _reference("Cosmos2VideoToWorldPipeline", "tiny-cosmos2-v2w", image=image, num_frames=frames,
                             height=height, width=width, output_type="np")  # fmt: skip
    got = run_artifact(v2w, PROMPT, steps=4, seed=3, frames=frames, height=height, width=width, guidance=5.0,
                       image=image, negative_prompt=NEGATIVE, backend="onnxruntime", trace=True)  # fmt: skip
    assert len(got.trace) == len(preds) == 8  # 4 steps x (conditional + unconditional)
    latent = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    errors = [rel_l2(a, b) for a, b in zip(got.trace, preds, strict=True)]
    for call, (a, err) in enumerate(zip(got.trace, errors, strict=True)):
        assert tuple(a.shape) == latent and err <= 1e-4, f"call {call}: {err:.2e}"
    a, b = video_uint8(got.image), video_uint8(want.frames[0])
    assert a.shape == b.shape == (frames, height, width, 3)
    worst = min(psnr(x, y) for x, y in zip(a, b, strict=True))
    assert worst >= 40  # every decoded frame
    print(f"cosmos2 v2w {frames}x{width}x{height}: max rel L2 {max(errors):.2e}, worst-frame PSNR {worst:.1f} dB")


def test_v2w_refuses_another_fps_and_a_missing_image(v2w: Path) -> None:
    """fps was traced into the RoPE at 16: another value is one line, not a silently different video; Video2World
    needs its conditioning image."""
    import dtcompile
    from dtcompile.core.errors import UnsupportedError

    pipe = dtcompile.load_pipeline(v2w, backend="onnxruntime")
    call = {"prompt": PROMPT, "image": _first_frame(32, 48), "num_inference_steps": 2, "num_frames": 5}
    with pytest.raises(UnsupportedError, match=r"^fps 24: this engine was exported with fps=16; use 16"):
        pipe(**call, fps=24)
    from dtcompile.runtime.session import run_artifact

    with pytest.raises(UnsupportedError, match="image"):
        run_artifact(v2w, PROMPT, steps=2, frames=5, backend="onnxruntime")


def test_real_checkpoint_recipes_plan_on_their_tiny_twins(tmp_path: Path) -> None:
    """The 2B recipes (checkpoints not available offline) pass the dry run with the source swapped for the tiny
    built-in of the same pipeline class."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import make_plan

    for recipe, twin in (
        ("cosmos2-2b-t2i-fp8.yaml", "tiny-cosmos2-t2i"),
        ("cosmos2-2b-v2w-fp8.yaml", "tiny-cosmos2-v2w"),
    ):
        sets = [f"model.source=builtin:{twin}", f"output.dir={tmp_path}"]
        assert make_plan(load_recipe(ROOT / "recipes" / recipe, sets))
    for recipe in ("tiny-cosmos2-v2w.yaml", "tiny-cosmos2-v2w-fp8.yaml"):
        assert make_plan(load_recipe(ROOT / "recipes" / recipe, [f"output.dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny-cosmos2-t2i-fp8.yaml", "tiny-cosmos2-v2w-fp8.yaml"])
def test_fp8_twins_calibrate_on_cosmos_runs_and_record_accuracy(recipe: str, tmp_path: Path) -> None:
    """The fp8 twins (about 2 to 4 min each on 2 shared CPU cores): calibrated on the pipelines' own runs, the
    padding mask and fps dropped as at run time; accuracy and the onnxruntime parity in the manifest."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    m = run_build(load_recipe(ROOT / "recipes" / recipe, [f"output.dir={tmp_path}"])).manifest
    quant = m.component("transformer").quant
    assert quant["accuracy"]["summary"]["min_psnr_db"] >= 30
    assert quant["parity"]["summary"]["min_psnr_db"] >= 40  # onnxruntime vs fake-quant torch
    assert min(quant["accuracy"]["teacher_forced"]["cos_min"]) > 0.999
