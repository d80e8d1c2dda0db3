"""FLUX.1 Kontext (image editing) through the same build, run and refit paths: tiny-flux-kontext built for real,
compared with the plain FluxKontextPipeline step by step with a reference image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtcompile.core.errors import UnsupportedError
from tests.fixtures.images import psnr

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "make it snow"


@pytest.fixture(scope="module")
def kontext_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-kontext")
    return run_build(load_recipe(ROOT / "recipes" / "tiny-flux-kontext.yaml", [f"output.dir={out}"])).artifact_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)  # not the generation size
    return path


def test_profile_covers_latent_plus_reference_tokens(kontext_artifact: Path) -> None:
    from dtcompile.manifest import read_manifest

    m = read_manifest(kontext_artifact)
    assert m.source.pipeline_class == "FluxKontextPipeline"
    comp = m.component("transformer")
    assert {(e.backend, e.arch) for e in comp.engines} == {
        ("onnxruntime", "any"), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")
    }  # fmt: skip
    assert comp.parity["rel_l2"] <= 1e-4
    tokens = {k: comp.profile["hidden_states"][k][1] for k in ("min", "opt", "max")}
    # tiny VAE factor 2, 2x2 patches: 32 px -> 8x8 = 64 tokens (no reference); 64 px -> 2 x 256; 128 px -> 2 x 1024
    assert tokens == {"min": 64, "opt": 512, "max": 2048}
    assert comp.profile["img_ids"]["opt"] == [512, 3]


def test_edit_matches_diffusers_every_step(kontext_artifact: Path, reference: Path) -> None:
    import torch
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.runtime.session import run_artifact

    ref_image = Image.open(reference).convert("RGB")
    pipe = FluxKontextPipeline.from_pretrained(builtin_model_path("tiny-flux-kontext"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    preds: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    want = pipe(
        prompt=PROMPT, image=ref_image.resize((64, 48), Image.LANCZOS), height=48, width=64, num_inference_steps=4,
        max_area=48 * 64, _auto_resize=False, max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]  # fmt: skip
    got = run_artifact(kontext_artifact, PROMPT, steps=4, seed=3, height=48, width=64, image=ref_image,
                       backend="onnxruntime", trace=True)  # fmt: skip
    assert len(got.trace) == len(preds) == 4
    for step, (a, b) in enumerate(zip(got.trace, preds, strict=True)):
        assert a.shape == b.shape == (1, 2 * 12 * 16, 16)  # latent + reference tokens
        assert rel_l2(a, b) <= 1e-4, f"step {step}"
    assert got.image.size == (64, 48)
    assert psnr(np.asarray(got.image), np.asarray(want)) >= 40
    other = run_artifact(kontext_artifact, PROMPT, steps=4, seed=3, height=48, width=64,
                         image=Image.new("RGB", (64, 48), (255, 255, 255)), backend="onnxruntime", trace=True)  # fmt: skip
    assert rel_l2(other.trace[0][:, :192], got.trace[0][:, :192]) > 1e-3  # the reference changes the prediction


def test_cli_run_with_image_and_the_one_line_refusals(kontext_artifact: Path, reference: Path, tmp_path: Path,
                                                      tiny_artifact: Path) -> None:  # fmt: skip
    dtc = [sys.executable, "-m", "dtcompile"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*dtc, "run", *args, "--prompt", PROMPT, "--steps", "2"], capture_output=True,
                              text=True, cwd=tmp_path)  # fmt: skip

    ok = run(str(kontext_artifact), "--image", str(reference), "--out", "edit.png")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "edit.png").is_file()
    cases = {
        (str(kontext_artifact),): "--image: FluxKontextPipeline artifacts edit a reference image; pass --image REF.png",
        (str(tiny_artifact), "--image", str(reference)): "--image: FluxPipeline artifacts take no reference image",
        (str(kontext_artifact), "--image", "missing.png"): "--image missing.png: no such file",
        (str(kontext_artifact), "--image", str(ROOT / "README.md")): "not a readable image",
    }
    for args, message in cases.items():
        proc = run(*args, "--out", "bad.png")
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "bad.png").exists()


def test_lora_refit_equals_a_fused_build(kontext_artifact: Path, reference: Path, tmp_path: Path) -> None:
    """A FLUX LoRA through FluxKontextPipeline's loader: refit == fused build, --lora none restores."""
    from PIL import Image

    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact

    lora = ROOT / "recipes" / "lora" / "tiny-flux-style.safetensors"
    overrides = [f"output.dir={tmp_path / 'fused'}", "engine={backends: [onnxruntime]}",
                 f"lora=[{{source: {lora}, scale: 0.8}}]"]  # fmt: skip
    fused = run_build(load_recipe(ROOT / "recipes" / "tiny-flux-kontext.yaml", overrides)).artifact_dir
    refit = refit_artifact(kontext_artifact, [(str(lora), 0.8)], out_dir=tmp_path / "refit", drop_unrefittable=True)
    back = refit_artifact(refit.artifact_dir, [], out_dir=tmp_path / "back", drop_unrefittable=True)
    ref_image = Image.open(reference).convert("RGB")

    def image(artifact: Path) -> np.ndarray:
        return np.asarray(run_artifact(artifact, PROMPT, steps=4, seed=3, image=ref_image, backend="onnxruntime").image)

    base, with_lora = image(kontext_artifact), image(fused)
    assert not np.array_equal(base, with_lora)
    assert psnr(image(refit.artifact_dir), with_lora) >= 40
    assert psnr(image(back.artifact_dir), base) >= 40


