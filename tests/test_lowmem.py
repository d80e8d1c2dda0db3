"""Running big models on small devices: residency, tiled VAE decode, weight streaming and the memory plan.

A tiny FLUX with its text encoders and VAE decoder as onnxruntime engines is built once; runs with
``residency="sequential"`` are compared with ``all`` bit for bit, and the components resident while each one
runs are recorded. The memory plan's budget logic is checked on TensorRT-RTX engine entries (no GPU needed to
plan); what needs a GPU (a streamed engine at 25/50/100% budget) is in the GPU-marked tests at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dtcompile.core.errors import DtcError, UnsupportedError
from tests.fixtures.builds import ORT_ONLY, build_recipe
from tests.fixtures.gpu import requires_trt

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-flux-components.yaml", *ORT_ONLY)


def _image(session: Any) -> Any:
    import numpy as np

    result = session.generate(session.request(PROMPT, steps=2, seed=1, height=64, width=64))
    return np.asarray(result.image), result


# --- residency -------------------------------------------------------------------------------------------------


def test_sequential_keeps_one_component_resident_and_matches_all(components: Path) -> None:
    import numpy as np

    from dtcompile.runtime.session import Session

    every = Session(components, "onnxruntime", residency="all")
    image_all, result_all = _image(every)
    assert result_all.swaps == []  # everything opened at load: nothing swapped during the run

    one = Session(components, "onnxruntime", residency="sequential")
    pipe = one.load()
    assert one.residency.resident() == []  # nothing is opened before it runs
    seen: dict[str, list[list[str]]] = {}
    for name in ("text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.setdefault(name, []).append(one.residency.resident())
        )
    image_seq, result = _image(one)
    np.testing.assert_array_equal(image_seq, image_all)  # bit-identical
    assert seen == {
        "text_encoder": [["text_encoder"]],
        "text_encoder_2": [["text_encoder_2"]],
        "transformer": [["transformer"], ["transformer"]],
    }
    assert one.residency.resident() == ["vae_decoder"]  # the last to run
    loads = [s.component for s in result.swaps if s.action == "load"]
    assert loads == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    releases = [s.component for s in result.swaps if s.action == "release"]
    assert releases == ["text_encoder", "text_encoder_2", "transformer"]
    assert all(s.seconds >= 0 for s in result.swaps)
    # the next generation swaps again and still makes the same image
    image_again, again = _image(one)
    np.testing.assert_array_equal(image_again, image_all)
    assert [s.component for s in again.swaps if s.action == "release"][0] == "vae_decoder"


def test_load_pipeline_sequential_user_call(components: Path) -> None:
    import torch

    from dtcompile.api import load_pipeline

    pipe = load_pipeline(components, "onnxruntime", residency="sequential")
    out = pipe(PROMPT, num_inference_steps=1, height=64, width=64, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)
    assert pipe._dtc_session.residency.resident() == ["vae_decoder"]


def test_cli_run_sequential_reports_swaps(components: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dtcompile.cli import cli

    res = CliRunner().invoke(cli, ["run", str(components), "--prompt", PROMPT, "--steps", "1", "--backend",
                                   "onnxruntime", "--residency", "sequential", "--out", str(tmp_path / "a.png")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "residency sequential: text_encoder load" in res.output
    assert "transformer load" in res.output


def test_bench_reports_swap_times(components: Path) -> None:
    from dtcompile.tools.bench import bench_artifact, format_report

    report = bench_artifact(components, ("onnxruntime",), steps=1, repeat=1, warmup=0, threads=1,
                            residency="sequential")  # fmt: skip
    assert report["settings"]["residency"] == "sequential"
    engine = next(r for r in report["results"] if r["name"] == "onnxruntime")
    assert set(engine["swaps"]) == {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}
    assert engine["swaps"]["transformer"]["loads"] == 1 and engine["swap_median_s"] > 0
    assert "onnxruntime swaps (residency sequential" in format_report(report)


def test_residency_and_budget_errors(components: Path) -> None:
    from dtcompile.runtime.session import Session

    with pytest.raises(UnsupportedError) as e:
        Session(components, "onnxruntime", residency="some")
    assert str(e.value) == "--residency 'some': choose one of: all, sequential"
    with pytest.raises(UnsupportedError) as e:
        Session(components, "onnxruntime", device_memory="16GiB")
    assert str(e.value) == (
        "--device-memory: onnxruntime runs text_encoder, text_encoder_2, transformer, vae_decoder here and has no "
        "device-memory budget or weight streaming; drop the flag or run TensorRT engines (--backend tensorrt-rtx)"
    )
    with pytest.raises(UnsupportedError, match=r"^--device-memory '16 apples': expected a size such as 16GiB"):
        Session(components, "onnxruntime", device_memory="16 apples")


def test_parse_size() -> None:
    from dtcompile.runtime.memory import parse_size

    assert parse_size("16GiB") == 16 * 2**30
    assert parse_size("16G") == 16 * 2**30
    assert parse_size("8000MB") == 8 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(1024) == 1024
    for bad in ("0", "-1GiB", "GiB", "12 parsecs"):
        with pytest.raises(DtcError):
            parse_size(bad)


# --- tiled VAE decode -------------------------------------------------------------------------------------------

TILE = 32  # pixels: the tiny FLUX VAE has factor 2, so 16 latents a tile, stride 12, 8 pixels blended


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    comps = f"components=[transformer, {{name: vae_decoder, tile: {TILE}}}]"
    return build_recipe(tmp_path_factory, "tiny-flux-components.yaml", *ORT_ONLY, comps)


def _diffusers_vae() -> Any:
    import torch
    from diffusers import AutoencoderKL

    from dtcompile.models.builtin import builtin_model_path

    vae = AutoencoderKL.from_pretrained(builtin_model_path("tiny-flux") / "vae", dtype=torch.float32).eval()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = TILE, TILE // 2, 0.25
    return vae


@pytest.mark.parametrize("times", [2, 3])
def test_tiled_decode_through_the_engine_matches_diffusers_tiling(tiled: Path, times: int) -> None:
    import torch

    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import Session

    session = Session(tiled, "onnxruntime")
    entry = session.manifest.component("vae_decoder")
    assert entry.tile == {"layout": "kl", "tile": 16, "stride": 12, "blend": 8, "keep": 24, "factor": 2,
                          "clamp": False}  # fmt: skip
    assert entry.profile is not None and entry.profile["latent"]["max"] == [2, 4, 16, 16]  # built for one tile
    vae = session.load().vae
    latent = torch.randn(1, 4, 16 * times, 16 * times, generator=torch.Generator().manual_seed(times))
    calls = vae.calls
    with torch.inference_mode():
        got = vae.decode(latent).sample
        want = _diffusers_vae().decode(latent).sample
    tiles = len(range(0, 16 * times, 12)) ** 2
    assert vae.calls - calls == tiles  # one engine call per tile: the engine never saw the whole latent
    assert got.shape == want.shape == (1, 3, 32 * times, 32 * times)
    assert rel_l2(got, want) < 1e-3


def test_tiled_artifact_generates_above_its_vae_tile(tiled: Path) -> None:
    from dtcompile.runtime.session import Session

    session = Session(tiled, "onnxruntime")
    result = session.generate(session.request(PROMPT, steps=1, seed=0, height=96, width=128))
    assert result.image.size == (128, 96)


def test_tile_errors(tmp_path: Path) -> None:
    from dtcompile.core.errors import RecipeError
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build
    from tests.fixtures.builds import ROOT

    recipe = ROOT / "recipes" / "tiny-flux-components.yaml"
    with pytest.raises(RecipeError, match=r"components\[0\]\.tile: only vae_decoder decodes in tiles, not transformer"):
        load_recipe(recipe, ["components=[{name: transformer, tile: 32}]"])
    bad = load_recipe(
        recipe, [f"output.dir={tmp_path}", *ORT_ONLY, "components=[transformer, {name: vae_decoder, tile: 36}]"]
    )
    with pytest.raises(UnsupportedError) as e:
        run_build(bad)
    assert str(e.value) == (
        "components: vae_decoder tile 36: tiled decode cannot make tiles of that size; with the VAE's factor 2 a tile "
        "is a multiple of 8 pixels (its 25% overlap whole latents): use 32 or 40"
    )
    assert not any((tmp_path).iterdir())  # nothing half-written


def test_wan_video_vae_tiling_matches_diffusers() -> None:
    """Our loop on AutoencoderKLWan's layout (5-D latents, every frame per tile, crop and clamp) against
    diffusers' own tiled decode; the tile decoder here is the torch VAE's untiled decode (Wan's VAE is not an
    engine component yet)."""
    import torch
    from diffusers import AutoencoderKLWan

    from dtcompile.core.metrics import rel_l2
    from dtcompile.core.tiles import TileSpec
    from dtcompile.models.builtins.wan import TINY_WAN_CONFIG
    from dtcompile.runtime.tiling import tiled_decode

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_WAN_CONFIG["vae"]).eval()
    factor = vae.spatial_compression_ratio
    tile_px, stride_px = 8 * factor, 6 * factor
    latent = torch.randn(1, 16, 2, 14, 16, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's OpenMP stalls on a contended machine (docs/benchmarks.md)
    with torch.inference_mode():
        vae.enable_tiling(tile_px, tile_px, stride_px, stride_px)
        want = vae.decode(latent).sample
        vae.disable_tiling()
        got = tiled_decode(latent, TileSpec.wan(tile_px, stride_px, factor), lambda t: vae.decode(t).sample)
        whole = vae.decode(latent).sample
    torch.set_num_threads(threads)
    assert got.shape == want.shape
    assert rel_l2(got, want) < 1e-3
    assert rel_l2(whole, want) > 1e-3  # tiling changes the result: the check above is not vacuous


# --- weight streaming and the memory plan --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "archs",
    [pytest.param(("sm_89",), id="sm_89"), pytest.param(("sm_89", "sm_120"), id="both", marks=pytest.mark.slow)],
)
def test_streamable_rtx_engines_build_here(tmp_path_factory: pytest.TempPathFactory, archs: tuple[str, ...]) -> None:
    """engine.weight_streaming builds streamable TensorRT-RTX engines without a GPU (sm_89 by default; sm_89 and
    sm_120 with -m slow); the manifest records the flag and the weight bytes."""
    pytest.importorskip("tensorrt_rtx")
    art = build_recipe(tmp_path_factory, "tiny-flux.yaml", "engine.backends=[tensorrt-rtx]",
                       f"engine.targets=[{', '.join(archs)}]", "engine.weight_streaming=true")  # fmt: skip
    from dtcompile.manifest import read_manifest

    streamed = read_manifest(art).component("transformer").engines
    assert sorted(e.arch for e in streamed) == sorted(archs)
    for e in streamed:
        assert e.weight_streaming is True
        assert e.weights_size is not None and 0 < e.weights_size < e.size


def test_weight_streaming_per_component() -> None:
    """A component's own ``weight_streaming`` wins over ``engine.weight_streaming``; the artifact key changes only
    where streaming is asked for."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import Plan
    from tests.fixtures.builds import ROOT

    path = ROOT / "recipes" / "tiny-flux-components.yaml"
    recipe = load_recipe(path, ["engine.weight_streaming=true",
                                "components=[transformer, {name: vae_decoder, weight_streaming: false}]"])  # fmt: skip
    plan = Plan(recipe=recipe, source=None, out_dir=Path("x"), base_dir=None, recipe_path=None)  # type: ignore[arg-type]
    assert plan.settings_for("transformer").weight_streaming is True
    assert plan.settings_for("vae_decoder").weight_streaming is False
    plain = load_recipe(path)
    assert "weight_streaming" not in plain.engine_fields()["engine"]  # earlier artifacts keep their keys
    assert all("tile" not in c and "weight_streaming" not in c for c in plain.engine_fields()["components"])


