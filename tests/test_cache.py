"""Cache diffusion: the ``cache:`` section, block engines, the stitched runtime and its skip counts.

Two real tiny artifacts are built once per module: recipes/tiny-flux-cache.yaml (static caching; onnxruntime and a
TensorRT-RTX sm_89 engine per part) and a first_block variant (onnxruntime only). The runtime's residual arithmetic
is checked exactly with fake part runners.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.manifest import all_file_entries, read_manifest, verify_file
from dtcompile.recipe.cache import CacheSpec, Segment, plan_segments, stats_line

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-flux-cache.yaml"
PROMPT = "a red fox in the snow"
TINY_BLOCKS = [
    "transformer_blocks.0",
    "transformer_blocks.1",
    "single_transformer_blocks.0",
    "single_transformer_blocks.1",
]


def dtc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtcompile", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def static_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("cache-engines")
    recipe = load_recipe(RECIPE, [f"output.dir={out}", "engine.targets=[sm_89]"])
    return run_build(recipe).artifact_dir


@pytest.fixture(scope="module")
def first_block_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("fb-engines")
    overrides = [
        f"output.dir={out}",
        "engine.backends=[onnxruntime]",
        "engine.targets=[]",
        "cache={mode: first_block, threshold: 0.2, max_consecutive_skips: 2}",
    ]
    return run_build(load_recipe(RECIPE, overrides)).artifact_dir


# --- the cache section and step rules (no model) ----------------------------------------------------------------


def static(groups: list[dict[str, Any]], steps: int = 8) -> CacheSpec:
    return CacheSpec.model_validate({"mode": "static", "steps": steps, "groups": groups})


def test_step_rules() -> None:
    spec = static(
        [
            {"name": "a", "blocks": "transformer_blocks.1", "every": 3},
            {"name": "b", "blocks": ["single_transformer_blocks.0"], "start": 2, "end": 5},
            {"name": "c", "blocks": ["single_transformer_blocks.1"], "steps": [6, 2]},
            {"name": "d", "blocks": ["transformer_blocks.0"], "every": 2, "start": 3, "end": 7},
        ]
    )
    g = {x.name: x for x in spec.groups or []}
    assert g["a"].cached_steps(8) == [1, 2, 4, 5, 7]  # computed on 0, 3, 6
    assert g["b"].cached_steps(8) == [2, 3, 4]  # a range: every step of it
    assert g["c"].cached_steps(8) == [2, 6]
    assert g["d"].cached_steps(8) == [3, 5]
    segments = plan_segments(spec, TINY_BLOCKS)
    assert [(s.blocks, s.group) for s in segments] == [((b,), n) for b, n in zip(TINY_BLOCKS, "dabc", strict=True)]
    assert spec.predicted_skips(segments, 8) == 5 + 3 + 2 + 2


def test_segments_merge_consecutive_blocks_of_a_group() -> None:
    spec = static([{"name": "s", "blocks": ["single_transformer_blocks.*"], "every": 2}])
    assert plan_segments(spec, TINY_BLOCKS) == [
        Segment(0, ("transformer_blocks.0", "transformer_blocks.1"), None),
        Segment(1, ("single_transformer_blocks.0", "single_transformer_blocks.1"), "s"),
    ]
    fb = CacheSpec.model_validate({"mode": "first_block", "threshold": 0.1})
    assert fb.max_consecutive_skips == 2
    assert [s.blocks for s in plan_segments(fb, TINY_BLOCKS)] == [tuple(TINY_BLOCKS[:1]), tuple(TINY_BLOCKS[1:])]


def test_block_in_two_groups_and_short_runs_are_refused() -> None:
    spec = static(
        [{"name": "a", "blocks": ["*blocks.1"], "every": 2}, {"name": "b", "blocks": ["single*"], "every": 2}]
    )
    with pytest.raises(RecipeError, match=r"cache.groups\[1\].blocks\[0\]: block single_transformer_blocks.1 is"):
        plan_segments(spec, TINY_BLOCKS)
    spec = static([{"name": "a", "blocks": ["single*"], "steps": [5]}], steps=8)
    spec.check_run_steps(6)
    with pytest.raises(UnsupportedError, match=r"names step 5 but this run has 4 steps \(0..3\); run with --steps 8"):
        spec.check_run_steps(4)


# Bad configs fail in --dry-run with one line (before any weights load).
BAD = {
    "pattern matches nothing": (
        "cache.groups=[{name: x, blocks: [single_blocks.*], every: 2}]",
        "error: cache.groups[0].blocks[0]: pattern 'single_blocks.*' matches no block of the transformer (it has "
        "transformer_blocks.0-1, single_transformer_blocks.0-1); patterns are globs on block names, e.g. "
        "'single_transformer_blocks.*'",
    ),
    "step outside the schedule": (
        "cache.groups=[{name: x, blocks: [single*], steps: [1, 4]}]",
        "error: --set cache.groups[0]: step 4 of group 'x' (steps [1, 4]) is outside the schedule of 4 steps (0..3); "
        "use steps below 4 or raise cache.steps",
    ),
    "negative threshold": (
        "cache={mode: first_block, threshold: -0.1}",
        "error: --set cache.threshold: -0.1: Input should be greater than or equal to 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_cache_config_fails_dry_run_with_one_line(case: str) -> None:
    override, expected = BAD[case]
    r = dtc("build", "--recipe", str(RECIPE), "--set", override, "--dry-run")
    assert r.returncode == 2
    assert r.stderr.strip() == expected
    assert "dry run: OK" not in r.stdout


def test_dry_run_shows_segments() -> None:
    r = dtc("build", "--recipe", str(RECIPE), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert (
        "segment 1: single_transformer_blocks.0-1  group singles: every 2 from step 1 -> cached on [1, 3]" in r.stdout
    )


# --- the runtime's arithmetic, exactly, with fake parts -----------------------------------------------------------


def fake_module(
    spec: CacheSpec, segments: list[Segment], log: list[str], *, name: str = "transformer", scale: float = 2,
    run: Any = None,
) -> Any:  # fmt: skip
    """A CachedEngineModule whose parts are simple torch functions; ``log`` records which parts ran. Its blocks
    compute ``hidden * scale + temb`` (another ``scale`` for another expert ``name`` sharing ``run``)."""
    import torch

    from dtcompile.runtime.cache import CachedEngineModule

    def prologue(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        log.append("prologue")
        h = f["hidden_states"]
        return {"hidden": h, "context": -h, "temb": f["timestep"], "rope_cos": h, "rope_sin": h}

    def block(i: int) -> Any:
        def run(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            log.append(f"blocks{i}")
            # output depends on the step (temb) so a reused residual is distinguishable from a fresh one
            return {"hidden_out": f["hidden"] * scale + f["temb"], "context_out": f["context"] + i}

        return run

    def epilogue(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        log.append("epi")
        return {"latent": f["hidden"] + 0}

    runners = {"pro": prologue, "epi": epilogue}
    runners.update({f"blocks{s.index}": block(s.index) for s in segments})
    parts = [
        ("pro", "prologue", None),
        *[(f"blocks{s.index}", "blocks", s) for s in segments],
        ("epi", "epilogue", None),
    ]
    return CachedEngineModule(
        runners,
        parts,
        spec,
        {},
        ["hidden_states", "timestep"],
        "latent",
        torch.float32,
        streams=("hidden", "context"),
        shared=("temb", "rope_cos", "rope_sin"),
        epilogue_inputs=("hidden", "temb"),
        name=name,
        run=run,
    )


def call(module: Any, x: float, t: float) -> float:
    import torch

    out = module(hidden_states=torch.tensor([x]), timestep=torch.tensor([t]), return_dict=False)[0]
    return float(out[0])


def test_static_runtime_adds_the_stored_residual() -> None:
    spec = static([{"name": "g", "blocks": ["single*"], "every": 2}], steps=4)
    segments = plan_segments(spec, TINY_BLOCKS)
    log: list[str] = []
    m = fake_module(spec, segments, log)
    m.begin_run(4)
    # step 0 computes both segments: x=1, t=10 -> seg0: 2*1+10=12 -> seg1: 2*12+10=34 (residual 22)
    assert call(m, 1.0, 10.0) == 34.0
    # step 1 is cached for seg1: x=2, t=5 -> seg0: 9 -> 9 + 22 (seg1 does not run)
    log.clear()
    assert call(m, 2.0, 5.0) == (2 * 2 + 5) + 22
    assert log == ["prologue", "blocks0", "epi"]
    log.clear()
    assert call(m, 3.0, 4.0) == 2 * (2 * 3 + 4) + 4  # step 2 computes everything again
    assert log == ["prologue", "blocks0", "blocks1", "epi"]
    assert call(m, 1.0, 3.0) == (2 * 1 + 3) + (2 * (2 * 3 + 4) + 4 - (2 * 3 + 4))  # step 3 reuses step 2's residual
    stats = m.cache_stats()
    assert stats["blocks_skipped"] == spec.predicted_skips(segments, 4) == 4
    assert stats["blocks_evaluated"] == 12 and stats["cached_calls"] == [1, 3]
    # A second run (same length) starts from step 0 again; contexts keep separate caches.
    m.begin_run(4)
    with m.cache_context("cond"):
        call(m, 1.0, 10.0)
    with m.cache_context("uncond"):
        call(m, 1.0, 10.0)
    assert m.cache_stats()["blocks_skipped"] == 0
    # --cache off: the same module runs every block.
    m.enabled = False
    m.begin_run(4)
    for t in (4.0, 3.0, 2.0, 1.0):
        call(m, 1.0, t)
    assert m.cache_stats()["blocks_skipped"] == 0 and m.cache_stats()["mode"] == "off"


def test_without_begin_run_a_rising_timestep_starts_a_new_run() -> None:
    spec = static([{"name": "g", "blocks": ["single*"], "every": 2}], steps=4)
    m = fake_module(spec, plan_segments(spec, TINY_BLOCKS), [])
    for t in (1.0, 0.75, 0.5, 0.25, 1.0, 0.75):  # two runs of a falling (flow-matching) schedule
        call(m, 1.0, t)
    assert m.cache_stats()["cached_calls"] == [1, 3, 5]  # the 5th call is step 0 of the second run


def test_two_experts_share_the_steps_but_never_each_others_residuals() -> None:
    """Wan2.2's experts: static rules count the pipeline's steps across both; each expert keeps its own residuals,
    so its first call after a switch (either way) computes every block, and the report counts per expert."""
    from dtcompile.runtime.cache import CacheRun

    spec = static([{"name": "g", "blocks": ["single*"], "start": 1}], steps=5)  # cached on every step from 1
    segments = plan_segments(spec, TINY_BLOCKS)
    run, log = CacheRun(), []
    high = fake_module(spec, segments, log, run=run)
    low = fake_module(spec, segments, log, name="transformer_2", scale=3, run=run)
    high.begin_run(5)  # one begin for both experts
    outs = []
    for expert, x, t in ((high, 1, 10), (high, 2, 5), (low, 3, 4), (low, 1, 3), (high, 2, 2)):
        with expert.cache_context("cond"):
            outs.append(call(expert, x, t))
    # step 2: the low-noise expert's first call computes both segments (3*3+4=13 -> 3*13+4=43), although the
    # rule caches step 2 and the high-noise expert has a residual
    assert outs[2] == 43.0
    # step 3 reuses the low-noise expert's own residual from step 2 (43 - 13 = 30)
    assert outs[3] == (3 * 1 + 3) + 30
    # step 4: back to the high-noise expert, whose step-1 residual is not reused either: 2*(2*2+2)+2
    assert outs[4] == 2 * (2 * 2 + 2) + 2
    stats = high.cache_stats()
    assert stats["skipped_per_call"] == [0, 2, 0, 2, 0] and stats["cached_calls"] == [1, 3]
    assert stats["blocks_skipped"] == spec.predicted_skips(segments, 5, fresh=(2, 4)) == 4
    assert stats["experts"]["transformer"] == {
        "calls": [0, 1, 4], "steps": [0, 1, 4], "blocks_evaluated": 10, "blocks_skipped": 2,
        "skipped_fraction": 2 / 12, "skipped_per_call": [0, 2, 0], "cached_calls": [1],
    }  # fmt: skip
    assert stats["experts"]["transformer_2"]["steps"] == [2, 3]
    assert low.cache_stats() == stats  # either expert reports the whole run
    assert high.calls == 3 and low.calls == 2
    assert stats_line(stats).splitlines()[1:] == [
        "  transformer (steps [0, 1, 4], 3 calls): 2 of 12 block evaluations skipped; cached calls [1]",
        "  transformer_2 (steps 2-3, 2 calls): 2 of 8 block evaluations skipped; cached calls [3]",
    ]
    with pytest.raises(ValueError, match="'transformer_2' is already part of this cache run"):
        fake_module(spec, segments, log, name="transformer_2", run=run)


def test_first_block_runtime_skips_below_threshold_with_a_cap() -> None:
    spec = CacheSpec.model_validate({"mode": "first_block", "threshold": 0.5, "max_consecutive_skips": 2})
    m = fake_module(spec, plan_segments(spec, TINY_BLOCKS), [])
    m.begin_run(6)
    # first-block residual = x + t: 11, 11.5, 11.5, 12, 30, 29, compared with the last full step's
    outs = [call(m, x, t) for x, t in ((1, 10), (1.5, 10), (1.5, 10), (2, 10), (20, 10), (19, 10))]
    stats = m.cache_stats()
    assert stats["cached_calls"] == [1, 2, 5]  # call 3: cap of 2 reached; call 4: change 1.5 > 0.5
    assert stats["blocks_skipped"] == 3 * 3 and stats["threshold"] == 0.5
    assert stats["rel_change"][0] is None and stats["rel_change"][4] == pytest.approx(abs(30 - 12) / 12)
    # call 1 reuses call 0's residual of the rest: (2*1.5+10) + (out0 - (2*1+10))
    assert outs[1] == (2 * 1.5 + 10) + (outs[0] - (2 * 1 + 10))


# --- real artifacts --------------------------------------------------------------------------------------------


def test_manifest_lists_every_part(static_artifact: Path) -> None:
    m = read_manifest(static_artifact).to_json()
    main = m["components"]["transformer"]
    assert main["parts"] == [f"transformer.{p}" for p in ("prologue", "blocks0", "blocks1", "epilogue")]
    assert main["engines"] == [] and main["parity"]["rel_l2"] < 1e-5 and main["parity"]["split_rel_l2"] < 1e-6
    assert [s["group"] for s in main["cache"]["segments"]] == [None, "singles"]
    io = {}
    for name in main["parts"]:
        part = m["components"][name]
        io[name] = ([t["name"] for t in part["inputs"]], [t["name"] for t in part["outputs"]])
        assert part["part_of"] == "transformer" and part["parity"]["rel_l2"] < 1e-5
        assert {(e["backend"], e["arch"]) for e in part["engines"]} == {
            ("onnxruntime", "any"),
            ("tensorrt-rtx", "sm_89"),
        }
    assert io["transformer.blocks1"] == (
        ["hidden", "context", "temb", "rope_cos", "rope_sin"],
        ["hidden_out", "context_out"],
    )
    assert io["transformer.epilogue"] == (["hidden", "temb"], ["latent"])
    assert m["components"]["transformer.blocks1"]["blocks"] == [
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    # every file on disk is listed (so publish/pull carry it) and verifies
    listed = {e["file"] for e in all_file_entries(m)}
    on_disk = {p.relative_to(static_artifact).as_posix() for p in static_artifact.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    for entry in all_file_entries(m):
        verify_file(static_artifact, entry)


@pytest.mark.parametrize("height,width", [(64, 64), (32, 96)])
def test_cache_off_matches_the_monolithic_artifact_every_step(
    static_artifact: Path, tiny_artifact: Path, height: int, width: int
) -> None:
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import run_artifact

    kw = {"steps": 4, "seed": 3, "height": height, "width": width, "backend": "onnxruntime", "trace": True}
    mono = run_artifact(tiny_artifact, PROMPT, **kw)
    off = run_artifact(static_artifact, PROMPT, cache=False, **kw)
    assert len(off.trace) == len(mono.trace) == 4
    for step, (got, ref) in enumerate(zip(off.trace, mono.trace, strict=True)):
        assert rel_l2(got, ref) <= 1e-4, f"step {step}"
    assert off.cache_stats is not None and off.cache_stats["blocks_skipped"] == 0
    assert off.cache_stats["blocks_evaluated"] == 4 * 4
    assert (
        stats_line(off.cache_stats)
        == "cache off: 16 of 16 block evaluations run, 0 skipped (0.0%) over 4 transformer calls"
    )

    on = run_artifact(static_artifact, PROMPT, **kw)
    # the rule (singles: every 2) caches steps 1 and 3: 2 blocks each
    assert on.cache_stats is not None
    assert (on.cache_stats["blocks_skipped"], on.cache_stats["blocks_evaluated"]) == (4, 12)
    assert on.cache_stats["cached_calls"] == [1, 3]
    assert rel_l2(on.trace[0], off.trace[0]) == 0.0  # nothing cached yet
    assert rel_l2(on.trace[1], off.trace[1]) > 1e-6  # a cached step really reused the residual


def test_dtc_run_reports_the_skips(static_artifact: Path, tmp_path: Path) -> None:
    r = dtc("run", str(static_artifact), "--prompt", PROMPT, "--steps", "6", "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert (
        "cache static: 18 of 24 block evaluations run, 6 skipped (25.0%) over 6 transformer calls; "
        "cached calls [1, 3, 5]" in r.stdout
    )


def test_first_block_artifact_reports_threshold_and_skips(first_block_artifact: Path) -> None:
    from dtcompile.runtime.session import run_artifact

    res = run_artifact(first_block_artifact, PROMPT, steps=8, backend="onnxruntime")
    stats = res.cache_stats
    assert stats is not None and stats["mode"] == "first_block" and stats["threshold"] == 0.2
    changes = stats["rel_change"]
    assert len(changes) == 8 and changes[0] is None
    # replay the decision rule on the reported changes: skip below the threshold, at most 2 in a row
    expected, run = [], 0
    for i, c in enumerate(changes):
        if c is not None and c < 0.2 and run < 2:
            expected.append(i)
            run += 1
        elif i:
            run = 0
    assert stats["cached_calls"] == expected
    assert stats["blocks_skipped"] == 3 * len(expected) and stats["blocks_evaluated"] == 4 * 8 - 3 * len(expected)


def test_publish_and_pull_carry_the_parts(static_artifact: Path, tmp_path: Path) -> None:
    from dtcompile.runtime.session import run_artifact
    from dtcompile.tools.publish import publish_artifact, pull_artifact

    publish_artifact(static_artifact, str(tmp_path / "pub"))
    out = tmp_path / "pulled"
    pull_artifact(str(tmp_path / "pub" / "tiny-flux-cache"), out, arch="sm_89")
    m = read_manifest(out).to_json()
    for entry in all_file_entries(m):
        verify_file(out, entry)
    assert {e["arch"] for p in m["components"]["transformer"]["parts"] for e in m["components"][p]["engines"]} == {
        "any",
        "sm_89",
    }
    res = run_artifact(out, PROMPT, steps=2, backend="onnxruntime")
    assert res.cache_stats is not None and res.cache_stats["blocks_skipped"] == 2


def test_cache_on_for_a_monolithic_artifact_is_refused(tiny_artifact: Path) -> None:
    from dtcompile.runtime.session import run_artifact

    with pytest.raises(UnsupportedError) as err:
        run_artifact(tiny_artifact, PROMPT, cache=True, backend="onnxruntime")
    assert str(err.value) == (
        f"--cache on: {tiny_artifact} has no block engines (its recipe has no cache section); use --cache off"
    )
