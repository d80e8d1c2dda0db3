"""Wan image-to-video: tiny-wan21-i2v (CLIP image encoder, one expert) and tiny-wan22-i2v (two experts, no image
encoder) built for real (onnxruntime, float32) and run with the conditioning image going through the
``vae_encoder`` and ``image_encoder`` engines, against diffusers' own WanImageToVideoPipeline at every transformer
call, at two sizes and two frame counts; ``load_pipeline`` driving a user's own call; bad inputs refused in one line
before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.images import psnr
from tests.test_hostile3 import dtc_here, png_header

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEGATIVE = "a cat playing piano", "blurry"
BUILTIN = {"wan21": "tiny-wan21-i2v", "wan22": "tiny-wan22-i2v", "ti2v": "tiny-wan22-ti2v"}
TEXT_LEN = {"wan21": 512, "wan22": 32, "ti2v": 32}  # Wan2.1 I2V splits its cross-attention context at 512 text tokens

pytest.importorskip("ftfy", reason="WanImageToVideoPipeline cleans prompts with ftfy (pip install ftfy)")


def _build(tmp_path_factory: pytest.TempPathFactory, recipe: str) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-i2v")
    sets = [f"output.dir={out}", "engine.backends=[onnxruntime]", "engine.targets=[]"]
    return run_build(load_recipe(ROOT / "recipes" / recipe, sets)).artifact_dir


@pytest.fixture(scope="module")
def wan21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-wan21-i2v.yaml")


@pytest.fixture(scope="module")
def wan22(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-wan22-i2v.yaml")


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-wan22-ti2v.yaml")


def _image(width: int, height: int, seed: int = 0) -> Any:
    """A smooth test picture with a little noise (PIL)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + 2 * y) / 5.0)], axis=-1)
    rgb += np.random.default_rng(seed).normal(0, 0.05, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), "RGB")


def _reference(fixture: str, frames: int, height: int, width: int, image: Any, last: Any = None) -> dict[str, Any]:
    """diffusers' WanImageToVideoPipeline: the video, every transformer output and which expert made it, and what
    its VAE encoded."""
    import torch
    from diffusers import WanImageToVideoPipeline

    from dtcompile.models.builtin import builtin_model_path

    pipe = WanImageToVideoPipeline.from_pretrained(builtin_model_path(BUILTIN[fixture]), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    got: dict[str, Any] = {"preds": [], "who": [], "encoded": []}

    def record(name: str) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            got["preds"].append(out[0].detach().clone())
            got["who"].append(name)

        return hook

    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name) is not None:
            getattr(pipe, name).register_forward_hook(record(name))
    encode = pipe.vae.encode

    def recorded_encode(x: Any, *args: Any, **kwargs: Any) -> Any:
        out = encode(x, *args, **kwargs)
        got["encoded"].append(out.latent_dist.parameters.detach().clone())
        return out

    pipe.vae.encode = recorded_encode
    extra = {"last_image": last} if last is not None else {}
    got["video"] = pipe(prompt=PROMPT, image=image, negative_prompt=NEGATIVE, num_frames=frames, height=height,
                        width=width, num_inference_steps=4, guidance_scale=5.0, max_sequence_length=TEXT_LEN[fixture],
                        generator=torch.Generator("cpu").manual_seed(3), **extra).frames[0]  # fmt: skip
    return got


# two sizes and two frame counts per family; the default tier runs one of each family
CASES = [
    ("wan21", 5, 32, 48, False),
    pytest.param("wan21", 9, 64, 32, False, marks=pytest.mark.slow),
    pytest.param("wan22", 5, 32, 48, False, marks=pytest.mark.slow),
    ("wan22", 9, 64, 64, True),  # with a last frame
    ("ti2v", 9, 32, 64, False),  # Wan2.2 TI2V: per-token timesteps, the image alone through the VAE encoder
]