def _entry(name: str, streams: bool) -> Any:
    from dtcompile.manifest import EngineEntry

    return EngineEntry(backend="tensorrt-rtx", arch="sm_89", file=f"tensorrt-rtx/sm_89/{name}.engine",
                       sha256="0" * 64, size=1, weights_size={"transformer": 800, "text_encoder_2": 300,
                       "vae_decoder": 100}[name] * 2**20, device_memory_size=50 * 2**20,
                       weight_streaming=streams or None)  # fmt: skip


def _plan(components: Path, budget: str | None, residency: str | None = None, streams: tuple[str, ...] = ()) -> Any:
    from dtcompile.manifest import read_manifest
    from dtcompile.runtime.memory import parse_size, plan_memory

    m = read_manifest(components)
    entries = {n: _entry(n, n in streams) for n in ("text_encoder_2", "transformer", "vae_decoder")}
    return plan_memory(
        components, m, entries, residency=residency, budget=None if budget is None else parse_size(budget)
    )


def test_memory_plan_budgets(components: Path) -> None:
    mib = 2**20
    plan = _plan(components, None)
    assert (plan.residency, plan.peak) == ("all", (850 + 350 + 150) * mib)  # weights + recorded workspace
    assert _plan(components, "2GiB").residency == "all"  # everything fits
    seq = _plan(components, "1GiB")
    assert (seq.residency, seq.peak, seq.budgets) == ("sequential", 850 * mib, {})  # one at a time fits
    streamed = _plan(components, "600MiB", streams=("transformer",))
    assert streamed.residency == "sequential"
    assert streamed.budgets == {"transformer": 550 * mib}  # the budget less its workspace
    shared = _plan(components, "1GiB", "all", streams=("transformer",))
    # resident beside it: text_encoder_2 350 MiB and vae_decoder 150 MiB, and its own 50 MiB workspace
    assert shared.budgets == {"transformer": (1024 - 350 - 150 - 50) * mib}
    with pytest.raises(UnsupportedError) as e:
        _plan(components, "600MiB")
    assert str(e.value) == (
        "--device-memory 600.0 MiB: component transformer needs 850.0 MiB resident (weights 800.0 MiB + workspace "
        "50.0 MiB) and its engine cannot stream weights; give a larger budget or rebuild it with "
        "engine.weight_streaming: true"
    )
    with pytest.raises(UnsupportedError, match=r"^--device-memory 400\.0 MiB: with --residency all, 550\.0 MiB cannot "
                       r"stream .* the largest: component text_encoder_2, 350\.0 MiB\)"):  # fmt: skip
        _plan(components, "400MiB", "all", streams=("transformer",))


