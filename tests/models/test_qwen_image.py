"""Qwen-Image through the same build, run and refit paths as FLUX: tiny-qwen-image (a tiny Qwen2.5-VL text encoder
kept in PyTorch) built for real and compared with the plain diffusers QwenImagePipeline call by call, with true CFG
(two transformer calls a step, the prompt and the negative prompt at their own text lengths)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError
from tests.fixtures.images import psnr

ROOT = Path(__file__).resolve().parents[2]
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def qwen_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.builds import build_recipe

    return build_recipe(tmp_path_factory, "tiny-qwen-image.yaml", "engine.targets=[sm_89]")


def _reference_pipe(calls: list[dict]) -> object:
    """The diffusers pipeline on the built-in, recording every transformer call's text length and output."""
    import torch
    from diffusers import QwenImagePipeline

    from dtcompile.models.builtin import builtin_model_path

    pipe = QwenImagePipeline.from_pretrained(builtin_model_path("tiny-qwen-image"), dtype=torch.float32)

    def hook(_mod: object, _args: object, kwargs: dict, out: tuple) -> None:
        calls.append({"text_len": kwargs["encoder_hidden_states"].shape[1], "out": out[0].detach().clone()})

    pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    return pipe


def test_the_builtin_loads_through_from_pretrained_with_its_tokenizer() -> None:
    import torch
    from diffusers import QwenImagePipeline

    from dtcompile.models.builtin import builtin_model_path

    pipe = QwenImagePipeline.from_pretrained(builtin_model_path("tiny-qwen-image"), dtype=torch.float32)
    embeds, mask = pipe.encode_prompt(PROMPT, device="cpu")
    # the template's first 34 tokens are dropped; the rest ends with the prompt's words and the assistant turn
    template = pipe.tokenizer(pipe.prompt_template_encode.format(PROMPT)).input_ids
    assert embeds.shape == (1, len(template) - pipe.prompt_template_encode_start_idx, 16) and mask is None
    assert {"▁fox", "▁snow"} <= set(pipe.tokenizer.convert_ids_to_tokens(template[34:]))


def test_artifact_has_the_transformer_and_a_dynamic_text_length(qwen_artifact: Path) -> None:
    from dtcompile.manifest import read_manifest

    m = read_manifest(qwen_artifact)
    assert m.source.pipeline_class == "QwenImagePipeline"
    t = m.components["transformer"]
    assert {(e.backend, e.arch) for e in t.engines} == {("onnxruntime", "any"), ("tensorrt-rtx", "sm_89")}
    assert t.parity["rel_l2"] < 1e-4
    assert t.profile["encoder_hidden_states"]["min"][1] == 1 and t.profile["encoder_hidden_states"]["max"][1] == 64
    assert t.profile["txt_rope_cos"]["max"] == [64, 8] and t.profile["img_rope_cos"]["max"] == [64, 8]


def test_run_matches_diffusers_every_call_with_true_cfg_and_a_negative_prompt(qwen_artifact: Path) -> None:
    import torch

    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import run_artifact

    calls: list[dict] = []
    ref = _reference_pipe(calls)(  # type: ignore[operator]
        PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=32, width=32, num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(3), max_sequence_length=64,
    ).images[0]  # fmt: skip
    got = run_artifact(qwen_artifact, PROMPT, steps=4, seed=3, guidance=4.0, negative_prompt=NEGATIVE,
                       backend="onnxruntime", trace=True)  # fmt: skip
    assert len(got.trace) == len(calls) == 8  # 4 steps x (prompt, negative prompt)
    assert calls[0]["text_len"] != calls[1]["text_len"]  # each branch at its own text length
    for i, (a, b) in enumerate(zip(got.trace, calls, strict=True)):
        assert a.shape == b["out"].shape == (1, 16, 16)
        assert rel_l2(a, b["out"]) <= 1e-4, f"call {i}"
    assert rel_l2(calls[0]["out"], calls[1]["out"]) > 1e-3  # the two branches differ: CFG is exercised
    assert psnr(np.asarray(got.image), np.asarray(ref)) >= 40


