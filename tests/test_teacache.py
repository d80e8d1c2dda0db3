"""TeaCache (cache mode ``teacache``): the recipe rules, the decision replayed from the reported changes, threshold
0 equal to the uncached run, per guidance branch and per expert, and ``dtc cache fit``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError
from tests.fixtures.builds import ORT_ONLY, build_recipe

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def flux_tea(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-flux-teacache.yaml", *ORT_ONLY)


@pytest.fixture(scope="module")
def wan21_tea(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-wan21-teacache.yaml", *ORT_ONLY)


@pytest.fixture(scope="module")
def wan22_tea(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(
        tmp_path_factory,
        "tiny-wan22.yaml",
        *ORT_ONLY,
        "name=tiny-wan22-teacache",
        "cache={mode: teacache, threshold: 0.2}",
    )


def _replay(stats: dict[str, Any], steps: int, contexts: int = 1) -> list[int]:
    """The calls TeaCache's rule skips, recomputed from the reported signal changes (per branch: calls alternate
    between ``contexts`` guidance branches), the coefficients and the threshold."""
    from dtcompile.runtime.cache import rescale

    skipped, acc = [], [0.0] * contexts
    for call, change in enumerate(stats["rel_change"]):
        step, branch = divmod(call, contexts)
        if change is None or step < stats["retention"] or step == steps - 1:
            acc[branch] = 0.0
            continue
        acc[branch] += max(rescale(stats["coefficients"], change), 0.0)
        if acc[branch] < stats["threshold"]:
            skipped.append(call)
        else:
            acc[branch] = 0.0
    return skipped


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"mode": "teacache"}, "mode teacache needs threshold"),
        (
            {"mode": "teacache", "threshold": 0.2, "max_consecutive_skips": 2},
            "max_consecutive_skips applies to mode first_block only",
        ),  # fmt: skip
        ({"mode": "first_block", "threshold": 0.2, "retention": 2}, "retention applies to mode teacache only"),
        ({"mode": "teacache", "threshold": 0.2, "coefficients": [1.0, float("nan")]}, "every coefficient must be a"),
        ({"mode": "teacache", "threshold": -1}, "greater than or equal to 0"),
        (
            {"mode": "static", "steps": 4, "threshold": 0.2, "groups": [{"name": "a", "blocks": "x", "every": 2}]},
            "threshold applies to mode first_block or teacache only",
        ),  # fmt: skip
    ],
)
def test_recipe_rules(cache: dict[str, Any], message: str) -> None:
    from dtcompile.recipe import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "recipes" / "tiny-flux.yaml", [f"cache={cache}".replace("nan", ".nan")])


def test_families_without_a_signal_are_refused_in_the_dry_run() -> None:
    from dtcompile.models.sd3 import SD3Adapter

    with pytest.raises(UnsupportedError, match="cache.mode: teacache has no signal for StableDiffusion3Pipeline"):
        SD3Adapter().cache_layout("teacache")


def test_fit_recovers_the_published_flux_polynomial() -> None:
    """``dtc cache fit``'s fitter on points the published FLUX.1 polynomial gives over the changes TeaCache sees
    (0.05..0.6): it predicts the same values (FLUX.1-dev itself cannot be run here; docs/cache.md)."""
    import numpy as np

    from dtcompile.models.flux import TEACACHE_FLUX1
    from dtcompile.runtime.cache import rescale
    from dtcompile.tools.cache_fit import fit_polynomial

    xs = np.linspace(0.05, 0.6, 40)
    points = [(float(x), rescale(TEACACHE_FLUX1, float(x))) for x in xs]
    coefficients, rms = fit_polynomial(points)
    assert rms < 1e-9
    for x in np.linspace(0.05, 0.6, 97):
        assert abs(rescale(coefficients, float(x)) - rescale(TEACACHE_FLUX1, float(x))) < 1e-8
    np.testing.assert_allclose(coefficients, TEACACHE_FLUX1, rtol=1e-6)
    with pytest.raises(UnsupportedError, match="cannot determine a degree-4 polynomial"):
        fit_polynomial(points[:4])


def test_flux_threshold_zero_equals_the_monolithic_artifact_every_step(flux_tea: Path, tiny_artifact: Path) -> None:
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import run_artifact

    kw = {"steps": 8, "seed": 2, "backend": "onnxruntime", "trace": True}
    mono = run_artifact(tiny_artifact, PROMPT, **kw)
    zero = run_artifact(flux_tea, PROMPT, cache_threshold=0.0, **kw)
    assert zero.cache_stats is not None and zero.cache_stats["blocks_skipped"] == 0
    for step, (got, ref) in enumerate(zip(zero.trace, mono.trace, strict=True)):
        assert rel_l2(got, ref) <= 1e-6, f"step {step}"


def test_flux_threshold_skips_the_calls_the_rule_names(flux_tea: Path) -> None:
    import numpy as np

    from dtcompile.core.metrics import psnr
    from dtcompile.runtime.session import run_artifact

    kw = {"steps": 8, "seed": 2, "backend": "onnxruntime", "trace": True}
    off = run_artifact(flux_tea, PROMPT, cache=False, **kw)
    on = run_artifact(flux_tea, PROMPT, **kw)  # the recipe's threshold 0.6 and TeaCache's FLUX.1 polynomial
    stats = on.cache_stats
    assert stats is not None and stats["mode"] == "teacache" and stats["threshold"] == 0.6
    assert stats["cached_calls"] == _replay(stats, 8) and stats["cached_calls"]
    assert 0 not in stats["cached_calls"] and 7 not in stats["cached_calls"]  # retention and the last step
    assert stats["blocks_skipped"] == 4 * len(stats["cached_calls"])
    quality = psnr(np.asarray(on.image, dtype=np.float64), np.asarray(off.image, dtype=np.float64), peak=255.0)
    assert quality > 20.0, quality  # the skipped calls reuse a residual: close, not equal


def test_dtc_cache_fit_stores_a_polynomial_the_next_run_uses(flux_tea: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dtcompile.cli import cli
    from dtcompile.manifest import read_manifest
    from dtcompile.runtime.session import run_artifact

    artifact = tmp_path / "tiny-flux-teacache"
    shutil.copytree(flux_tea, artifact)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n# a comment\n\na blue car\na green tree\n")
    r = CliRunner().invoke(cli, ["cache", "fit", str(artifact), "--prompts", str(prompts), "--steps", "6",
                                 "--backend", "onnxruntime"])  # fmt: skip
    assert r.exit_code == 0, r.output
    record = read_manifest(artifact).component("transformer").cache["teacache"]
    assert record["source"].startswith("fitted: dtc cache fit, 3 prompt(s) x 6 steps, 15 calls")
    assert len(record["coefficients"]) == 5 and record["fit"]["points"] == 15
    stats = run_artifact(artifact, PROMPT, steps=8, backend="onnxruntime").cache_stats
    assert stats is not None and stats["coefficients"] == record["coefficients"]
    assert stats["cached_calls"] == _replay(stats, 8)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    r = CliRunner().invoke(cli, ["cache", "fit", str(artifact), "--prompts", str(empty)])
    assert r.exit_code != 0 and "no prompt in it" in str(r.exception or r.output)


def test_cache_fit_refuses_an_artifact_of_another_mode(tiny_artifact: Path) -> None:
    from dtcompile.tools.cache_fit import fit_artifact

    with pytest.raises(UnsupportedError, match="dtc cache fit needs a teacache artifact"):
        fit_artifact(tiny_artifact, ["a fox"], backend="onnxruntime")


def test_cache_threshold_is_refused_where_nothing_reads_it(tiny_artifact: Path) -> None:
    from dtcompile.runtime.session import run_artifact

    with pytest.raises(UnsupportedError, match="--cache-threshold: .* has no threshold to set"):
        run_artifact(tiny_artifact, PROMPT, cache_threshold=0.1, backend="onnxruntime")


WAN = {"steps": 6, "seed": 3, "frames": 9, "height": 48, "width": 64, "guidance": 5.0, "negative_prompt": "blurry",
       "backend": "onnxruntime", "trace": True}  # fmt: skip


def test_wan21_per_branch_zero_threshold_equal_and_skips_replayed(wan21_tea: Path) -> None:
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import run_artifact

    off = run_artifact(wan21_tea, PROMPT, cache=False, **WAN)
    zero = run_artifact(wan21_tea, PROMPT, cache_threshold=0.0, **WAN)
    assert len(zero.trace) == len(off.trace) == 12  # 6 steps x (cond, uncond)
    for call, (got, ref) in enumerate(zip(zero.trace, off.trace, strict=True)):
        assert rel_l2(got, ref) <= 1e-6, f"call {call}"
    on = run_artifact(wan21_tea, PROMPT, cache_threshold=500.0, **WAN)
    stats = on.cache_stats
    assert stats is not None and stats["cached_calls"] == _replay(stats, 6, contexts=2) and stats["cached_calls"]


def test_wan22_each_expert_keeps_its_state_and_starts_fresh(wan22_tea: Path) -> None:
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.session import run_artifact

    off = run_artifact(wan22_tea, PROMPT, cache=False, **WAN)
    zero = run_artifact(wan22_tea, PROMPT, cache_threshold=0.0, **WAN)
    for call, (got, ref) in enumerate(zip(zero.trace, off.trace, strict=True)):
        assert rel_l2(got, ref) <= 1e-6, f"call {call}"
    on = run_artifact(wan22_tea, PROMPT, cache_threshold=500.0, **WAN)
    stats = on.cache_stats
    assert stats is not None
    experts = stats["experts"]
    assert set(experts) == {"transformer", "transformer_2"}
    # tiny-wan22's boundary: the high-noise expert takes steps 0-1 (calls 0-3), the low-noise one steps 2-5
    assert experts["transformer"]["calls"] == [0, 1, 2, 3] and experts["transformer_2"]["calls"] == list(range(4, 12))
    assert 4 not in stats["cached_calls"] and 5 not in stats["cached_calls"]  # the second expert's first calls
    assert stats["rel_change"][4] is None and stats["rel_change"][5] is None  # no signal of its own yet
    assert set(stats["cached_calls"]) & set(range(6, 10))  # it skips once it has a state