def test_fp8_build_calibrates_with_a_reference_and_records_accuracy(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    recipe = load_recipe(ROOT / "recipes" / "tiny-flux-kontext-fp8.yaml", [f"output.dir={tmp_path}"])
    m = run_build(recipe).manifest
    comp = m.component("transformer")
    assert {(e.backend, e.arch) for e in comp.engines} >= {("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")}
    quant = comp.quant
    assert quant["parity"]["summary"]["min_psnr_db"] >= 40  # onnxruntime vs fake-quant torch
    assert quant["accuracy"]["summary"]["min_psnr_db"] >= 30  # quantized vs unquantized


def test_components_and_cache_the_family_cannot_take_are_refused(tmp_path: Path) -> None:
    from dtcompile.core.errors import RecipeError
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import make_plan

    base = ROOT / "recipes" / "tiny-flux-kontext.yaml"
    with pytest.raises(RecipeError, match="FluxKontextPipeline has no engine component 'image_encoder'"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", "components=[transformer, image_encoder]"]))
    cache = "cache={mode: static, steps: 4, groups: [{name: s, blocks: ['single_transformer_blocks.*'], every: 2}]}"
    with pytest.raises(UnsupportedError, match="FluxKontextPipeline artifacts are not split"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", cache]))


def test_the_server_refuses_generations_for_an_editing_model(kontext_artifact: Path) -> None:
    from dtcompile.serve.models import ServedModel, ServeOptions
    from dtcompile.serve.protocol import APIError, ImageGenerationRequest

    model = ServedModel.open(kontext_artifact)
    with pytest.raises(APIError) as err:
        model.make_job(ImageGenerationRequest(prompt=PROMPT), ServeOptions(), capacity=2)
    assert err.value.status == 400 and err.value.param == "model" and "/v1/images/edits" in str(err.value)


def test_openai_client_edits_through_the_server_as_dtc_run_does(
    kontext_artifact: Path, tiny_artifact: Path, reference: Path, tmp_path: Path
) -> None:
    """``client.images.edit`` (multipart, the unmodified openai client) on /v1/images/edits equals ``dtc run
    --image`` for the same seed and size; wrong uses are the client's own error types."""
    import base64
    import io

    import openai
    from PIL import Image

    from dtcompile.runtime.session import run_artifact
    from tests.serve.test_server import serving

    want = run_artifact(kontext_artifact, PROMPT, steps=4, seed=3, height=48, width=64,
                        image=Image.open(reference).convert("RGB"))  # fmt: skip
    with serving(kontext_artifact, tmp_path) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        with reference.open("rb") as f:
            r = c.images.edit(model="tiny-flux-kontext", image=f, prompt=PROMPT, size="64x48",
                              extra_body={"seed": 3, "num_inference_steps": 4})  # fmt: skip
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
        assert got.shape == (48, 64, 3) and psnr(got, np.asarray(want.image)) >= 40
        with pytest.raises(openai.BadRequestError, match="edits a reference image"):
            c.images.generate(model="tiny-flux-kontext", prompt=PROMPT, size="64x48")
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            c.images.edit(model="tiny-flux-kontext", image=("x.png", b"not an image", "image/png"), prompt=PROMPT)
        with pytest.raises(openai.BadRequestError, match="unknown parameter"), reference.open("rb") as f:
            c.images.edit(model="tiny-flux-kontext", image=f, prompt=PROMPT, extra_body={"strength": "0.5"})


def test_an_edit_for_a_model_without_reference_images_is_a_400(tiny_artifact: Path) -> None:
    from PIL import Image

    from dtcompile.serve.models import ServedModel, ServeOptions
    from dtcompile.serve.protocol import APIError, ImageGenerationRequest

    with pytest.raises(APIError) as err:
        ServedModel.open(tiny_artifact).make_job(
            ImageGenerationRequest(prompt=PROMPT), ServeOptions(), capacity=2, image=Image.new("RGB", (64, 64))
        )
    assert err.value.status == 400 and err.value.param == "image" and "/v1/images/generations" in str(err.value)


def test_load_pipeline_takes_the_diffusers_docs_call(kontext_artifact: Path, reference: Path) -> None:
    """FluxKontextPipeline's docs example (image, prompt, guidance, generator) on the pipeline ``load_pipeline``
    returns: it keeps the built size (diffusers' default ``max_area`` and ``_auto_resize`` would ask ~1024 px)
    and equals ``dtc run`` with the same reference, seed and steps."""
    import torch
    from PIL import Image

    import dtcompile
    from dtcompile.runtime.session import run_artifact

    ref = Image.open(reference).convert("RGB")
    pipe = dtcompile.load_pipeline(kontext_artifact, backend="onnxruntime")
    image = pipe(image=ref, prompt=PROMPT, guidance_scale=2.5, generator=torch.Generator().manual_seed(42)).images[0]
    assert image.size == (64, 64)
    ran = run_artifact(kontext_artifact, PROMPT, steps=28, seed=42, guidance=2.5, image=ref, backend="onnxruntime")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(ran.image))
