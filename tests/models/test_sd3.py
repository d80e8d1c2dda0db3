"""SD3 / SD3.5 through the same build, run and serve paths as FLUX: tiny-sd3 built for real, compared with
the plain diffusers pipeline step by step (classifier-free guidance with a negative prompt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError
from tests.fixtures.images import psnr

ROOT = Path(__file__).resolve().parents[2]
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def sd3_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-sd3")
    return run_build(load_recipe(ROOT / "recipes" / "tiny-sd3.yaml", [f"output.dir={out}"])).artifact_dir


def test_artifact_has_the_transformer_for_every_target(sd3_artifact: Path) -> None:
    from dtcompile.manifest import read_manifest

    m = read_manifest(sd3_artifact)
    assert m.source.pipeline_class == "StableDiffusion3Pipeline"
    engines = {(e.backend, e.arch) for e in m.components["transformer"].engines}
    assert engines == {("onnxruntime", "any"), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")}
    assert m.components["transformer"].parity["rel_l2"] < 1e-4
    profile = m.components["transformer"].profile
    assert profile["hidden_states"]["min"][0] == 1 and profile["hidden_states"]["max"][0] == 4  # CFG doubles 2


def test_run_matches_diffusers_every_step_with_cfg_and_a_negative_prompt(sd3_artifact: Path) -> None:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.runtime.session import run_artifact

    pipe = StableDiffusion3Pipeline.from_pretrained(builtin_model_path("tiny-sd3"), dtype=torch.float32)
    preds: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    ref = pipe(
        PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3), max_sequence_length=32,
    ).images[0]  # fmt: skip
    got = run_artifact(sd3_artifact, PROMPT, steps=4, seed=3, guidance=5.0, negative_prompt=NEGATIVE,
                       backend="onnxruntime", trace=True)  # fmt: skip
    assert len(got.trace) == len(preds) == 4
    for step, (a, b) in enumerate(zip(got.trace, preds, strict=True)):
        assert a.shape == b.shape == (2, 4, 32, 32)  # cond + uncond in one batch
        assert rel_l2(a, b) <= 1e-4, f"step {step}"
    assert psnr(np.asarray(got.image), np.asarray(ref)) >= 40


def test_the_server_path_takes_a_negative_prompt_and_matches_the_run(sd3_artifact: Path, tiny_artifact: Path) -> None:
    from dtcompile.runtime.session import run_artifact
    from dtcompile.serve.models import ServedModel, ServeOptions
    from dtcompile.serve.protocol import APIError, parse_request

    options = ServeOptions(default_steps=4)
    model = ServedModel.open(sd3_artifact)
    req = parse_request({"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 3, "guidance_scale": 5.0})
    job = model.make_job(req, options, capacity=2)
    model.load(options)
    served = model.generate([job])[0][0]
    ran = run_artifact(sd3_artifact, PROMPT, steps=4, seed=3, guidance=5.0, negative_prompt=NEGATIVE)
    assert psnr(np.asarray(served), np.asarray(ran.image)) >= 40
    with pytest.raises(APIError) as err:  # FLUX.1 is guidance-distilled
        ServedModel.open(tiny_artifact).make_job(req, options, capacity=2)
    assert err.value.status == 400 and err.value.param == "negative_prompt"


def test_sd3_shape_rules_in_the_dry_run(tmp_path: Path) -> None:
    from dtcompile.api import plan

    recipe = str(ROOT / "recipes" / "tiny-sd3.yaml")
    with pytest.raises(RecipeError, match=r"export.shapes.height: SD3 engines are built for one size"):
        plan(recipe, ["export.shapes.height={min: 32, opt: 64, max: 128}", f"output.dir={tmp_path}"])
    with pytest.raises(RecipeError, match=r"image width 66 is not a positive multiple of 4"):
        plan(recipe, ["export.shapes.width={min: 66, opt: 66, max: 66}", f"output.dir={tmp_path}"])
    with pytest.raises(RecipeError, match=r"text_len: SD3 engines take one text length"):
        plan(recipe, ["export.shapes.text_len={min: 16, opt: 32, max: 64}", f"output.dir={tmp_path}"])


def test_run_refuses_a_size_other_than_the_built_one(sd3_artifact: Path) -> None:
    from dtcompile.runtime.session import run_artifact

    with pytest.raises(UnsupportedError, match="outside the artifact's range 64..64"):
        run_artifact(sd3_artifact, PROMPT, steps=1, height=128, width=64)


def test_fp8_build_quantizes_linears_and_attention_and_stays_close(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    report = run_build(load_recipe(ROOT / "recipes" / "tiny-sd3-fp8.yaml", [f"output.dir={tmp_path}"]))
    quant = report.manifest.components["transformer"].quant
    assert quant["graph"]["fp8_qdq"] > 0 and quant["graph"]["fp8_attention"] > 0
    assert quant["parity"]["summary"]["min_psnr_db"] >= 40  # onnxruntime vs fake-quant torch
    assert quant["accuracy"]["summary"]["min_psnr_db"] >= 30  # quantized vs unquantized
    engines = {(e.backend, e.arch) for e in report.manifest.components["transformer"].engines}
    assert {("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")} <= engines


def test_skip_layer_guidance_is_refused_not_ignored(sd3_artifact: Path) -> None:
    import torch

    from dtcompile.api import load_pipeline

    pipe = load_pipeline(sd3_artifact, backend="onnxruntime")
    with pytest.raises(UnsupportedError, match=r"passed skip_layers to the engine-backed component"):
        pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
             generator=torch.Generator("cpu").manual_seed(0), max_sequence_length=32)  # fmt: skip


def test_tiny_sd3_has_sd35_medium_dual_attention_and_qk_norm() -> None:
    from dtcompile.models.builtins.sd3 import TINY_SD3_CONFIG

    assert TINY_SD3_CONFIG["transformer"]["dual_attention_layers"] and TINY_SD3_CONFIG["transformer"]["qk_norm"]


def test_lora_fuse_and_refit_agree_and_the_base_comes_back(sd3_artifact: Path, tmp_path: Path) -> None:
    """An SD3 LoRA through diffusers' SD3 loader: built fused == refit into the plain artifact; --lora none."""
    import torch
    from diffusers import SD3Transformer2DModel

    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact
    from tests.fixtures.lora import FLUX_TARGETS, make_peft_lora

    transformer = SD3Transformer2DModel.from_pretrained(builtin_model_path("tiny-sd3") / "transformer")
    lora = make_peft_lora(transformer, tmp_path / "sd3-style.safetensors", pipeline_class="StableDiffusion3Pipeline",
                          targets=FLUX_TARGETS, rank=4, alpha=8.0, seed=1)  # fmt: skip
    overrides = [f"output.dir={tmp_path / 'fused'}", "engine={backends: [onnxruntime]}",
                 f"lora=[{{source: {lora}, scale: 0.8}}]"]  # fmt: skip
    fused = run_build(load_recipe(ROOT / "recipes" / "tiny-sd3.yaml", overrides)).artifact_dir
    refit = refit_artifact(sd3_artifact, [(str(lora), 0.8)], out_dir=tmp_path / "refit", drop_unrefittable=True)
    back = refit_artifact(refit.artifact_dir, [], out_dir=tmp_path / "back", drop_unrefittable=True)

    def image(artifact: Path) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(
                run_artifact(artifact, PROMPT, steps=4, seed=3, guidance=5.0, backend="onnxruntime").image
            )

    base, with_lora = image(sd3_artifact), image(fused)
    assert not np.array_equal(base, with_lora)  # the adapter changes the image
    assert psnr(image(refit.artifact_dir), with_lora) >= 40
    assert psnr(image(back.artifact_dir), base) >= 40


