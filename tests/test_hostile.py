"""Hostile artifacts, files and values (issue 12): each refused in one line, nothing written outside its folder.

Every test makes its hostile input itself from a copy of the session's tiny artifact (conftest.tiny_artifact).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtcompile.core.digests import sha256_file
from dtcompile.core.errors import ArtifactError, RecipeError
from dtcompile.manifest import read_manifest
from tests.fixtures.artifacts import edit_manifest

PROMPT = "a red fox in the snow"


def dtc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtcompile", *args], capture_output=True, text=True, cwd=cwd)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The CLI's single ``error:`` line (and no traceback)."""
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def art(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifact (onnxruntime + RTX engines) inside ``tmp_path/box``."""
    dst = tmp_path / "box" / "art"
    shutil.copytree(tiny_artifact, dst)
    return dst


# --- 1. paths from a manifest stay inside the artifact ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../../outside/transformer.onnx", "/etc/passwd", "onnx/../../x.onnx", "onnx\\..\\x.onnx", "./x"]
)
def test_manifest_paths_outside_the_artifact_are_refused_on_read(art: Path, bad: str) -> None:
    def edit(m):
        m["components"]["transformer"]["onnx"]["file"] = bad

    edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=r"components\.transformer\.onnx\.file: must be a relative path inside"):
        read_manifest(art)
    for cmd in (
        ["inspect", str(art), "--verify"],
        ["run", str(art), "--prompt", PROMPT, "--out", str(art.parent / "o.png")],
    ):
        r = dtc(*cmd)
        assert r.returncode != 0
        assert "components.transformer.onnx.file: must be a relative path inside the artifact folder" in one_error_line(
            r
        )
    assert not (art.parent / "o.png").exists()


def test_refit_through_a_link_out_of_the_artifact_writes_nothing_outside(art: Path, tmp_path: Path) -> None:
    """A listed file replaced by a symlink to a file outside: refit, run and inspect --verify refuse it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    onnx_rel = read_manifest(art).components["transformer"].onnx.file
    target = outside / "transformer.onnx"
    shutil.move(art / onnx_rel, target)
    (art / onnx_rel).symlink_to(target)
    before = snapshot(outside)
    for cmd in (
        ["refit", str(art), "--lora", "none", "--out", str(tmp_path / "refit"), "--drop-unrefittable"],
        ["inspect", str(art), "--verify"],
        ["run", str(art), "--prompt", PROMPT, "--backend", "onnxruntime", "--out", str(tmp_path / "o.png")],
    ):
        r = dtc(*cmd)
        assert r.returncode != 0, cmd
        assert "resolves outside the artifact folder" in one_error_line(r), cmd
    assert snapshot(outside) == before
    assert not (tmp_path / "refit").exists() and not (tmp_path / "o.png").exists()


# --- 2. refit does not launder tampering ---------------------------------------------------------------------------


def test_refit_refuses_a_tampered_graph(art: Path, tmp_path: Path) -> None:
    m = read_manifest(art)
    onnx = m.components["transformer"].onnx
    data_file = art / (onnx.external_data[0].file if onnx.external_data else onnx.file)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # an initializer byte no LoRA touches
    data_file.write_bytes(bytes(raw))
    r = dtc("refit", str(art), "--lora", "none", "--out", str(tmp_path / "refit"), "--drop-unrefittable")
    assert r.returncode != 0
    assert "sha256 does not match the manifest" in one_error_line(r)
    assert not (tmp_path / "refit").exists()
    assert not [p for p in tmp_path.rglob(".*refit-*")]  # no temp folder left


# --- 3. run verifies the saved pipeline ----------------------------------------------------------------------------


def test_run_refuses_a_modified_pipeline_file(art: Path, tmp_path: Path) -> None:
    vae = next(p for p in (art / "pipeline" / "vae").iterdir() if p.suffix == ".safetensors")
    raw = bytearray(vae.read_bytes())
    raw[-1] ^= 0x01
    vae.write_bytes(bytes(raw))
    r = dtc("run", str(art), "--prompt", PROMPT, "--backend", "onnxruntime", "--out", str(tmp_path / "o.png"))
    assert r.returncode != 0
    assert f"{vae}: sha256 does not match the manifest" in one_error_line(r)
    assert not (tmp_path / "o.png").exists()


def test_run_refuses_an_unlisted_pipeline_file(art: Path, tmp_path: Path) -> None:
    extra = art / "pipeline" / "scheduler" / "scheduler_config.old.json"
    extra.write_text("{}")
    r = dtc("run", str(art), "--prompt", PROMPT, "--backend", "onnxruntime", "--out", str(tmp_path / "o.png"))
    assert r.returncode != 0
    assert f"{extra}: not listed in the manifest" in one_error_line(r)


# --- 4. pickles never travel -----------------------------------------------------------------------------------------


def test_a_pickle_listed_in_a_manifest_is_refused(art: Path, tmp_path: Path) -> None:
    def edit(m):
        m["pipeline"]["files"][0]["file"] = "pipeline/vae/diffusion_pytorch_model.bin"

    edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=r"pipeline\.files\[0\]\.file: is a pickle-format file"):
        read_manifest(art)
    r = dtc("publish", str(art), "--to", str(tmp_path / "store"))
    assert r.returncode != 0 and "is a pickle-format file" in one_error_line(r)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.tar"))