@pytest.mark.parametrize(("fixture", "frames", "height", "width", "last"), CASES)
def test_run_matches_the_pipeline_every_call_through_the_encoder_engines(
    fixture: str, frames: int, height: int, width: int, last: bool, request: pytest.FixtureRequest
) -> None:
    from dtcompile.backends.standin import ImageEncoderModule, VaeEncoderModule
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.media import video_uint8
    from dtcompile.runtime.session import Session

    artifact = request.getfixturevalue(fixture)
    image, last_image = _image(width, height), (_image(width, height, seed=1) if last else None)
    want = _reference(fixture, frames, height, width, image, last_image)
    session = Session(artifact, "onnxruntime")
    pipe = session.load()
    assert isinstance(pipe.vae, VaeEncoderModule)
    pipe.vae.trace = []
    got = session.generate(
        session.request(PROMPT, steps=4, seed=3, frames=frames, height=height, width=width, guidance=5.0,
                        negative_prompt=NEGATIVE, image=image, last_image=last_image),
        trace=True,
    )  # fmt: skip
    # the conditioning video went through the VAE encoder engine (padded to its 9 frames, the leading latents kept)
    assert pipe.vae.calls == 1 and len(pipe.vae.trace) == len(want["encoded"]) == 1
    lat = (frames - 1) // 4 + 1
    z, f = (48, 16) if fixture == "ti2v" else (16, 8)  # latent channels, VAE factor
    encoded = (1, 2 * z, 1 if fixture == "ti2v" else lat, height // f, width // f)  # TI2V encodes the image alone
    assert tuple(pipe.vae.trace[0].shape) == tuple(want["encoded"][0].shape) == encoded
    assert rel_l2(pipe.vae.trace[0], want["encoded"][0]) <= 1e-4
    if fixture == "wan21":  # the CLIP image embeddings came from the image encoder engine
        assert isinstance(pipe.image_encoder, ImageEncoderModule) and pipe.image_encoder.calls == 1
    preds, who = want["preds"], want["who"]
    assert len(got.trace) == len(preds) == 8  # 4 steps x (conditional + unconditional)
    latent = (1, z, lat, height // f, width // f)
    for call, (a, b) in enumerate(zip(got.trace, preds, strict=True)):
        assert tuple(a.shape) == tuple(b.shape) == latent
        assert rel_l2(a, b) <= 1e-4, f"call {call} ({who[call]})"
    if fixture == "wan22":  # boundary 0.9 x 1000: the high-noise expert first, then the low-noise one
        switch = who.index("transformer_2")
        assert 0 < switch < len(who) and set(who[switch:]) == {"transformer_2"}
        assert got.engine_module.calls == switch  # the engines were called exactly as the experts were
        assert pipe.transformer_2.calls == len(who) - switch
    a, b = video_uint8(got.image), video_uint8(want["video"])
    assert a.shape == b.shape == (frames, height, width, 3)
    assert min(psnr(x, y) for x, y in zip(a, b, strict=True)) >= 40  # every decoded frame


def test_ti2v_artifact_also_makes_text_to_video(ti2v: Path) -> None:
    """One Wan2.2 TI2V artifact, no image: WanPipeline over the same engines, every call and frame as diffusers'
    own WanPipeline on the same weights; the timestep graph input is per token."""
    import torch
    from diffusers import WanPipeline

    from dtcompile.core.metrics import rel_l2
    from dtcompile.manifest import read_manifest
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.runtime.media import video_uint8
    from dtcompile.runtime.session import Session

    tr = read_manifest(ti2v).component("transformer")
    assert tr.profile is not None and tr.profile["timestep"]["max"] == [2, 3 * 2 * 2]  # 3 latent frames x 2 x 2
    ref = WanPipeline.from_pretrained(builtin_model_path("tiny-wan22-ti2v"), dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    preds: list[Any] = []
    ref.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    want = ref(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=64, width=32, num_inference_steps=3,
               guidance_scale=5.0, max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(3)).frames[0]  # fmt: skip
    session = Session(ti2v, "onnxruntime")
    got = session.generate(session.request(PROMPT, steps=3, seed=3, frames=5, height=64, width=32, guidance=5.0,
                                           negative_prompt=NEGATIVE), trace=True)  # fmt: skip
    assert isinstance(session.text_pipe(), WanPipeline) and session.pipe.vae.calls == 0  # no image encoded
    assert len(got.trace) == len(preds) == 6
    for call, (a, b) in enumerate(zip(got.trace, preds, strict=True)):
        assert rel_l2(a, b) <= 1e-4, f"call {call}"
    a, b = video_uint8(got.image), video_uint8(want)
    assert a.shape == b.shape == (5, 64, 32, 3)
    assert min(psnr(x, y) for x, y in zip(a, b, strict=True)) >= 40


def test_manifest_components_profiles_and_pipeline_files(wan21: Path, wan22: Path) -> None:
    from dtcompile.manifest import read_manifest

    m = read_manifest(wan21)
    assert m.source.pipeline_class == "WanImageToVideoPipeline"
    enc, clip, tr = m.component("vae_encoder"), m.component("image_encoder"), m.component("transformer")
    assert (enc.role, enc.attr, clip.role, clip.attr) == ("vae_encoder", "vae", "image_encoder", "image_encoder")
    # the VAE encoder takes one image at the recipe's frame maximum; height and width follow the profile
    assert enc.profile == {"sample": {"min": [1, 3, 9, 32, 32], "opt": [1, 3, 9, 32, 48], "max": [1, 3, 9, 64, 64]}}
    assert clip.profile == {"pixel_values": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [2, 3, 32, 32]}}
    # 36 channels (noise + mask + condition), 5..9 frames -> 2..3 latent frames, 65 CLIP tokens of width 16
    assert tr.profile is not None
    assert tr.profile["hidden_states"] == {"min": [1, 36, 2, 4, 4], "opt": [1, 36, 3, 4, 6], "max": [2, 36, 3, 8, 8]}
    assert tr.profile["encoder_hidden_states_image"]["opt"] == [1, 65, 16]
    assert tr.profile["encoder_hidden_states"]["opt"] == [1, 512, 32]
    # the torch VAE stays in the pipeline files (it decodes); the image encoder does not
    files = {Path(f.file).parts[1] for f in m.pipeline.files}
    assert "vae" in files and "image_encoder" not in files and "transformer" not in files
    m22 = read_manifest(wan22)
    assert m22.denoiser_names() == ["transformer", "transformer_2"] and m22.aux_names() == ["vae_encoder"]
    assert "encoder_hidden_states_image" not in m22.component("transformer").input_names()


def test_load_pipeline_drives_the_users_own_call(wan22: Path) -> None:
    import torch
    from diffusers import WanImageToVideoPipeline

    import dtcompile
    from dtcompile.core.metrics import rel_l2

    image = _image(48, 32)
    pipe = dtcompile.load_pipeline(wan22, backend="onnxruntime")
    assert isinstance(pipe, WanImageToVideoPipeline)
    out = pipe(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=32, width=48,
               num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(5)).frames[0]  # fmt: skip
    assert pipe.vae.calls == 1
    from dtcompile.models.builtin import builtin_model_path

    ref = WanImageToVideoPipeline.from_pretrained(builtin_model_path("tiny-wan22-i2v"), dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    want = ref(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=32, width=48,
               num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(5)).frames[0]  # fmt: skip
    assert out.shape == want.shape == (5, 32, 48, 3)
    assert rel_l2(torch.from_numpy(out), torch.from_numpy(want)) <= 1e-4


def test_size_follows_the_images_aspect(wan22: Path) -> None:
    from dtcompile.runtime.session import Session

    session = Session(wan22, "onnxruntime")
    tall = session.request(PROMPT, steps=1, image=_image(100, 200))  # 1:2 at the built opt area 32x48
    assert (tall.height, tall.width) == (48, 32)
    wide = session.request(PROMPT, steps=1, image=_image(300, 200))
    assert (wide.height, wide.width) == (32, 48)
    asked = session.request(PROMPT, steps=1, image=_image(100, 200), height=64, width=64)  # named sizes win
    assert (asked.height, asked.width) == (64, 64)


@pytest.fixture(scope="module")
def wan21_t2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny-wan21.yaml")


BAD = [
    ("wan22", [], "error: --image: WanImageToVideoPipeline artifacts start from an image; pass --image FIRST.png"),
    pytest.param(  # builds a third artifact (text-to-video)
        "wan21_t2v",
        ["--image", "{ok}"],
        "error: --image: WanPipeline artifacts take no reference image",
        marks=pytest.mark.slow,
    ),
    ("wan22", ["--image", "{thin}"], "makes 16x80 at the artifact's area; the artifact takes widths 32..64"),
    ("wan22", ["--image", "{big}"], "20000x20000 pixels is too large for a reference image"),
    ("wan22", ["--image", "{ok}", "--frames", "6"], "error: --frames 6: Wan takes 4k+1 frames"),
    ("wan21", ["--image", "{ok}", "--last-image", "{ok}"], "error: --last-image: this Wan2.1 I2V model has no"),
    ("ti2v", ["--image", "{ok}", "--last-image", "{ok}"], "error: --last-image: Wan2.2 TI2V conditions on the first"),
    ("ti2v", ["--frames", "7"], "error: --frames 7: Wan takes 4k+1 frames"),  # text-to-video from the same artifact
]


@pytest.mark.parametrize(("fixture", "args", "message"), BAD)
def test_bad_inputs_are_one_line_and_write_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, request: pytest.FixtureRequest, fixture: str,
    args: list[str], message: str,
) -> None:  # fmt: skip
    artifact = request.getfixturevalue(fixture)
    files = {"ok": tmp_path / "ok.png", "thin": tmp_path / "thin.png", "big": tmp_path / "big.png"}
    _image(48, 32).save(files["ok"])
    _image(20, 100).save(files["thin"])
    files["big"].write_bytes(png_header(20000, 20000))
    out = tmp_path / "out" / "video.mp4"
    argv = [a.format(**files) for a in args]
    r = dtc_here(capsys, "run", str(artifact), "--prompt", PROMPT, "--steps", "1", *argv, "--out", str(out))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not out.parent.exists()  # nothing written


@pytest.mark.slow  # fp8 calibration + accuracy of both experts and three RTX builds: minutes on a shared CPU
def test_fp8_twin_builds_rtx_sm89_engines_for_every_component(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install 'dtcompile[rtx]')")
    from dtcompile.manifest import read_manifest
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-i2v-fp8")
    sets = [f"output.dir={out}", "engine.targets=[sm_89]"]
    artifact = run_build(load_recipe(ROOT / "recipes" / "tiny-wan22-i2v-fp8.yaml", sets)).artifact_dir
    m = read_manifest(artifact)
    for name in ("transformer", "transformer_2", "vae_encoder"):
        targets = {(e.backend, e.arch) for e in m.component(name).engines}
        assert ("tensorrt-rtx", "sm_89") in targets, (name, targets)
    assert m.component("transformer").quant is not None and m.component("transformer_2").quant is not None
    assert m.component("vae_encoder").quant is None  # the VAE encoder stays float


@pytest.mark.slow  # a fourth build (another family)
def test_kontext_reference_goes_through_the_vae_encoder_engine(tmp_path_factory: pytest.TempPathFactory) -> None:
    """FLUX.1 Kontext with its reference image encoded and the result decoded by engines (vae_encoder wraps the
    vae_decoder's stand-in): every step and the image match FluxKontextPipeline's own."""
    import torch
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from dtcompile.backends.standin import VaeDecoderModule, VaeEncoderModule
    from dtcompile.core.metrics import rel_l2
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import Session
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-kontext-vae")
    sets = [f"output.dir={out}", "engine.backends=[onnxruntime]", "engine.targets=[]",
            "components=[transformer, vae_encoder, vae_decoder]"]  # fmt: skip
    artifact = run_build(load_recipe(ROOT / "recipes" / "tiny-flux-kontext.yaml", sets)).artifact_dir
    ref = _image(64, 48)
    pipe = FluxKontextPipeline.from_pretrained(builtin_model_path("tiny-flux-kontext"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    preds: list[Any] = []
    pipe.transformer.register_forward_hook(lambda mod, args, out: preds.append(out[0].detach().clone()))
    want = pipe(prompt=PROMPT, image=ref, height=48, width=64, num_inference_steps=3, max_area=48 * 64,
                _auto_resize=False, max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(3)).images[0]  # fmt: skip
    session = Session(artifact, "onnxruntime")
    engines = session.load()
    assert isinstance(engines.vae, VaeEncoderModule) and isinstance(engines.vae.decoder, VaeDecoderModule)
    got = session.generate(session.request(PROMPT, steps=3, seed=3, height=48, width=64, image=ref), trace=True)
    assert engines.vae.calls == 1 and engines.vae.decoder.calls == 1
    assert len(got.trace) == len(preds) == 3
    for step, (a, b) in enumerate(zip(got.trace, preds, strict=True)):
        assert rel_l2(a, b) <= 1e-4, f"step {step}"
    assert psnr(np.asarray(got.image), np.asarray(want)) >= 40
    assert isinstance(want, Image.Image)


@pytest.mark.slow  # two more builds and three refits
def test_wan21_i2v_lora_fused_equals_refit_and_none_restores(wan21: Path, tmp_path: Path) -> None:
    """A Wan LoRA read by WanImageToVideoPipeline's loader: fused at build == refit into the plain artifact (the
    VAE encoder and image encoder engines carried over); ``--lora none`` restores the base."""
    import torch
    from diffusers import WanTransformer3DModel

    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.media import video_uint8
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build
    from dtcompile.tools.refit import refit_artifact
    from tests.fixtures.lora import make_peft_lora

    source = builtin_model_path("tiny-wan21-i2v") / "transformer"
    wan = WanTransformer3DModel.from_pretrained(source, dtype=torch.float32)
    lora = make_peft_lora(wan, tmp_path / "wan-i2v.safetensors", pipeline_class="WanImageToVideoPipeline",
                          targets=("to_q", "to_k", "to_v", "to_out.0"), rank=4, alpha=8.0, seed=1)  # fmt: skip
    overrides = [f"output.dir={tmp_path / 'fused'}", "engine={backends: [onnxruntime]}",
                 f"lora=[{{source: {lora}, scale: 0.8}}]"]  # fmt: skip
    fused = run_build(load_recipe(ROOT / "recipes" / "tiny-wan21-i2v.yaml", overrides)).artifact_dir
    refit = refit_artifact(wan21, [(str(lora), 0.8)], out_dir=tmp_path / "refit", drop_unrefittable=True)
    back = refit_artifact(refit.artifact_dir, [], out_dir=tmp_path / "back", drop_unrefittable=True)
    image = _image(48, 32)

    def video(artifact: Path) -> np.ndarray:
        out = run_artifact(artifact, PROMPT, image=image, steps=3, seed=3, frames=5, height=32, width=48,
                           guidance=5.0, backend="onnxruntime")  # fmt: skip
        return video_uint8(out.image)

    base, with_lora = video(wan21), video(fused)
    assert not np.array_equal(base, with_lora)
    assert min(psnr(a, b) for a, b in zip(video(refit.artifact_dir), with_lora, strict=True)) >= 40
    assert min(psnr(a, b) for a, b in zip(video(back.artifact_dir), base, strict=True)) >= 40


@pytest.mark.slow  # a split build of both experts
def test_wan22_i2v_block_cache_off_matches_the_monolithic_artifact(wan22: Path, tmp_path: Path) -> None:
    """Both 36-channel experts split into block engines (first-block cache): with the cache off every call equals
    the monolithic artifact's; with it on, the run completes through the same VAE encoder engine."""
    from dtcompile.core.metrics import rel_l2
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build

    overrides = [f"output.dir={tmp_path}", "engine.backends=[onnxruntime]", "engine.targets=[]",
                 "cache={mode: first_block, threshold: 0.1}"]  # fmt: skip
    split = run_build(load_recipe(ROOT / "recipes" / "tiny-wan22-i2v.yaml", overrides)).artifact_dir
    image = _image(48, 32)
    kw: dict[str, Any] = dict(image=image, steps=4, seed=3, frames=5, height=32, width=48, guidance=5.0,
                              negative_prompt=NEGATIVE, backend="onnxruntime", trace=True)  # fmt: skip
    mono = run_artifact(wan22, PROMPT, **kw)
    off = run_artifact(split, PROMPT, cache=False, **kw)
    assert len(off.trace) == len(mono.trace) == 8
    for call, (a, b) in enumerate(zip(off.trace, mono.trace, strict=True)):
        assert rel_l2(a, b) <= 1e-4, f"call {call}"
    on = run_artifact(split, PROMPT, cache=True, **kw)
    assert len(on.trace) == 8 and on.cache_stats is not None


def test_cli_writes_the_video_from_an_image_and_a_last_image(
    capsys: pytest.CaptureFixture[str], wan22: Path, tmp_path: Path
) -> None:
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    _image(200, 100).save(first)  # 2:1 at the built opt area 32x48: 32 x 48 (multiples of 16)
    _image(200, 100, seed=1).save(last)
    out = tmp_path / "video.mp4"
    r = dtc_here(capsys, "run", str(wan22), "--prompt", PROMPT, "--steps", "2", "--frames", "5", "--image",
                 str(first), "--last-image", str(last), "--backend", "onnxruntime", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 0


def test_a_lora_of_the_other_width_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], wan21: Path, tmp_path: Path
) -> None:
    """A Wan LoRA made for a transformer of another width (48 wide, not tiny-wan21-i2v's 32): ``dtc refit`` names
    the first mismatched weight and writes nothing."""
    from diffusers import WanTransformer3DModel

    from tests.fixtures.lora import make_peft_lora

    other = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=36,
                                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=16,
                                  added_kv_proj_dim=48)  # fmt: skip
    lora = make_peft_lora(other, tmp_path / "other-width.safetensors", pipeline_class="WanImageToVideoPipeline",
                          targets=("to_q", "to_k", "to_v", "to_out.0"), rank=4, alpha=8.0, seed=1)  # fmt: skip
    out = tmp_path / "refit"
    r = dtc_here(capsys, "refit", str(wan21), "--lora", str(lora), "--out", str(out), "--drop-unrefittable")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "shape mismatch in 'blocks.0.attn1.to_" in lines[0] and "but the weight is [32, 32]" in lines[0], lines[0]
    assert not out.exists()