def test_block_cache_off_matches_the_monolithic_artifact_and_counts_skips(sd3_artifact: Path, tmp_path: Path) -> None:
    """SD3's MMDiT blocks split into block engines (recipes/tiny-sd3-cache.yaml), CFG batch and negative prompt."""
    from dtcompile.core.metrics import rel_l2
    from dtcompile.manifest import read_manifest
    from dtcompile.recipe import load_recipe
    from dtcompile.recipe.cache import stats_line
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build

    cached = run_build(load_recipe(ROOT / "recipes" / "tiny-sd3-cache.yaml", [f"output.dir={tmp_path}"])).artifact_dir
    m = read_manifest(cached)
    parts = m.component("transformer").parts
    assert parts == ["transformer.prologue", "transformer.blocks0", "transformer.blocks1", "transformer.epilogue"]
    for name in parts:
        assert {(e.backend, e.arch) for e in m.component(name).engines} >= {
            ("tensorrt-rtx", "sm_89"),
            ("tensorrt-rtx", "sm_120"),
        }
    kw = {"steps": 4, "seed": 3, "guidance": 5.0, "negative_prompt": NEGATIVE, "backend": "onnxruntime", "trace": True}
    mono = run_artifact(sd3_artifact, PROMPT, **kw)
    off = run_artifact(cached, PROMPT, cache=False, **kw)
    assert len(off.trace) == len(mono.trace) == 4
    for step, (got, ref) in enumerate(zip(off.trace, mono.trace, strict=True)):
        assert got.shape == (2, 4, 32, 32)  # the CFG batch
        assert rel_l2(got, ref) <= 1e-4, f"step {step}"
    assert (
        stats_line(off.cache_stats)
        == "cache off: 8 of 8 block evaluations run, 0 skipped (0.0%) over 4 transformer calls"
    )
    on = run_artifact(cached, PROMPT, **kw)
    assert (on.cache_stats["blocks_skipped"], on.cache_stats["blocks_evaluated"]) == (2, 6)
    assert on.cache_stats["cached_calls"] == [1, 3]
    assert rel_l2(on.trace[0], off.trace[0]) == 0.0 and rel_l2(on.trace[1], off.trace[1]) > 1e-6


def test_load_pipeline_takes_the_diffusers_docs_call(sd3_artifact: Path) -> None:
    """StableDiffusion3Pipeline's docs example, ``pipe(prompt)``, on the pipeline ``load_pipeline`` returns: the
    default size and text length become the built ones; a size it was not built for is one line naming it."""
    import dtcompile

    pipe = dtcompile.load_pipeline(sd3_artifact, backend="onnxruntime")
    image = pipe("A cat holding a sign that says hello world").images[0]
    assert image.size == (64, 64)
    with pytest.raises(UnsupportedError, match=r"^height 1024 is outside the artifact's range 64..64"):
        pipe("A cat holding a sign that says hello world", height=1024, width=1024)
