"""The runtime session: a diffusers user's own calls on the pipeline ``load_pipeline`` returns, and one session
under ``dtc run``, ``dtc serve`` and ``load_pipeline`` (tiny FLUX; the other families' docs calls are in
tests/models/)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from dtcompile.core.errors import DtcError, UnsupportedError

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def pipe(tiny_artifact: Path):
    import dtcompile

    return dtcompile.load_pipeline(tiny_artifact, backend="onnxruntime")


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _dtc_run(artifact: Path, out: Path, steps: int, seed: int = 0):
    """``dtc run`` in this process (CliRunner): its result."""
    from click.testing import CliRunner

    from dtcompile.cli import cli

    args = ["run", str(artifact), "--prompt", PROMPT, "--steps", str(steps), "--seed", str(seed), "--backend",
            "onnxruntime", "--out", str(out)]  # fmt: skip
    return CliRunner().invoke(cli, args)


def test_the_issue_snippet_runs_and_says_once_what_it_adapted(tiny_artifact: Path, caplog) -> None:
    import diffusers

    import dtcompile

    with caplog.at_level(logging.INFO):
        pipe = dtcompile.load_pipeline(tiny_artifact, backend="onnxruntime")
        first = pipe("a red fox", num_inference_steps=2, height=64, width=64)
        pipe("a red fox", num_inference_steps=2, height=64, width=64)
    assert isinstance(pipe, diffusers.FluxPipeline)
    assert first.images[0].size == (64, 64)
    adapted = [r.getMessage() for r in caplog.records if "max_sequence_length not given" in r.getMessage()]
    assert adapted == [
        "tiny-flux: max_sequence_length not given: the pipeline's default 512 becomes the artifact's "
        "built text length 32"
    ]
    assert not [r for r in caplog.records if r.getMessage().startswith("Expected types for")]


def test_the_diffusers_docs_call_runs_at_the_built_size(pipe) -> None:
    # FluxPipeline's docs example: pipe(prompt, num_inference_steps=4, guidance_scale=0.0)
    image = pipe("A cat holding a sign that says hello world", num_inference_steps=4, guidance_scale=0.0).images[0]
    assert image.size == (64, 64)  # the built opt (diffusers' own default, 1024 px, is outside the profile)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 1024}, "height 1024 is outside the artifact's range 32..128; rebuild with export.shapes.height"),
        ({"width": 16}, "width 16 is outside the artifact's range 32..128"),
        (
            {"max_sequence_length": 512},
            "max_sequence_length=512 is outside the artifact's built text length 32; "
            "pass max_sequence_length=32 or rebuild",
        ),
        (
            {"num_images_per_prompt": 3},
            r"batch \(prompts x num_images_per_prompt\) 3 is outside the artifact's "
            r"range 1..2",
        ),
        ({"prompt": ["a", "b", "c"]}, r"batch \(prompts x num_images_per_prompt\) 3"),
        ({"guidance_scale": float("nan")}, "guidance_scale nan: must be a finite number"),
    ],
)
def test_values_outside_the_profile_fail_in_one_line_naming_the_argument(pipe, kwargs, message) -> None:
    call = {"prompt": PROMPT, "num_inference_steps": 1, **kwargs}
    with pytest.raises(DtcError, match=message) as info:  # UnsupportedError, or InputError for a value's range
        pipe(**call)
    assert "\n" not in str(info.value)


def test_prompt_embeds_of_another_length_are_refused(pipe) -> None:
    import torch

    embeds = torch.zeros(1, 77, pipe.transformer.config["joint_attention_dim"])
    with pytest.raises(UnsupportedError, match="prompt_embeds: 77 text tokens, outside the artifact's built text"):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 768), num_inference_steps=1)


def test_a_diffusers_users_own_call_features(pipe) -> None:
    import torch

    def gen() -> torch.Generator:
        return torch.Generator("cpu").manual_seed(7)

    base = pipe(PROMPT, num_inference_steps=3, generator=gen(), output_type="np").images
    assert base.shape == (1, 64, 64, 3)
    pt = pipe(PROMPT, num_inference_steps=3, generator=gen(), output_type="pt").images
    assert tuple(pt.shape) == (1, 3, 64, 64)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), base, atol=1e-6)
    latent = pipe(PROMPT, num_inference_steps=3, generator=gen(), output_type="latent").images
    assert latent.ndim == 3 and latent.shape[0] == 1  # FLUX's packed latents
    steps: list[int] = []

    def on_step(p, step, timestep, kwargs):
        steps.append(step)
        return kwargs

    pipe(PROMPT, num_inference_steps=3, generator=gen(), callback_on_step_end=on_step)
    assert steps == [0, 1, 2]
    two = pipe(PROMPT, num_inference_steps=3, generator=gen(), num_images_per_prompt=2, output_type="np").images
    assert two.shape == (2, 64, 64, 3)
    embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=32)
    from_embeds = pipe(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=3, generator=gen(), output_type="np"
    ).images
    np.testing.assert_allclose(from_embeds, base, atol=1e-5)  # encode_prompt ran outside no_grad: float noise


def test_run_serve_and_load_pipeline_give_the_same_pixels(tiny_artifact: Path, pipe, tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from dtcompile.serve.models import ServedModel, ServeOptions
    from dtcompile.serve.scheduler import Job

    out = tmp_path / "run.png"
    r = _dtc_run(tiny_artifact, out, steps=4, seed=5)
    assert r.exit_code == 0, r.output
    with Image.open(out) as img:
        ran = _pixels(img)
    model = ServedModel.open(tiny_artifact, ServeOptions(backend="onnxruntime"))
    model.load(ServeOptions(backend="onnxruntime"))
    served = _pixels(model.generate([Job(model.name, PROMPT, 1, 64, 64, 4, None, 5)])[0][0])
    user = _pixels(pipe(PROMPT, num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(5)).images[0])
    np.testing.assert_array_equal(ran, served)
    np.testing.assert_array_equal(ran, user)


def test_dtc_run_reads_the_manifest_once(tiny_artifact: Path, tmp_path: Path, monkeypatch) -> None:

    import dtcompile.manifest

    original = dtcompile.manifest.read_manifest
    calls: list[Path] = []

    def counted(artifact_dir: Path):
        calls.append(Path(artifact_dir))
        return original(artifact_dir)

    # every module that holds the function by name, imported so far or during the run
    import dtcompile.cli.run
    import dtcompile.runtime.cache
    import dtcompile.runtime.session  # noqa: F401

    for module in [m for name, m in sys.modules.items() if name.startswith("dtcompile")]:
        if getattr(module, "read_manifest", None) is original:
            monkeypatch.setattr(module, "read_manifest", counted)
    r = _dtc_run(tiny_artifact, tmp_path / "x.png", steps=1)
    assert r.exit_code == 0, r.output
    assert calls == [tiny_artifact]
