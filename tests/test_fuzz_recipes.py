"""Property-based fuzzing of recipes and ``--set`` overrides (issue 12): bounded and seeded in the default suite.

Properties, for any recipe text and any overrides:
- ``load_recipe`` returns a ``Recipe`` or raises ``RecipeError``; never another exception (a traceback in the CLI);
- the message is one line and names the recipe file (with the field) or the ``--set`` item;
- a recipe that loads round-trips: its own dump loads to the same recipe.

``DTC_FUZZ_EXAMPLES`` raises the example count for a long run (docs/reliability.md reports one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dtcompile.core.errors import RecipeError  # noqa: E402
from dtcompile.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = (ROOT / "recipes" / "tiny-flux.yaml").read_text()
EXAMPLES = int(os.environ.get("DTC_FUZZ_EXAMPLES", "200"))

KEYS = [
    "name", "dtype", "model.source", "model.revision", "export.opset", "export.attention",
    "export.shapes.batch", "export.shapes.height", "export.shapes.height.min", "export.shapes.width.max",
    "export.shapes.text_len", "engine.backends", "engine.targets", "engine.opt_level", "engine.refittable",
    "output.dir", "output.include_pipeline", "quant", "quant.format", "quant.calib.steps", "quant.calib.prompts",
    "quant.rank", "quant.exclude", "cache", "cache.mode", "cache.threshold", "cache.groups", "lora",
    "lora[0].scale", "nope", "engine.nope", "export.shapes.frames",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["fp8", "int8", "nvfp4", "svdquant", "sm_89", "sm_90", "onnxruntime", "tensorrt", "auto",
                     "float16", "static", "first_block", "builtin:tiny-flux", "../x", "/etc", "1e400"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["min", "opt", "max", "name", "x"]), inner, max_size=3),
    ),
    max_leaves=6,
)


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


override = st.one_of(
    st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"{kv[0]}={_yaml(kv[1])}"),
    st.text(max_size=30),  # anything at all, '=' or not
)


@st.composite
def recipe_text(draw) -> bytes:
    """The tiny recipe with a few lines deleted, duplicated or replaced by junk (text or raw bytes)."""
    lines = BASE.encode().splitlines(keepends=True)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "junk", "bytes", "indent"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "junk":
            lines[i] = draw(st.text(max_size=20)).encode("utf-8", "surrogatepass") + b"\n"
        elif op == "bytes":
            lines[i] = draw(st.binary(max_size=8)) + b"\n"
        else:
            lines[i] = b"  " + lines[i]
        if not lines:
            break
    return b"".join(lines)


def _check_message(exc: RecipeError, path: Path, overrides: list[str]) -> None:
    msg = str(exc)
    assert "\n" not in msg, msg
    assert (
        msg.startswith(str(path))
        or any(f"'{o}'" in msg or o.partition("=")[0].strip() in msg for o in overrides)
        or "--set" in msg
    ), msg


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(text=recipe_text(), overrides=st.lists(override, max_size=3))
def test_recipes_and_overrides_load_or_fail_in_one_line(tmp_path: Path, text: bytes, overrides: list[str]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text)
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as exc:
        _check_message(exc, path, overrides)
        event("refused in one line")
        return
    event("loaded")
    # what loads must be a valid recipe: its own dump loads back to the same recipe
    import yaml

    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True)))
    assert load_recipe(again) == recipe