def test_two_prompts_of_different_lengths_use_the_text_mask(qwen_artifact: Path) -> None:
    """A batch of two prompts pads the shorter one: the pipeline passes encoder_hidden_states_mask, the graph
    masks those tokens as diffusers does."""
    import torch

    import dtcompile
    from dtcompile.core.metrics import rel_l2

    prompts = ["a fox", "an old lighthouse on the sea at dusk in the snow"]
    kw = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 64, "output_type": "np"}
    calls: list[dict] = []
    ref = _reference_pipe(calls)(prompts, generator=torch.Generator("cpu").manual_seed(5), **kw).images  # type: ignore[operator]
    pipe = dtcompile.load_pipeline(qwen_artifact, backend="onnxruntime")
    got = pipe(prompts, generator=torch.Generator("cpu").manual_seed(5), **kw).images
    assert rel_l2(torch.from_numpy(got), torch.from_numpy(ref)) <= 1e-4
    assert psnr(got[0], ref[0]) >= 40 and psnr(got[1], ref[1]) >= 40


def test_the_server_path_takes_a_negative_prompt_and_matches_the_run(qwen_artifact: Path) -> None:
    """/v1/images/generations' guidance_scale is Qwen-Image's true_cfg_scale, with the negative prompt."""
    from dtcompile.runtime.session import run_artifact
    from dtcompile.serve.models import ServedModel, ServeOptions
    from dtcompile.serve.protocol import parse_request

    options = ServeOptions(default_steps=3)
    model = ServedModel.open(qwen_artifact)
    req = parse_request({"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 3, "guidance_scale": 4.0})
    job = model.make_job(req, options, capacity=2)
    model.load(options)
    served = model.generate([job])[0][0]
    ran = run_artifact(qwen_artifact, PROMPT, steps=3, seed=3, guidance=4.0, negative_prompt=NEGATIVE)
    assert psnr(np.asarray(served), np.asarray(ran.image)) >= 40


def test_what_the_family_cannot_take_is_refused_by_name(qwen_artifact: Path, tmp_path: Path) -> None:
    import torch

    import dtcompile
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import make_plan

    base = ROOT / "recipes" / "tiny-qwen-image.yaml"
    with pytest.raises(RecipeError, match=r"export.shapes.height.max: .*not a positive multiple of 8"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", "export.shapes.height.max=60"]))
    with pytest.raises(RecipeError, match=r"text_len.max: 2048 is above 1024"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", "export.shapes.text_len.max=2048"]))
    cache = "cache={mode: static, steps: 4, groups: [{name: s, blocks: ['transformer_blocks.*'], every: 2}]}"
    with pytest.raises(UnsupportedError, match="QwenImagePipeline artifacts are not split"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", cache]))
    pipe = dtcompile.load_pipeline(qwen_artifact, backend="onnxruntime")
    with pytest.raises(UnsupportedError, match=r"^attention_kwargs: a Qwen-Image engine takes none"):
        pipe(PROMPT, num_inference_steps=1, attention_kwargs={"scale": 0.5}, generator=torch.Generator().manual_seed(0))


def test_cli_run_writes_the_image_and_dtc_models_lists_the_builtin(qwen_artifact: Path, tmp_path: Path) -> None:
    """``dtc run`` and ``dtc models`` in this process (CliRunner): the image ``dtc run`` writes is
    ``run_artifact``'s at the same seed."""
    from click.testing import CliRunner
    from PIL import Image

    from dtcompile.cli import cli
    from dtcompile.runtime.session import run_artifact

    out = tmp_path / "fox.png"
    args = ["run", str(qwen_artifact), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--guidance", "4",
            "--steps", "2", "--seed", "1", "--backend", "onnxruntime", "--out", str(out)]  # fmt: skip
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    ran = run_artifact(qwen_artifact, PROMPT, steps=2, seed=1, guidance=4.0, negative_prompt=NEGATIVE,
                       backend="onnxruntime")  # fmt: skip
    assert psnr(np.asarray(Image.open(out).convert("RGB")), np.asarray(ran.image)) >= 40
    models = CliRunner().invoke(cli, ["models"])
    assert models.exit_code == 0, models.output
    assert re.search(r"qwen-image +QwenImagePipeline", models.output)
    assert "builtin:tiny-qwen-image" in models.output and "recipes/tiny-qwen-image.yaml" in models.output


def read_manifest_weight_map(artifact: Path) -> dict:
    """The transformer's weight map (``onnx/transformer.weights.json``) entries by parameter."""
    import json

    return json.loads((artifact / "onnx" / "transformer.weights.json").read_text())["params"]


def test_lora_fuse_and_refit_agree_and_the_base_comes_back(qwen_artifact: Path, tmp_path: Path) -> None:
    """A LoRA through QwenImagePipeline's own loader (QwenImageLoraLoaderMixin): refit == fused build; none.
    It touches the last block's ``to_add_out`` and ``txt_mlp`` too, which the graph never reads (only the image
    stream reaches the output): the weight map records them ``unread`` and refit skips them."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact
    from tests.fixtures.lora import FLUX_TARGETS, make_peft_lora

    transformer = QwenImageTransformer2DModel.from_pretrained(builtin_model_path("tiny-qwen-image") / "transformer")
    lora = make_peft_lora(transformer, tmp_path / "qwen-style.safetensors", pipeline_class="QwenImagePipeline",
                          targets=(*FLUX_TARGETS, "img_mlp.net.2", "txt_mlp.net.2"), rank=4, alpha=8.0, seed=1)  # fmt: skip
    overrides = [f"output.dir={tmp_path / 'fused'}", "engine={backends: [onnxruntime]}",
                 f"lora=[{{source: {lora}, scale: 0.8}}]"]  # fmt: skip
    fused = run_build(load_recipe(ROOT / "recipes" / "tiny-qwen-image.yaml", overrides)).artifact_dir
    refit = refit_artifact(qwen_artifact, [(str(lora), 0.8)], out_dir=tmp_path / "refit", drop_unrefittable=True)
    back = refit_artifact(refit.artifact_dir, [], out_dir=tmp_path / "back", drop_unrefittable=True)

    def image(artifact: Path) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(run_artifact(artifact, PROMPT, steps=3, seed=3, backend="onnxruntime").image)

    unread = {p for p, e in read_manifest_weight_map(qwen_artifact).items() if e.get("status") == "unread"}
    assert unread == {f"transformer_blocks.1.{m}.{k}" for m in ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
                      for k in ("weight", "bias")}  # fmt: skip
    base, with_lora = image(qwen_artifact), image(fused)
    assert not np.array_equal(base, with_lora)  # the adapter changes the image
    assert psnr(image(refit.artifact_dir), with_lora) >= 40
    assert psnr(image(back.artifact_dir), base) >= 40


@pytest.mark.slow  # ~45 s on a shared 2-core CPU (ModelOpt import, calibration, accuracy and parity runs)
def test_fp8_build_quantizes_and_builds_for_rtx(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    small = [
        "engine.targets=[sm_89]",
        "quant.calib={prompts: builtin, size: 2, batch: 2, steps: 2, seed: 0}",
        "quant.accuracy={prompts: 1, steps: 2}",
    ]  # the recipe's calibration, smaller: the suite stays fast
    report = run_build(load_recipe(ROOT / "recipes" / "tiny-qwen-image-fp8.yaml", [f"output.dir={tmp_path}", *small]))
    quant = report.manifest.components["transformer"].quant
    assert quant["graph"]["fp8_qdq"] > 0 and quant["graph"]["fp8_attention"] > 0
    assert quant["parity"]["summary"]["min_psnr_db"] >= 40  # onnxruntime vs fake-quant torch
    assert quant["accuracy"]["summary"]["min_psnr_db"] >= 30  # quantized vs unquantized
    engines = {(e.backend, e.arch) for e in report.manifest.components["transformer"].engines}
    assert ("tensorrt-rtx", "sm_89") in engines
