"""Recipe validation: errors name file, line, dotted field, the value and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtcompile.core.errors import RecipeError
from dtcompile.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
name: t
model:
  source: builtin:tiny-flux
dtype: float32
export:
  shapes:
    height: {min: 32, opt: 64, max: 64}
engine:
  backends: [onnxruntime, tensorrt-rtx]
  targets:
    - sm_89
    - sm_120
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, overrides)
    return str(exc.value)


def test_shipped_recipes_validate() -> None:
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.name


def test_base_recipe_and_defaults(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, BASE))
    assert r.engine.targets == ["sm_89", "sm_120"]
    assert r.export.shapes.height.opt == 64
    assert r.export.opset == 19  # default from the schema
    assert r.export.shapes.text_len.min == 512
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        r.name = "x"  # frozen


def test_unknown_arch_names_line_field_and_choices(tmp_path: Path) -> None:
    p = write(tmp_path, BASE.replace("- sm_120", "- sm_91"))
    msg = error(p)
    assert msg.startswith(f"{p}:12 engine.targets[1]: 'sm_91' is not a known arch; choose one of: sm_75")


def test_unknown_key(tmp_path: Path) -> None:
    p = write(tmp_path, BASE.replace("dtype: float32", "dtype: float32\nprecison: fp8"))
    assert error(p) == f"{p}:5 precison: unknown key; check the spelling against the recipe schema (docs/recipes.md)"


def test_wrong_type(tmp_path: Path) -> None:
    p = write(tmp_path, BASE.replace("{min: 32, opt: 64, max: 64}", "{min: 32, opt: big, max: 64}"))
    msg = error(p)
    assert msg.startswith(f"{p}:7 export.shapes.height.opt: 'big'")
    assert "integer" in msg


def test_range_order_and_static_int(tmp_path: Path) -> None:
    p = write(tmp_path, BASE.replace("{min: 32, opt: 64, max: 64}", "{min: 64, opt: 32, max: 64}"))
    assert "need min <= opt <= max, got 64/32/64" in error(p)
    r = load_recipe(write(tmp_path, BASE.replace("{min: 32, opt: 64, max: 64}", "48")))
    assert (r.export.shapes.height.min, r.export.shapes.height.max) == (48, 48)


def test_arch_not_built_by_backend(tmp_path: Path) -> None:
    p = write(tmp_path, BASE.replace("- sm_120", "- sm_90"))
    assert (
        "engine.targets[1]: 'sm_90' is not an arch tensorrt-rtx builds for; choose one of: sm_75, sm_80, sm_86"
        in error(p)
    )


def test_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, BASE)
    r = load_recipe(p, ("export.opset=20", "engine.targets=[sm_89]"))
    assert r.export.opset == 20 and r.engine.targets == ["sm_89"]
    assert error(p, ("export.opset=3",)).startswith("--set export.opset: 3: ")
    assert error(p, ("nonsense",)) == "--set 'nonsense': expected KEY=VALUE, e.g. export.opset=19"


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    p = write(tmp_path, "name: [unclosed\n")
    assert error(p).startswith(f"{p}:")
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: recipe file not found"
    assert "required field is missing" in error(write(tmp_path, "name: x\n"))
