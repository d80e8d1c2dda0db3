"""FLUX.2 through the same build, run, refit and bench paths: tiny-flux2 (a tiny Mistral-3 text encoder and a
chat tokenizer built in code) built for real, compared with the plain Flux2Pipeline step by step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError
from tests.fixtures.images import psnr

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a cat", "a red car in the snow"]


@pytest.fixture(scope="module")
def flux2_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-flux2")
    return run_build(load_recipe(ROOT / "recipes" / "tiny-flux2.yaml", [f"output.dir={out}"])).artifact_dir


def test_the_builtin_loads_through_from_pretrained_with_its_chat_tokenizer() -> None:
    import torch
    from diffusers import Flux2Pipeline

    from dtcompile.models.builtin import builtin_model_path

    pipe = Flux2Pipeline.from_pretrained(builtin_model_path("tiny-flux2"), dtype=torch.float32)
    assert type(pipe.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    assert pipe.text_encoder.config.text_config.num_hidden_layers == 30  # the pipeline stacks layers 10, 20, 30
    ids = pipe.tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
          {"role": "user", "content": [{"type": "text", "text": "a photo of a cat"}]}]],
        tokenize=True, return_dict=True, padding="max_length", truncation=True, max_length=24,
    )["input_ids"][0]  # fmt: skip
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<s>", "[SYSTEM_PROMPT]"] and "[INST]" in tokens and "▁cat" in tokens
    assert len(ids) == 24 and tokens[-1] == "<pad>"
    embeds, text_ids = pipe.encode_prompt(PROMPTS[0], max_sequence_length=24)
    assert embeds.shape == (1, 24, pipe.transformer.config.joint_attention_dim)
    assert text_ids.shape == (1, 24, 4)


def test_artifact_has_the_transformer_for_every_target(flux2_artifact: Path) -> None:
    from dtcompile.manifest import read_manifest

    m = read_manifest(flux2_artifact)
    assert m.source.pipeline_class == "Flux2Pipeline"
    comp = m.component("transformer")
    assert {(e.backend, e.arch) for e in comp.engines} == {
        ("onnxruntime", "any"), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")
    }  # fmt: skip
    assert comp.parity["rel_l2"] <= 1e-4
    # tiny VAE factor 2, 2x2 patches: 32 px -> 8x8 tokens, 128 px -> 32x32; ids are batched with 4 axes
    assert {k: comp.profile["hidden_states"][k][1] for k in ("min", "opt", "max")} == {"min": 64, "opt": 256,
                                                                                       "max": 1024}  # fmt: skip
    assert comp.profile["img_ids"]["max"] == [2, 1024, 4] and comp.profile["txt_ids"]["opt"] == [1, 32, 4]
    assert "pooled_projections" not in comp.profile


def test_run_matches_diffusers_every_step(flux2_artifact: Path) -> None:
    """A batch of two prompts, a non-square size and a non-default guidance: every step within 1e-4."""
    import torch
    from diffusers import Flux2Pipeline

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.runtime.session import run_artifact

    pipe = Flux2Pipeline.from_pretrained(builtin_model_path("tiny-flux2"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    preds: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    want = pipe(prompt=PROMPTS, height=48, width=64, num_inference_steps=4, guidance_scale=3.0,
                max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(3)).images  # fmt: skip
    got = run_artifact(flux2_artifact, PROMPTS, steps=4, seed=3, height=48, width=64, guidance=3.0,
                       backend="onnxruntime", trace=True)  # fmt: skip
    assert len(got.trace) == len(preds) == 4
    for step, (a, b) in enumerate(zip(got.trace, preds, strict=True)):
        assert a.shape == b.shape == (2, 12 * 16, 16)
        assert rel_l2(a, b) <= 1e-4, f"step {step}"
    assert got.image.size == (64, 48)
    assert psnr(np.asarray(got.image), np.asarray(want[0])) >= 40


def test_cli_run_and_the_one_line_refusals(flux2_artifact: Path, tmp_path: Path) -> None:
    dtc = [sys.executable, "-m", "dtcompile"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*dtc, "run", str(flux2_artifact), "--prompt", PROMPTS[0], "--steps", "2", *args],
                              capture_output=True, text=True, cwd=tmp_path)  # fmt: skip

    ok = run("--out", "cat.png")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cat.png").is_file()
    png = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(png)
    cases = {
        ("--negative-prompt", "blurry"): "--negative-prompt: Flux2Pipeline artifacts take no negative prompt",
        ("--image", str(png)): "--image: Flux2Pipeline artifacts take no reference image",
        ("--height", "200"): "--height 200 is outside the artifact's range 32..128",
    }
    for args, message in cases.items():
        proc = run(*args, "--out", "bad.png")
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "bad.png").exists()


def test_what_the_family_cannot_take_is_refused_by_name(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import make_plan

    base = ROOT / "recipes" / "tiny-flux2.yaml"
    with pytest.raises(RecipeError, match="Flux2Pipeline has no engine component 'vae_decoder'"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", "components=[transformer, vae_decoder]"]))
    cache = "cache={mode: static, steps: 4, groups: [{name: s, blocks: ['single_transformer_blocks.*'], every: 2}]}"
    with pytest.raises(UnsupportedError, match="Flux2Pipeline artifacts are not split"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", cache]))
    with pytest.raises(RecipeError, match="export.shapes.height.max"):
        make_plan(load_recipe(base, [f"output.dir={tmp_path}", "export.shapes.height.max=130"]))


def test_lora_fuse_and_refit_agree_and_the_base_comes_back(flux2_artifact: Path, tmp_path: Path) -> None:
    """A LoRA through Flux2Pipeline's own loader (Flux2LoraLoaderMixin): refit == fused build; --lora none."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact
    from tests.fixtures.lora import FLUX_TARGETS, make_peft_lora

    transformer = Flux2Transformer2DModel.from_pretrained(builtin_model_path("tiny-flux2") / "transformer")
    lora = make_peft_lora(transformer, tmp_path / "flux2-style.safetensors", pipeline_class="Flux2Pipeline",
                          targets=(*FLUX_TARGETS, "to_qkv_mlp_proj"), rank=4, alpha=8.0, seed=1)  # fmt: skip
    overrides = [f"output.dir={tmp_path / 'fused'}", "engine={backends: [onnxruntime]}",
                 f"lora=[{{source: {lora}, scale: 0.8}}]"]  # fmt: skip
    fused = run_build(load_recipe(ROOT / "recipes" / "tiny-flux2.yaml", overrides)).artifact_dir
    refit = refit_artifact(flux2_artifact, [(str(lora), 0.8)], out_dir=tmp_path / "refit", drop_unrefittable=True)
    back = refit_artifact(refit.artifact_dir, [], out_dir=tmp_path / "back", drop_unrefittable=True)

    def image(artifact: Path) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(run_artifact(artifact, PROMPTS[0], steps=4, seed=3, backend="onnxruntime").image)

    base, with_lora = image(flux2_artifact), image(fused)
    assert not np.array_equal(base, with_lora)  # the adapter changes the image
    assert psnr(image(refit.artifact_dir), with_lora) >= 40
    assert psnr(image(back.artifact_dir), base) >= 40