def test_build_from_a_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    """A local pipeline whose VAE ships only a .bin: the build refuses it before anything is written."""
    from dtcompile.models.builtin import builtin_model_path

    src = tmp_path / "ckpt"
    shutil.copytree(builtin_model_path("tiny-flux"), src)
    import torch
    from safetensors.torch import load_file

    vae_dir = src / "vae"
    st = vae_dir / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), vae_dir / "diffusion_pytorch_model.bin")
    st.unlink()
    r = dtc(
        "build",
        "--recipe",
        str(Path(__file__).resolve().parents[1] / "recipes" / "tiny-flux.yaml"),
        "--set",
        f"model.source={src}",
        "--set",
        f"output.dir={tmp_path / 'out'}",
        "--set",
        "engine={backends: [onnxruntime]}",
    )
    assert r.returncode != 0
    line = one_error_line(r)
    assert "model.source:" in line and "safetensors" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("manifest.json"))


# --- 5. non-finite values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_non_finite_lora_scales_are_refused(art: Path, tmp_path: Path, scale: str) -> None:
    r = dtc("refit", str(art), "--lora", f"{tmp_path / 'x.safetensors'}:{scale}", "--out", str(tmp_path / "o"))
    assert r.returncode != 0
    assert "the scale must be a finite number" in one_error_line(r)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_guidance_is_refused(art: Path, tmp_path: Path, value: str) -> None:
    r = dtc("run", str(art), "--prompt", PROMPT, "--guidance", value, "--out", str(tmp_path / "o.png"))
    assert r.returncode != 0
    assert f"--guidance {value}: must be a finite number" in one_error_line(r)
    assert not (tmp_path / "o.png").exists()


