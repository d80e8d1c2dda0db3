"""The structure holds: the import-layer contract, the complexity bound, and the generated recipe reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_import_layers_hold() -> None:
    exe = BIN / "lint-imports"
    if not exe.exists():
        exe = shutil.which("lint-imports")
    assert exe, "import-linter is not installed (it is in the dev extra: pip install -e '.[dev]')"
    r = subprocess.run([str(exe), "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_complexity_bound_holds() -> None:
    # pyproject.toml selects C901 (McCabe <= 15) and PLR0915 (<= 60 statements) for dtcompile/.
    r = subprocess.run(
        [str(BIN / "ruff"), "check", "--select", "C901,PLR0915", "dtcompile"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout[-4000:]


def test_recipe_reference_is_current() -> None:
    from dtcompile.recipe.docs import SECTIONS, render

    assert (ROOT / "docs" / "recipes.md").read_text() == render(), (
        "docs/recipes.md is stale: python -m dtcompile.recipe.docs > docs/recipes.md"
    )
    for path, model in SECTIONS:  # every field says what it means
        missing = [name for name, field in model.model_fields.items() if not field.description]
        assert not missing, f"{path}: fields without a docstring: {missing}"


@pytest.mark.parametrize("name", ["recipes.md", "architecture.md"])
def test_docs_named_in_errors_exist(name: str) -> None:
    assert (ROOT / "docs" / name).is_file()


def test_the_recipe_names_the_backends_of_the_targets_table() -> None:
    # pydantic needs the literal values in the schema; they must be core.targets.BACKENDS, in its order.
    import typing

    from dtcompile.core.targets import BACKENDS
    from dtcompile.recipe.schema import EngineSpec

    (item,) = typing.get_args(EngineSpec.model_fields["backends"].annotation)
    assert typing.get_args(item) == BACKENDS
