"""Several engine components per artifact: text encoders and the VAE decoder next to the denoiser.

tiny-flux (CLIP, T5, VAE decoder) and tiny-sd3 (CLIP-L, CLIP-G, T5, VAE decoder) are built for real with
onnxruntime and TensorRT-RTX sm_89/sm_120 engines for every component. A run with every component on
onnxruntime is compared with the plain diffusers pipeline: each engine's outputs at every call within 1e-4
relative L2, and the final image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError
from tests.fixtures.images import psnr

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red fox in the snow"


def _build(tmp_path_factory: pytest.TempPathFactory, recipe: str) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-components")
    return run_build(load_recipe(ROOT / "recipes" / recipe, [f"output.dir={out}"])).artifact_dir


@pytest.fixture(scope="module")
def flux_components(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-flux-components.yaml")


@pytest.fixture(scope="module")
def sd3_components(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-sd3-components.yaml")


def _record(pipe: Any, names: list[str]) -> dict[str, list[Any]]:
    """Every call's outputs of the torch pipeline's text encoders (hooks) and VAE decode (wrapped)."""
    got: dict[str, list[Any]] = {n: [] for n in names}
    for n in names:
        if n == "vae_decoder":
            decode = pipe.vae.decode

            def wrapped(*a: Any, _decode: Any = decode, **k: Any) -> Any:
                out = _decode(*a, **k)
                got["vae_decoder"].append(out[0].detach().clone())
                return out

            pipe.vae.decode = wrapped
        else:
            getattr(pipe, n).register_forward_hook(lambda mod, args, out, n=n: got[n].append(out))
    return got


def _compare(artifact: Path, pipeline_class: str, builtin: str, kwargs: dict[str, Any]) -> None:
    import diffusers
    import torch

    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.runtime.session import load_engine_pipeline

    engine_pipe, module, manifest, _ = load_engine_pipeline(artifact, "onnxruntime")
    aux = manifest.aux_names()
    for name in aux:
        getattr(engine_pipe, manifest.component(name).attr).trace = []
    module.trace = []
    ref_pipe = getattr(diffusers, pipeline_class).from_pretrained(builtin_model_path(builtin), dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)
    preds: list[torch.Tensor] = []
    ref_pipe.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    ref_calls = _record(ref_pipe, aux)

    def run(pipe: Any) -> Any:
        return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(3)).images[0]

    ref, got = run(ref_pipe), run(engine_pipe)
    for name in aux:
        standin = getattr(engine_pipe, manifest.component(name).attr)
        assert standin.calls == len(ref_calls[name]) >= 1, name  # the engine ran, in place of torch
        for call, (a, b) in enumerate(zip(standin.trace, ref_calls[name], strict=True)):
            if name == "vae_decoder":
                assert rel_l2(a, b) <= 1e-4, (name, call)
                continue
            for field, tensor in a.items():
                want = b.hidden_states[-2] if field == "penultimate_hidden_state" else getattr(b, field)
                assert rel_l2(tensor, want) <= 1e-4, (name, call, field)
    assert len(module.trace) == len(preds) >= 4
    for step, (a, b) in enumerate(zip(module.trace, preds, strict=True)):
        assert rel_l2(a, b) <= 1e-4, f"step {step}"
    assert psnr(np.asarray(got), np.asarray(ref)) >= 40


@pytest.mark.parametrize("fixture", ["flux_components", "sd3_components"])
def test_every_component_has_engines_for_every_target(fixture: str, request: pytest.FixtureRequest) -> None:
    from dtcompile.manifest import read_manifest

    m = read_manifest(request.getfixturevalue(fixture))
    want = {("onnxruntime", "any"), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")}
    expected = {
        "flux_components": ["text_encoder", "text_encoder_2", "vae_decoder"],
        "sd3_components": ["text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"],
    }[fixture]
    assert m.aux_names() == expected and m.main_component() == "transformer"
    for name in ["transformer", *expected]:
        comp = m.component(name)
        assert {(e.backend, e.arch) for e in comp.engines} == want, name
        assert comp.parity["rel_l2"] <= 1e-4, name  # every output, onnxruntime vs torch at export
    pipeline = {Path(f.file).parts[1] for f in m.pipeline.files}
    assert "transformer" not in pipeline and "vae" not in pipeline and "text_encoder_2" not in pipeline
    assert m.component("vae_decoder").attr == "vae"


def test_flux_run_matches_diffusers_with_every_component_on_engines(flux_components: Path) -> None:
    kwargs = {"prompt": PROMPT, "height": 64, "width": 64, "num_inference_steps": 4, "max_sequence_length": 32}
    _compare(flux_components, "FluxPipeline", "tiny-flux", kwargs)


def test_sd3_run_matches_diffusers_with_cfg_and_every_component_on_engines(sd3_components: Path) -> None:
    kwargs = {
        "prompt": PROMPT, "negative_prompt": "blurry", "height": 64, "width": 64, "num_inference_steps": 4,
        "guidance_scale": 5.0, "max_sequence_length": 32,
    }  # fmt: skip
    _compare(sd3_components, "StableDiffusion3Pipeline", "tiny-sd3", kwargs)


def test_batch_of_two_prompts_through_every_engine(flux_components: Path) -> None:
    import torch

    from dtcompile.runtime.session import load_engine_pipeline

    pipe, *_ = load_engine_pipeline(flux_components, "onnxruntime")
    out = pipe(["a cat", "a dog"], height=32, width=48, num_inference_steps=2, max_sequence_length=32,
               generator=torch.Generator("cpu").manual_seed(0)).images  # fmt: skip
    assert [im.size for im in out] == [(48, 32), (48, 32)]
    assert pipe.vae.calls == 1 and pipe.text_encoder_2.calls == 1


def test_component_errors_are_one_line(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import make_plan

    base = ROOT / "recipes" / "tiny-flux-components.yaml"
    cases = {
        "components=[transformer,text_encoder_3]": "components[1]: FluxPipeline has no engine component 'text_encoder_3'",
        "components=[vae_decoder]": "components: the list must include the denoiser 'transformer'",
        "components=[transformer,vae_decoder,vae_decoder]": "components[2]: 'vae_decoder' is listed twice",
    }
    for override, message in cases.items():
        with pytest.raises(RecipeError) as err:
            make_plan(load_recipe(base, [override, f"output.dir={tmp_path}"]))
        assert message in str(err.value) and "\n" not in str(err.value), override


def test_engine_vae_refuses_encoding_and_clip_skip(flux_components: Path, sd3_components: Path) -> None:
    import torch

    from dtcompile.runtime.session import load_engine_pipeline

    pipe, *_ = load_engine_pipeline(flux_components, "onnxruntime")
    with pytest.raises(UnsupportedError, match="decoding only"):
        pipe.vae.encode(torch.zeros(1, 3, 64, 64))
    sd3, *_ = load_engine_pipeline(sd3_components, "onnxruntime")
    with pytest.raises(UnsupportedError, match="penultimate"):
        sd3("a cat", height=64, width=64, num_inference_steps=1, clip_skip=1, max_sequence_length=32)


def test_refit_updates_the_denoiser_and_carries_the_other_engines(flux_components: Path, tmp_path: Path) -> None:
    """A LoRA refit into a components artifact equals a fresh build with it fused; --lora none restores."""
    import torch

    from dtcompile.manifest import read_manifest
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact

    lora = ROOT / "recipes" / "lora" / "tiny-flux-style.safetensors"
    overrides = [f"output.dir={tmp_path / 'fused'}", "engine={backends: [onnxruntime]}",
                 f"lora=[{{source: {lora}, scale: 0.8}}]"]  # fmt: skip
    fused = run_build(load_recipe(ROOT / "recipes" / "tiny-flux-components.yaml", overrides)).artifact_dir
    refit = refit_artifact(flux_components, [(str(lora), 0.8)], out_dir=tmp_path / "refit", drop_unrefittable=True)
    back = refit_artifact(refit.artifact_dir, [], out_dir=tmp_path / "back", drop_unrefittable=True)
    before, after = read_manifest(flux_components), read_manifest(refit.artifact_dir)
    for name in before.aux_names():  # carried over unchanged, engines included
        assert before.component(name).onnx == after.component(name).onnx
        assert before.component(name).engines == after.component(name).engines

    def image(artifact: Path) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(run_artifact(artifact, PROMPT, steps=4, seed=3, backend="onnxruntime").image)

    base, with_lora = image(flux_components), image(fused)
    assert not np.array_equal(base, with_lora)
    assert psnr(image(refit.artifact_dir), with_lora) >= 40
    assert psnr(image(back.artifact_dir), base) >= 40


def test_publish_and_pull_carry_every_component_per_arch(flux_components: Path, tmp_path: Path) -> None:
    from dtcompile.manifest import read_manifest
    from dtcompile.tools.publish import plan_archives, publish_artifact, pull_artifact

    archives = plan_archives(read_manifest(flux_components))
    sm89 = next(a for a in archives if a.file == "tensorrt-rtx-sm_89.tar")
    assert sorted(e["file"] for e in sm89.entries) == [
        f"tensorrt-rtx/sm_89/{c}.engine" for c in ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    ]
    publish_artifact(flux_components, str(tmp_path / "pub"))
    out = tmp_path / "pulled"
    pull_artifact(str(tmp_path / "pub" / "tiny-flux-components"), out, arch="sm_120")
    pulled = read_manifest(out)
    for name in pulled.component_names():
        assert [(e.backend, e.arch) for e in pulled.component(name).engines] == [
            ("onnxruntime", "any"), ("tensorrt-rtx", "sm_120")
        ], name  # fmt: skip
        assert (out / f"tensorrt-rtx/sm_120/{name}.engine").is_file()
    assert not (out / "tensorrt-rtx/sm_89").exists()


def test_a_modified_component_engine_is_refused(flux_components: Path, tmp_path: Path) -> None:
    import shutil

    from dtcompile.core.errors import ArtifactError, VerificationError
    from dtcompile.runtime.session import load_engine_pipeline

    copy = tmp_path / "copy"
    shutil.copytree(flux_components, copy)
    graph = copy / "onnx" / "vae_decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\x00")
    with pytest.raises((ArtifactError, VerificationError), match="vae_decoder.onnx"):
        load_engine_pipeline(copy, "onnxruntime", verify="full")


def test_a_component_in_its_own_dtype_and_the_key_covers_the_components(tmp_path: Path) -> None:
    """vae_decoder in float16 next to a float32 transformer; the artifact key changes with the components
    list and an unchanged recipe is a no-op rebuild."""
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build

    base = ROOT / "recipes" / "tiny-flux-components.yaml"
    common = [f"output.dir={tmp_path}", "engine={backends: [onnxruntime]}"]
    mixed = load_recipe(base, [*common, "components=[transformer, {name: vae_decoder, dtype: float16}]"])
    report = run_build(mixed)
    vae = report.manifest.component("vae_decoder")
    assert vae.dtype == "float16" and vae.inputs[0].dtype == "float16"
    assert vae.parity["tolerance"] == 1e-2 and vae.parity["rel_l2"] <= 1e-2
    assert run_artifact(report.artifact_dir, PROMPT, steps=2, backend="onnxruntime").image.size == (64, 64)
    assert run_build(mixed).up_to_date
    fp32 = load_recipe(base, [*common, "components=[transformer, vae_decoder]"])
    assert run_build(fp32).manifest.key != report.manifest.key
