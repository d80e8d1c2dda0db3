"""The `lora` stage: recipe fields, file checks, diffusers/kohya parsing and fusion numerics on tiny FLUX."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.recipe import load_recipe
from dtcompile.stages.lora import (
    check_lora_fits,
    fuse_lora,
    lora_key_digest,
    read_lora,
    resolve_lora,
)
from tests.fixtures.lora import make_kohya_flux_lora, make_peft_lora

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxPipeline

    from dtcompile.models.builtin import builtin_model_path

    return FluxPipeline.from_pretrained(builtin_model_path("tiny-flux"), dtype=torch.float32)


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "peft": make_peft_lora(pipe.transformer, d / "peft.safetensors", rank=4, alpha=8.0, seed=1),
        "kohya": make_kohya_flux_lora(pipe.transformer, d / "kohya.safetensors", rank=4, alpha=2.0, seed=2),
    }


def shapes_of(module):
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def resolved(path: Path, scale: float = 1.0):
    return resolve_lora(str(path), None, scale, "lora[0].source")


# --- recipe and file checks ---------------------------------------------------------------------------------


def test_recipe_lora_section(tmp_path):
    text = (ROOT / "recipes" / "tiny-flux.yaml").read_text()
    good = tmp_path / "good.yaml"
    good.write_text(text + "lora:\n  - source: a.safetensors\n    scale: 0.5\n  - source: owner/repo\n")
    r = load_recipe(good)
    assert [(s.source, s.scale, s.weight_name) for s in r.lora] == [
        ("a.safetensors", 0.5, None),
        ("owner/repo", 1.0, None),
    ]
    assert r.engine_fields()["lora"][0]["scale"] == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "lora:\n  - source: a.safetensors\n  - source: style.ckpt\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    line = len(text.splitlines()) + 3
    assert str(e.value).startswith(f"{bad}:{line} lora[1].source: 'style.ckpt': is a pickled checkpoint")
    bad.write_text(text + "lora:\n  - source: a.safetensors\n    scale: .inf\n")
    with pytest.raises(RecipeError, match=r"lora\[0\]\.scale"):
        load_recipe(bad)


def test_missing_and_non_safetensors_files(tmp_path):
    with pytest.raises(RecipeError) as e:
        resolve_lora(str(tmp_path / "nope.safetensors"), None, 1.0, "lora[0].source")
    assert str(e.value) == f"lora[0].source: LoRA file '{tmp_path / 'nope.safetensors'}' does not exist"
    fake = tmp_path / "pickled.safetensors"
    fake.write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # a pickle stream renamed: never unpickled, refused by header
    with pytest.raises(RecipeError, match="is not a safetensors file \\(it looks like a pickle\\)"):
        resolve_lora(str(fake), None, 1.0, "lora[0].source")
    other = tmp_path / "weights.pt"
    other.write_bytes(b"PK\x03\x04")
    with pytest.raises(RecipeError, match="pickled checkpoint"):
        resolve_lora(str(other), None, 1.0, "--lora")
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        header = json.dumps({"__metadata__": {}}).encode()
        (folder / name).write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(RecipeError, match="several .safetensors files \\(a.safetensors, b.safetensors\\)"):
        resolve_lora(str(folder), None, 1.0, "lora[0].source")
    assert resolve_lora(str(folder), "b.safetensors", 1.0, "x").path == (folder / "b.safetensors").resolve()


def test_key_digest_covers_sha_and_scale(files):
    a, a2 = resolved(files["peft"], 1.0), resolved(files["peft"], 0.5)
    k = resolved(files["kohya"], 1.0)
    digests = {lora_key_digest("c", x) for x in ([], [a], [a2], [k], [a, k])}
    assert len(digests) == 5
    assert lora_key_digest("c", [a]) == lora_key_digest("c", [resolved(files["peft"], 1.0)])


# --- parsing ------------------------------------------------------------------------------------------------


def test_peft_file_keeps_alpha_from_metadata(files):
    from safetensors import safe_open

    w = read_lora(resolved(files["peft"]), "FluxPipeline")
    assert w.format == "diffusers" and len(w.modules) == 22
    f = w.modules["transformer_blocks.0.attn.to_q"]
    assert (f.rank, f.alpha, f.scaling(0.5)) == (4, 8.0, 1.0)  # 0.5 * 8 / 4
    with safe_open(str(files["peft"]), "pt") as sf:
        assert torch.equal(f.A, sf.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_A.weight"))


def test_kohya_file_maps_bfl_names_and_splits_qkv(files, pipe):
    from safetensors.torch import load_file

    w = read_lora(resolved(files["kohya"]), "FluxPipeline")
    assert w.format == "kohya"
    check_lora_fits(w, shapes_of(pipe.transformer), "transformer")
    raw = load_file(str(files["kohya"]))
    down = raw["lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight"]
    up = raw["lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight"]
    dim = down.shape[1]
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        f = w.modules[f"transformer_blocks.1.attn.{proj}"]
        want = up[i * dim : (i + 1) * dim] @ down * (2.0 / 4)  # alpha / rank
        torch.testing.assert_close(f.B @ f.A * f.scaling(1.0), want, rtol=1e-6, atol=1e-7)
    assert "transformer_blocks.1.attn.add_q_proj" in w.modules  # txt_attn_qkv


def test_keys_matching_no_module_and_shape_mismatch(tmp_path, pipe):
    from safetensors.torch import save_file

    other = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "transformer.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
            "transformer.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        str(other),
    )
    w = read_lora(resolved(other), "FluxPipeline")
    with pytest.raises(RecipeError) as e:
        check_lora_fits(w, shapes_of(pipe.transformer), "FluxPipeline.transformer")
    assert str(e.value) == (
        "lora[0].source: 'sdxl.safetensors': none of its LoRA modules match a module of FluxPipeline.transformer "
        "(e.g. 'down_blocks.0.attn.to_q'); is this a LoRA for another model?"
    )
    wide = tmp_path / "wide.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        str(wide),
    )
    with pytest.raises(RecipeError, match=r"shape mismatch in 'transformer_blocks.0.attn.to_q': B @ A is \[64, 128\]"):
        check_lora_fits(read_lora(resolved(wide), "FluxPipeline"), shapes_of(pipe.transformer), "t")
    bad_rank = tmp_path / "rank.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 8),
        },
        str(bad_rank),
    )
    with pytest.raises(RecipeError, match=r"rank mismatch in 'transformer_blocks.0.attn.to_q': lora_A is \[4, 64\]"):
        read_lora(resolved(bad_rank), "FluxPipeline")


def test_metadata_rank_contradicting_tensors(tmp_path):
    from safetensors.torch import save_file

    meta = {"transformer.r": 8, "transformer.lora_alpha": 8, "transformer.target_modules": ["to_q"]}
    path = tmp_path / "meta.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        str(path),
        metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"},
    )
    with pytest.raises(RecipeError, match="the adapter metadata says r=8 but its tensors have rank 4"):
        read_lora(resolved(path), "FluxPipeline")


def test_text_encoder_and_dora_adapters_are_refused(tmp_path):
    from safetensors.torch import save_file

    te = tmp_path / "te.safetensors"
    save_file(
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
        },
        str(te),
    )
    with pytest.raises(UnsupportedError, match="has weights for text_encoder .* transformer LoRAs only"):
        read_lora(resolved(te), "FluxPipeline")
    dora = tmp_path / "dora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.ones(1, 64)}, str(dora))
    with pytest.raises(UnsupportedError, match="DoRA"):
        read_lora(resolved(dora), "FluxPipeline")


# --- fusing -------------------------------------------------------------------------------------------------


def test_fuse_matches_the_formula_and_keeps_the_base(files):
    """diffusers' fuse (the build) equals W + s * alpha/r * B @ A computed here from the file alone."""
    from diffusers import FluxPipeline
    from safetensors import safe_open

    from dtcompile.models import ADAPTERS
    from dtcompile.models.builtin import builtin_model_path
    from dtcompile.stages.load import LoadedPipeline

    folder = builtin_model_path("tiny-flux")
    fresh = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in fresh.transformer.named_parameters()}
    loaded = LoadedPipeline(fresh, folder, "builtin", "FluxPipeline", ADAPTERS.get("flux")(), "sha", {})
    out = fuse_lora(loaded, [resolved(files["peft"], 0.7), resolved(files["kohya"], 1.0)], "float32")
    assert [a["format"] for a in out.adapters] == ["diffusers", "kohya"]
    assert [a["scale"] for a in out.adapters] == [0.7, 1.0] and all(len(a["sha256"]) == 64 for a in out.adapters)
    after = dict(fresh.transformer.named_parameters())
    assert not [n for n in after if "lora" in n or "base_layer" in n]
    with safe_open(str(files["peft"]), "pt") as f:
        a = f.get_tensor("transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight")
        b = f.get_tensor("transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight")
    name = "single_transformer_blocks.0.attn.to_k.weight"  # touched by the PEFT file only
    torch.testing.assert_close(after[name].detach(), before[name] + 0.7 * 8 / 4 * (b @ a), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.base[name], before[name])
    untouched = "transformer_blocks.0.ff.net.2.weight"
    assert untouched not in out.base and torch.equal(after[untouched].detach(), before[untouched])
    assert set(out.base) == {n for n in before if not torch.equal(before[n], after[n].detach())}