def test_a_size_the_family_would_round_is_refused_not_rounded(tiny_artifact: Path, tmp_path: Path) -> None:
    # tiny-flux's VAE downsamples by 2: FLUX sizes are multiples of 4; FluxPipeline would silently make 32 of 34
    r = dtc("run", str(tiny_artifact), "--prompt", PROMPT, "--height", "34", "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2
    assert "image height 34 is not a positive multiple of 4" in one_error_line(r)
    assert not (tmp_path / "o.png").exists()


def test_a_lora_with_nan_weights_is_refused(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.stages.lora import ResolvedLora, read_lora
    from tests.fixtures.lora import make_peft_lora

    module = FluxTransformer2DModel.from_pretrained(builtin_model_path("tiny-flux") / "transformer")
    path = make_peft_lora(module, tmp_path / "a.safetensors")
    sd = load_file(path)
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(sd, path, metadata=meta)
    resolved = ResolvedLora("lora[0]", str(path), None, path, sha256_file(path), 1.0)
    with pytest.raises(RecipeError, match=r"lora\[0\]: module '.*' has NaN or Inf values in its lora_B weights"):
        read_lora(resolved, "FluxPipeline")


def test_an_engine_returning_nan_stops_the_run_naming_the_step() -> None:
    import torch

    from dtcompile.backends.standin import EngineModule
    from dtcompile.core.errors import VerificationError

    calls = []

    def runner(feeds):
        calls.append(1)
        out = feeds["x"].clone()
        if len(calls) == 2:
            out[0] = float("nan")
        return {"y": out}

    module = EngineModule(runner, {}, ["x"], "y", torch.float32)
    module(x=torch.ones(2))
    with pytest.raises(VerificationError, match=r"returned 1 NaN/Inf value\(s\) at call 2 \(denoising step 2"):
        module(x=torch.ones(2))


# --- 7/8. recipes: one line for bytes, duplicates and malformed overrides -------------------------------------------


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (b"name: x\nname: y\n", [], r"fuzz.yaml:2: invalid YAML \(duplicate key 'name' \(first given on line 1\)\)"),
        (b"engine: {opt_level: 3, opt_level: 2}\n", [], r"invalid YAML \(duplicate key 'opt_level'"),
        (b"name: \xff\xfe\n", [], r"fuzz.yaml: not UTF-8 text \(byte 6\); save the recipe as UTF-8"),
        (b"[" * 5000, [], r"fuzz.yaml: invalid YAML \(nested too deeply\)"),
        (b"name: x\n", ["export.opset=[1"], r"--set 'export.opset=\[1': the value is not valid YAML"),
        (b"name: x\n", ["export..opset=1"], r"--set 'export..opset=1': 'export..opset' is not a dotted field path"),
    ],
)
def test_bad_recipe_bytes_and_overrides_fail_in_one_line(tmp_path: Path, text: bytes, overrides, message) -> None:
    from dtcompile.recipe import load_recipe

    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine.opt_level=true", "--set engine.opt_level: True: Input should be a valid integer"),
        ("engine.refittable=1", "--set engine.refittable: 1: Input should be a valid boolean"),
        ("export.opset='19'", "--set export.opset: '19': Input should be a valid integer"),
        ("export.opset=19.5", "--set export.opset: 19.5: Input should be a valid integer"),
    ],
)
def test_values_of_the_wrong_type_are_not_coerced(override: str, message: str) -> None:
    from dtcompile.recipe import load_recipe

    with pytest.raises(RecipeError) as info:
        load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny-flux.yaml", [override])
    assert str(info.value) == message


# --- 8. the dry run refuses what the build would refuse --------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "export.shapes.height={min: 32, opt: 34, max: 128}",
            "export.shapes.height.opt: 34 is not a positive multiple of 4",
        ),
        ("export.shapes.width={min: 32, opt: 64, max: 100000}", "--set export.shapes.width.max: 100000 is above 16384"),
        ("export.shapes.text_len=600", "export.shapes.text_len.max: 600 is above 512, the longest prompt FluxPipeline"),
        ("export.shapes.batch={min: 1, opt: 1, max: 1000}", "--set export.shapes.batch.max: 1000 is above 64"),
        ("output.dir=README.md", "output.dir: README.md is a file, not a folder"),
        (
            "quant={format: fp8, calib: {prompts: nofile.txt}}",
            "quant.calib.prompts: prompt file 'nofile.txt' not found",
        ),
    ],
)
def test_dry_run_refuses_what_the_build_refuses(override: str, message: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    before = snapshot(root / "engines") if (root / "engines").is_dir() else {}
    r = dtc("build", "--recipe", str(root / "recipes" / "tiny-flux.yaml"), "--set", override, "--dry-run", cwd=root)
    assert r.returncode != 0
    assert message in one_error_line(r)
    assert (snapshot(root / "engines") if (root / "engines").is_dir() else {}) == before


def test_run_checks_out_before_running(art: Path, tmp_path: Path) -> None:
    for out, message in (
        (tmp_path / "x.gif", "expected a .png, .jpg, .jpeg, .webp file name"),
        (Path(__file__) / "x.png", "is a file, not a folder"),
    ):
        r = dtc("run", str(art), "--prompt", PROMPT, "--out", str(out))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    r = dtc("run", str(art), "--prompt", PROMPT, "--backend", "onnxruntime", "--out", str(tmp_path / "x.jpg"))
    assert r.returncode == 0, r.stderr[-1500:]
    assert (tmp_path / "x.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG bytes for a .jpg
