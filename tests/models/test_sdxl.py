"""SDXL (a UNet, not an MMDiT) through the same build and run paths: tiny-sdxl built for real and compared with
the plain diffusers pipeline at every UNet call (classifier-free guidance with a negative prompt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError
from tests.fixtures.images import psnr

ROOT = Path(__file__).resolve().parents[2]
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def sdxl_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipes/tiny-sdxl.yaml built with its onnxruntime engine only (the RTX engines: test_rtx_engines...)."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-sdxl")
    overrides = [f"output.dir={out}", "engine={backends: [onnxruntime]}"]
    return run_build(load_recipe(ROOT / "recipes" / "tiny-sdxl.yaml", overrides)).artifact_dir


def test_artifact_has_the_unet_with_added_conditions_as_graph_inputs(sdxl_artifact: Path) -> None:
    from dtcompile.manifest import read_manifest

    m = read_manifest(sdxl_artifact)
    assert m.source.pipeline_class == "StableDiffusionXLPipeline"
    unet = m.components["unet"]
    assert unet.input_names() == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.parity["rel_l2"] < 1e-4
    assert unet.profile["sample"]["min"][0] == 1 and unet.profile["sample"]["max"][0] == 4  # CFG doubles 2
    assert unet.profile["time_ids"]["opt"] == [2, 6] and unet.profile["encoder_hidden_states"]["opt"] == [2, 77, 64]


def test_run_matches_diffusers_every_unet_call_with_cfg_and_a_negative_prompt(sdxl_artifact: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.runtime.session import run_artifact

    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_model_path("tiny-sdxl"), dtype=torch.float32)
    preds: list[torch.Tensor] = []
    pipe.unet.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    ref = pipe(
        PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]  # fmt: skip
    got = run_artifact(sdxl_artifact, PROMPT, steps=4, seed=3, guidance=5.0, negative_prompt=NEGATIVE,
                       backend="onnxruntime", trace=True)  # fmt: skip
    assert len(got.trace) == len(preds) == 4
    for step, (a, b) in enumerate(zip(got.trace, preds, strict=True)):
        assert a.shape == b.shape == (2, 4, 32, 32)  # uncond + cond in one batch
        assert float(b.abs().mean()) > 0.1  # a real prediction, not zeros
        assert rel_l2(a, b) <= 1e-4, f"call {step}"
    assert psnr(np.asarray(got.image), np.asarray(ref)) >= 40


def test_the_stand_in_takes_the_unet_call_and_refuses_cross_attention_kwargs(sdxl_artifact: Path) -> None:
    """diffusers' UNet call: sample and timestep positional (a 0-d timestep), added_cond_kwargs nested; a LoRA
    scale through cross_attention_kwargs would be ignored by an engine, so it is refused."""
    import torch

    from dtcompile.api import load_pipeline

    pipe = load_pipeline(sdxl_artifact, backend="onnxruntime")
    with pytest.raises(UnsupportedError, match=r"passed cross_attention_kwargs to the engine-backed component"):
        pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, cross_attention_kwargs={"scale": 0.5},
             generator=torch.Generator("cpu").manual_seed(0))  # fmt: skip


def test_sdxl_shape_rules_in_the_dry_run(tmp_path: Path) -> None:
    from dtcompile.api import plan

    recipe = str(ROOT / "recipes" / "tiny-sdxl.yaml")
    with pytest.raises(RecipeError, match=r"export.shapes.height: SDXL engines are built for one size"):
        plan(recipe, ["export.shapes.height={min: 32, opt: 64, max: 128}", f"output.dir={tmp_path}"])
    with pytest.raises(RecipeError, match=r"image width 66 is not a positive multiple of 4"):
        plan(recipe, ["export.shapes.width={min: 66, opt: 66, max: 66}", f"output.dir={tmp_path}"])
    with pytest.raises(RecipeError, match=r"text_len: SDXL encodes every prompt to CLIP's 77 tokens"):
        plan(recipe, ["export.shapes.text_len=32", f"output.dir={tmp_path}"])
    with pytest.raises(UnsupportedError, match=r"cache: StableDiffusionXLPipeline artifacts are not split"):
        plan(recipe, ["cache={mode: first_block, threshold: 0.1}", f"output.dir={tmp_path}"])  # out of scope


def test_an_image_for_sdxl_is_one_line(sdxl_artifact: Path) -> None:
    from PIL import Image

    from dtcompile.runtime.session import run_artifact

    with pytest.raises(UnsupportedError, match=r"^--image: StableDiffusionXLPipeline artifacts take no reference"):
        run_artifact(sdxl_artifact, PROMPT, steps=1, image=Image.new("RGB", (64, 64)))


@pytest.mark.slow  # 35 s on 2 CPU cores: with the base tests the file would pass a minute
def test_fp8_build_quantizes_convs_linears_and_attention_and_stays_close(tmp_path: Path) -> None:
    """recipes/tiny-sdxl-fp8.yaml with a smaller calibration and accuracy run (the full recipe: docs/families.md):
    ModelOpt's SDXL exclusions kept in high precision, quantized accuracy and parity (b) in the manifest."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    overrides = [f"output.dir={tmp_path}", "engine={backends: [onnxruntime]}",
                 "quant.calib={prompts: builtin, size: 2, batch: 2, steps: 2, seed: 0}",
                 "quant.accuracy={prompts: 1, steps: 2}"]  # fmt: skip
    report = run_build(load_recipe(ROOT / "recipes" / "tiny-sdxl-fp8.yaml", overrides))
    quant = report.manifest.components["unet"].quant
    assert quant["graph"]["fp8_qdq"] > 0 and quant["graph"]["fp8_attention"] > 0
    assert "*conv_in*" in quant["exclude"] and "*add_embedding*" in quant["exclude"]
    assert quant["parity"]["summary"]["min_psnr_db"] >= 40  # onnxruntime vs fake-quant torch
    assert quant["accuracy"]["summary"]["min_psnr_db"] >= 30  # quantized vs unquantized


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA on tiny-sdxl's UNet attention, saved by diffusers' SDXL loader (``unet.`` keys, adapter
    metadata with alpha 8 at rank 4: diffusers scales it by 2, not 1)."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from dtcompile.models.builtin import builtin_model_path

    out = tmp_path_factory.mktemp("sdxl-lora")
    unet = UNet2DConditionModel.from_pretrained(builtin_model_path("tiny-sdxl") / "unet")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet.add_adapter(config)
    StableDiffusionXLPipeline.save_lora_weights(
        str(out), unet_lora_layers=get_peft_model_state_dict(unet), weight_name="sdxl-style.safetensors",
        unet_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    return out / "sdxl-style.safetensors"


def test_an_sdxl_lora_on_a_flux_artifact_is_one_line(sdxl_lora: Path, tmp_path: Path) -> None:
    """A UNet LoRA saved by diffusers' SDXL loader refit into a FLUX artifact: one line, nothing written."""
    from dtcompile.core.errors import DtcError
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact

    overrides = [f"output.dir={tmp_path / 'flux'}", "engine={backends: [onnxruntime]}"]
    flux = run_build(load_recipe(ROOT / "recipes" / "tiny-flux.yaml", overrides)).artifact_dir
    with pytest.raises(DtcError) as err:
        refit_artifact(flux, [(str(sdxl_lora), 1.0)], out_dir=tmp_path / "refit")
    message = str(err.value)
    assert "\n" not in message and "has weights for unet" in message and "transformer" in message
    assert not (tmp_path / "refit").exists()


@pytest.mark.slow  # 16 s more (a second build, two refits): the file would pass a minute
def test_lora_fuse_and_refit_agree_and_the_base_comes_back(
    sdxl_artifact: Path, sdxl_lora: Path, tmp_path: Path
) -> None:
    """The SDXL LoRA fused at build (diffusers' SDXL loader) equals the same LoRA refit into the plain artifact;
    ``--lora none`` restores the base. The adapter metadata (alpha) is read from the SD-style loader's 3-tuple."""
    import torch

    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact

    overrides = [f"output.dir={tmp_path / 'fused'}", "engine={backends: [onnxruntime]}",
                 f"lora=[{{source: {sdxl_lora}, scale: 0.8}}]"]  # fmt: skip
    fused = run_build(load_recipe(ROOT / "recipes" / "tiny-sdxl.yaml", overrides)).artifact_dir
    refit = refit_artifact(sdxl_artifact, [(str(sdxl_lora), 0.8)], out_dir=tmp_path / "refit", drop_unrefittable=True)
    back = refit_artifact(refit.artifact_dir, [], out_dir=tmp_path / "back", drop_unrefittable=True)

    def image(artifact: Path) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(
                run_artifact(artifact, PROMPT, steps=4, seed=3, guidance=5.0, backend="onnxruntime").image
            )

    base, with_lora = image(sdxl_artifact), image(fused)
    assert psnr(base, with_lora) < 35  # the adapter changes the image
    assert psnr(image(refit.artifact_dir), with_lora) >= 40
    assert psnr(image(back.artifact_dir), base) >= 40