def test_relative_lora_paths_resolve_against_the_recipe_folder(tmp_path):
    """Like calibration prompts: a recipe and its adapters move together, whatever the current directory."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    folder = tmp_path / "elsewhere"
    shutil.copytree(root / "recipes" / "lora", folder / "lora")
    shutil.copy(root / "recipes" / "tiny-flux-lora.yaml", folder / "r.yaml")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "dtcompile", "build", "--recipe", str(folder / "r.yaml"), "--dry-run"],
        capture_output=True, text=True, cwd=cwd,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-1500:]
    assert f"lora: {(folder / 'lora' / 'tiny-flux-style.safetensors').resolve()}" in r.stdout


def test_the_dry_run_refuses_a_lora_for_another_model(tmp_path):
    """Matched against the weights' safetensors headers: no weight is loaded, the build never starts."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    root = Path(__file__).resolve().parents[2]
    other = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "transformer.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
            "transformer.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        str(other),
    )
    good = subprocess.run(
        [sys.executable, "-m", "dtcompile", "build", "--recipe", str(root / "recipes" / "tiny-flux-lora.yaml"),
         "--dry-run", "--set", f"output.dir={tmp_path / 'out'}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr[-1500:]
    assert "lora: every module of 1 adapter(s) matches a transformer weight" in good.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "dtcompile", "build", "--recipe", str(root / "recipes" / "tiny-flux.yaml"),
         "--dry-run", "--set", f"lora=[{{source: {other}}}]", "--set", f"output.dir={tmp_path / 'out'}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: lora[0].source: 'sdxl.safetensors': none of its LoRA modules match a module of the model's "
        "transformer (e.g. 'down_blocks.0.attn.to_q'); is this a LoRA for another model?"
    )
    assert not (tmp_path / "out").exists()