def test_inspect_memory(components: Path) -> None:
    from click.testing import CliRunner

    from dtcompile.cli import cli

    res = CliRunner().invoke(cli, ["inspect", "--memory", str(components)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["component", "backend", "weights"]
    assert {ln.split()[0] for ln in lines[1:-1]} == {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}
    assert all("estimate" in ln for ln in lines[1:-1])  # onnxruntime records no workspace: estimated
    assert lines[-1].startswith("residency all (every component at once): peak ")
    res = CliRunner().invoke(cli, ["inspect", "--memory", str(components), "--device-memory", "8GiB"])
    assert res.exit_code != 0 and "onnxruntime runs" in str(res.exception)
    res = CliRunner().invoke(cli, ["inspect", str(components), "--device-memory", "8GiB"])
    assert res.exit_code == 2 and "go with --memory" in res.output


# --- on a GPU: a streamed engine at 25%, 50% and 100% of its streamable weights --------------------------------------


@pytest.fixture(scope="module")
def streamed_gpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.gpu import build_for_gpu

    return build_for_gpu("tiny-flux", tmp_path_factory.mktemp("ws-gpu"), "engine.weight_streaming=true")


def _on_gpu(fn: Any) -> Any:
    for mark in requires_trt:  # gpu, and skips naming the reason where CUDA or a TensorRT flavour is absent
        fn = mark(fn)
    return fn


@pytest.mark.parametrize("percent", [25, 50, 100])
@_on_gpu
def test_weight_streaming_budget_on_gpu(streamed_gpu: Path, percent: int, request: pytest.FixtureRequest) -> None:
    """The transformer engine under a budget of ``percent`` of its streamable weights: the same noise predictions
    as at 100% (TensorRT streams, it does not approximate) and the step time, recorded in the test report."""
    import time

    import torch

    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import Session
    from tests.fixtures.gpu import FLAVOUR

    full = Session(streamed_gpu, FLAVOUR)
    full.load()
    streamable = full.module.runner.engine.streamable_weights_size
    assert streamable > 0
    budget = max(1, streamable * percent // 100)
    session = Session(streamed_gpu, FLAVOUR)
    session.residency.budgets["transformer"] = budget
    session.load()
    assert session.module.runner.engine.weight_streaming_budget_v2 == budget
    req = dict(steps=4, seed=0)
    ref = full.generate(full.request(PROMPT, **req), trace=True)
    t0 = time.perf_counter()
    got = session.generate(session.request(PROMPT, **req), trace=True)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / 4
    for a, b in zip(got.trace, ref.trace, strict=True):
        assert rel_l2(a.float(), b.float()) < 1e-3
    request.node.user_properties.append(("step_s", per_step))


@_on_gpu
def test_device_memory_sets_the_streaming_budget_on_gpu(streamed_gpu: Path) -> None:
    """``device_memory`` below what the transformer needs: sequential residency, and the transformer's engine gets
    the plan's budget (its need less half its weights, less its workspace), and still generates."""
    from dtcompile.runtime.memory import plan_memory, planned_entries
    from dtcompile.runtime.session import Session
    from tests.fixtures.gpu import FLAVOUR

    probe = Session(streamed_gpu, FLAVOUR)
    full = plan_memory(streamed_gpu, probe.manifest, planned_entries(probe.manifest, FLAVOUR))
    t = next(c for c in full.components if c.name == "transformer")
    others = max(c.need for c in full.components if c.name != "transformer")
    budget = max(t.need - t.weights // 2, others)
    session = Session(streamed_gpu, FLAVOUR, device_memory=budget)
    assert session.residency.policy == "sequential"
    assert session.residency.budgets == {"transformer": budget - t.workspace}
    seen: list[int] = []
    resident = session.residency.runners["transformer"]
    session.load().transformer.register_forward_hook(
        lambda *_: seen.append(resident.runner.engine.weight_streaming_budget_v2)
    )
    result = session.generate(session.request(PROMPT, steps=2, seed=0))
    assert result.image.size[0] > 0
    assert seen == [budget - t.workspace] * 2  # while the transformer ran, under the plan's budget


def test_serve_options_carry_residency(components: Path) -> None:
    from dtcompile.serve.models import ServedModel, ServeOptions

    model = ServedModel.open(components, ServeOptions(backend="onnxruntime", residency="sequential"))
    assert model.session.residency.policy == "sequential"
    with pytest.raises(UnsupportedError, match="^--device-memory: onnxruntime runs"):
        ServedModel.open(components, ServeOptions(backend="onnxruntime", device_memory="8GiB"))
