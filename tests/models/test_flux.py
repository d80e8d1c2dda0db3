"""FLUX adapter and the tiny built-in: determinism, diffusers round trip, export spec and shape profiles."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dtcompile.core.errors import UnsupportedError
from dtcompile.core.graph import Range, Shapes
from dtcompile.models import ADAPTERS, adapter_for_pipeline_class
from dtcompile.models.builtin import builtin_model_path
from dtcompile.models.builtins.flux import BUILTINS
from dtcompile.models.flux import FluxAdapter, img_tokens, validate_image_size

PROMPTS = ["a photo of a cat", "a painting of a dog", "A red car at night, cinematic lighting!", "zebra 42"]


def _shapes(batch=(1, 1, 1), height=(32, 32, 32), width=(32, 32, 32), text_len=(16, 16, 16)) -> Shapes:
    return Shapes(batch=Range(*batch), height=Range(*height), width=Range(*width), text_len=Range(*text_len))


def _fake_transformer(guidance_embeds: bool = True) -> Any:
    """Just the config attributes the adapter reads (no torch needed for shape arithmetic)."""
    return SimpleNamespace(
        config={
            "in_channels": 64,
            "out_channels": None,
            "patch_size": 1,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": guidance_embeds,
        }
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    return BUILTINS["tiny-flux"].generate(tmp_path_factory.mktemp("tiny-flux") / "seed0", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_dir)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- light: no torch ----------------------------------------------------------------------------------


def test_import_loads_no_heavy_module() -> None:
    code = "import json, sys, dtcompile.models, dtcompile.models.flux; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert not {"torch", "diffusers", "transformers", "onnx"} & loaded


def test_registry_and_pipeline_class_lookup() -> None:
    assert ADAPTERS.get("flux") is FluxAdapter
    assert adapter_for_pipeline_class("FluxPipeline") == "flux"
    assert adapter_for_pipeline_class("StableDiffusion3Pipeline") == "sd3"
    assert adapter_for_pipeline_class("StableDiffusionXLPipeline") == "sdxl"
    with pytest.raises(
        UnsupportedError, match=r"unsupported pipeline class 'StableCascadePriorPipeline'.*FluxPipeline"
    ):
        adapter_for_pipeline_class("StableCascadePriorPipeline")
    with pytest.raises(UnsupportedError, match=r"unknown model family 'cascade'; choose one of: flux, sd3"):
        ADAPTERS.get("cascade")


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(UnsupportedError) as err:
        builtin_model_path("huge-flux")
    from dtcompile.models.builtin import builtins

    names = list(builtins())
    assert {"tiny-flux", "tiny-sd3", "tiny-wan22-i2v", "tiny-qwen-image"} <= set(names)  # every family's, in order
    assert str(err.value) == f"unknown built-in model 'huge-flux'; choose one of: {', '.join(names)}"


def test_builtins_have_descriptions() -> None:
    for name, model in BUILTINS.items():
        assert model.name == name and model.family in ADAPTERS.names()
        assert model.description and "\n" not in model.description


def test_validate_image_size() -> None:
    validate_image_size(1024, 768, 8)
    with pytest.raises(UnsupportedError, match=r"image width 1000 is not a positive multiple of 16.*1008"):
        validate_image_size(1024, 1000, 8)
    with pytest.raises(UnsupportedError, match="image height 0"):
        validate_image_size(0, 64, 8)
    assert img_tokens(1024, 768, 8) == 64 * 48


def test_shape_profile_numbers() -> None:
    shapes = _shapes(batch=(1, 2, 4), height=(512, 1024, 1024), width=(512, 1024, 1536), text_len=(256, 512, 512))
    prof = FluxAdapter().shape_profile(_fake_transformer(), {"vae_scale_factor": 8}, shapes)
    assert list(prof.min) == [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
    ]
    assert prof.min["hidden_states"] == (1, 1024, 64)
    assert prof.opt["hidden_states"] == (2, 4096, 64)
    assert prof.max["hidden_states"] == (4, 6144, 64)
    assert (prof.min["img_ids"], prof.opt["img_ids"], prof.max["img_ids"]) == (
        (1024, 3),
        (4096, 3),
        (6144, 3),
    )
    assert prof.min["encoder_hidden_states"] == (1, 256, 4096)
    assert prof.max["encoder_hidden_states"] == (4, 512, 4096)
    assert (prof.min["txt_ids"], prof.max["txt_ids"]) == ((256, 3), (512, 3))
    assert (prof.min["pooled_projections"], prof.max["pooled_projections"]) == ((1, 768), (4, 768))
    assert (prof.min["timestep"], prof.opt["guidance"], prof.max["guidance"]) == ((1,), (2,), (4,))
    assert prof.to_json()["hidden_states"] == {
        "min": [1, 1024, 64],
        "opt": [2, 4096, 64],
        "max": [4, 6144, 64],
    }


def test_shape_profile_without_guidance_and_bad_size() -> None:
    adapter = FluxAdapter()
    prof = adapter.shape_profile(_fake_transformer(guidance_embeds=False), {"vae_scale_factor": 8}, _shapes())
    assert "guidance" not in prof.min
    with pytest.raises(UnsupportedError, match="image height 40"):
        adapter.shape_profile(_fake_transformer(), {"vae_scale_factor": 8}, _shapes(height=(32, 40, 64)))
    with pytest.raises(UnsupportedError, match="vae_scale_factor"):
        adapter.shape_profile(_fake_transformer(), {}, _shapes())


# --- tiny pipeline --------------------------------------------------------------------------------


def test_generation_is_deterministic_and_small(tiny_dir: Path, tmp_path: Path) -> None:
    again = _files(BUILTINS["tiny-flux"].generate(tmp_path / "again", seed=0))
    other = _files(BUILTINS["tiny-flux"].generate(tmp_path / "other", seed=1))
    first = _files(tiny_dir)
    assert again == first  # byte-identical, configs and tokenizers included
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 4
    assert all(other[name] != first[name] for name in weights)
    assert sum(len(b) for b in first.values()) < 10 * 2**20


def test_generation_ignores_global_rng_state(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(123)
    a = _files(BUILTINS["tiny-flux"].generate(tmp_path / "a"))
    state = torch.random.get_rng_state()
    b = _files(BUILTINS["tiny-flux"].generate(tmp_path / "b"))
    assert a == b
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_round_trip_loads_real_classes_and_runs(pipe: Any, tiny_dir: Path) -> None:
    import torch

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert pipe.vae_scale_factor == 2
    assert not pipe.vae.config.use_quant_conv and not pipe.vae.config.use_post_quant_conv
    assert pipe.transformer.config.guidance_embeds

    def run(seed: int) -> Any:
        gen = torch.Generator().manual_seed(seed)
        kw = {"num_inference_steps": 2, "height": 32, "width": 32, "max_sequence_length": 16}
        return pipe("a photo of a cat", generator=gen, output_type="np", **kw).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 32, 32, 3)
    assert (a == b).all()
    assert not (a == c).all()


def test_tokenizers_round_trip(pipe: Any) -> None:
    from dtcompile.models.builtins.flux import TINY_FLUX_CONFIG
    from dtcompile.models.tiny_text import build_tiny_tokenizers

    built = build_tiny_tokenizers(TINY_FLUX_CONFIG)
    for fresh, loaded in zip(built, (pipe.tokenizer, pipe.tokenizer_2), strict=True):
        assert type(fresh) is type(loaded)
        assert fresh.model_max_length == loaded.model_max_length
        for prompt in PROMPTS:
            assert fresh(prompt).input_ids == loaded(prompt).input_ids
    assert pipe.tokenizer.model_max_length == 77
    clip_ids = [tuple(pipe.tokenizer(p).input_ids) for p in PROMPTS]
    t5_ids = [tuple(pipe.tokenizer_2(p).input_ids) for p in PROMPTS]
    assert len(set(clip_ids)) == len(set(t5_ids)) == len(PROMPTS)
    # Listed words are single tokens; unlisted text falls back to characters, never to <unk>.
    assert pipe.tokenizer.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert pipe.tokenizer_2.tokenize("a photo of a cat") == ["▁a", "▁photo", "▁of", "▁a", "▁cat"]
    assert pipe.tokenizer_2.unk_token_id not in pipe.tokenizer_2("Zebra 42, #1!").input_ids
    assert pipe.tokenizer.unk_token_id == pipe.tokenizer.eos_token_id  # CLIP's layout
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_builtin_is_generated_once_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    monkeypatch.setenv("DTC_CACHE_DIR", str(tmp_path))
    path = builtin_model_path("tiny-flux")
    assert path.parent == tmp_path / "builtin"
    assert re.fullmatch(r"tiny-flux-[0-9a-f]{12}", path.name)
    assert (path / "model_index.json").is_file()
    stamp = (path / "transformer" / "config.json").stat().st_mtime_ns
    assert builtin_model_path("tiny-flux") == path
    assert (path / "transformer" / "config.json").stat().st_mtime_ns == stamp  # not regenerated
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder left behind


# --- export spec ----------------------------------------------------------------------------------


def _resolve(dims: tuple[int | str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in dims)


def test_export_spec_example_inputs_run(pipe: Any) -> None:
    import torch

    adapter = FluxAdapter()
    cfg = adapter.pipe_config(pipe)
    assert cfg == {"vae_scale_factor": 2, "tokenizer_max_length": 77}
    shapes = _shapes(batch=(1, 2, 4), height=(32, 64, 128), width=(32, 32, 64), text_len=(8, 16, 32))
    spec = adapter.export_spec(pipe.transformer, cfg, shapes, torch.float32)

    assert spec.input_names == [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
    ]
    assert spec.output_names == ["latent"]
    assert list(spec.example_inputs) == spec.input_names
    assert spec.dynamic_axes()["hidden_states"] == {0: "batch", 1: "img_tokens"}
    assert spec.dynamic_axes()["txt_ids"] == {0: "text_len"}
    assert {t.name: t.dtype for t in spec.inputs} == {
        "hidden_states": "float32",
        "encoder_hidden_states": "float32",
        "pooled_projections": "float32",
        "timestep": "float32",
        "img_ids": "float32",
        "txt_ids": "float32",
        "guidance": "float32",
    }

    sizes = {"batch": 2, "img_tokens": img_tokens(64, 32, 2), "text_len": 16}
    prof = adapter.shape_profile(pipe.transformer, cfg, shapes)
    for t in spec.inputs:
        x = spec.example_inputs[t.name]
        assert tuple(x.shape) == _resolve(t.dims, sizes) == prof.opt[t.name]
    ts = spec.example_inputs["timestep"]
    assert ((ts >= 0) & (ts <= 1)).all()
    assert torch.equal(
        spec.example_inputs["img_ids"],
        pipe._prepare_latent_image_ids(1, 64 // 4, 32 // 4, "cpu", torch.float32),
    )

    wrapper = adapter.export_module(pipe.transformer)
    with torch.no_grad():
        out = wrapper(*spec.example_inputs.values())
        ref = pipe.transformer(**spec.example_inputs, return_dict=False)[0]
    assert tuple(out.shape) == _resolve(spec.outputs[0].dims, sizes) == (2, 128, 16)
    assert torch.equal(out, ref)
    assert next(wrapper.parameters()) is next(pipe.transformer.parameters())  # wraps, does not copy

    again = adapter.export_spec(pipe.transformer, cfg, shapes, torch.float32)
    assert all(torch.equal(again.example_inputs[n], x) for n, x in spec.example_inputs.items())  # seeded


def test_export_spec_static_text_len_and_dtype(pipe: Any) -> None:
    import torch

    adapter = FluxAdapter()
    spec = adapter.export_spec(pipe.transformer, adapter.pipe_config(pipe), _shapes(), torch.bfloat16)
    dims = {t.name: t.dims for t in spec.inputs}
    assert dims["encoder_hidden_states"] == ("batch", 16, 32)
    assert dims["txt_ids"] == (16, 3)
    assert "txt_ids" not in spec.dynamic_axes()
    dtypes = {t.name: t.dtype for t in [*spec.inputs, *spec.outputs]}
    assert dtypes["hidden_states"] == dtypes["timestep"] == dtypes["latent"] == "bfloat16"
    assert dtypes["img_ids"] == dtypes["txt_ids"] == dtypes["guidance"] == "float32"
    for t in spec.inputs:
        assert str(spec.example_inputs[t.name].dtype) == f"torch.{t.dtype}"


def test_pipeline_calls_transformer_with_profiled_shapes(pipe: Any) -> None:
    """What FluxPipeline really passes matches the declared names, shapes and (up to casts) dtypes."""
    import torch

    seen: list[dict[str, Any]] = []

    def grab(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        kw = {"num_inference_steps": 1, "height": 32, "width": 48, "max_sequence_length": 24}
        pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    finally:
        handle.remove()

    adapter = FluxAdapter()
    shapes = _shapes(batch=(2, 2, 2), height=(32, 32, 32), width=(48, 48, 48), text_len=(24, 24, 24))
    expected = adapter.shape_profile(pipe.transformer, adapter.pipe_config(pipe), shapes).opt
    got = seen[0]
    assert set(got) == set(expected)
    assert {k: tuple(v.shape) for k, v in got.items()} == expected
    assert got["guidance"].dtype == torch.float32
    assert torch.equal(
        got["img_ids"],
        adapter.export_spec(pipe.transformer, {"vae_scale_factor": 2}, shapes, torch.float32).example_inputs["img_ids"],
    )
    assert not got["txt_ids"].any()