def test_a_flux1_lora_on_a_flux2_artifact_is_one_line(flux2_artifact: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dtcompile", "refit", str(flux2_artifact), "--lora",
         str(ROOT / "recipes" / "lora" / "tiny-flux-style.safetensors"), "--out", str(tmp_path / "x"), "--drop-unrefittable"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "tiny-flux-style.safetensors" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_fp8_build_quantizes_and_records_accuracy(tmp_path: Path) -> None:
    from dtcompile.models.flux2 import Flux2Adapter
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    m = run_build(load_recipe(ROOT / "recipes" / "tiny-flux2-fp8.yaml", [f"output.dir={tmp_path}"])).manifest
    comp = m.component("transformer")
    assert {e.target for e in comp.engines} == {"onnxruntime:any", "tensorrt-rtx:sm_89", "tensorrt-rtx:sm_120"}
    q = comp.quant
    assert q["format"] == "fp8" and q["graph"]["fp8_qdq"] > 0
    assert q["exclude"] == list(Flux2Adapter.default_exclude)  # each pattern matched a module (check_exclude)
    assert q["parity"]["summary"]["max_rel_err"] <= q["parity"]["gate"]  # onnxruntime vs fake-quant torch
    assert q["accuracy"]["summary"]["min_cos"] > 0.98  # quantized vs unquantized, teacher-forced


def test_bench_times_the_engine_against_pytorch(flux2_artifact: Path) -> None:
    from dtcompile.tools.bench import bench_artifact

    report = bench_artifact(flux2_artifact, ["onnxruntime"], steps=2, repeat=1, warmup=0)
    by = {r["name"]: r for r in report["results"]}
    assert set(by) == {"pytorch", "onnxruntime"}
    assert by["onnxruntime"]["psnr_db_vs_pytorch"] >= 40


def test_load_pipeline_takes_the_diffusers_docs_call(flux2_artifact: Path) -> None:
    """Flux2Pipeline's docs example on the pipeline ``load_pipeline`` returns. The example passes the prompt
    first, where Flux2Pipeline takes ``image`` (diffusers 0.42 then fails in its own input check): one line naming
    image says so; with ``prompt=`` it runs. A reference image (FLUX.2 edits with one) is refused in one line, since
    the artifact's profile holds no reference tokens."""
    from PIL import Image

    import dtcompile

    pipe = dtcompile.load_pipeline(flux2_artifact, backend="onnxruntime")
    prompt = "A cat holding a sign that says hello world"
    with pytest.raises(UnsupportedError, match=r"^image: got the text 'A cat holding.*pass the text as prompt=\.\.\.$"):
        pipe(prompt, num_inference_steps=50, guidance_scale=2.5)
    image = pipe(prompt=prompt, num_inference_steps=50, guidance_scale=2.5).images[0]
    assert image.size == (64, 64)
    with pytest.raises(UnsupportedError, match=r"^image: this Flux2Pipeline artifact was built for generation"):
        pipe(image=Image.new("RGB", (64, 64)), prompt="a cat", num_inference_steps=1)
