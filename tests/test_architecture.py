"""The structure holds: the import-layer contract, the complexity bound, and the generated recipe reference."""

from __future__ import annotations

import json
import os
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
    assert "2 kept, 0 broken" in r.stdout


def test_the_cycle_contract_catches_a_cycle_hidden_by_a_function_local_import(tmp_path: Path) -> None:
    # pyproject.toml's acyclic_siblings contract, pointed at a package whose two modules import each other, one of
    # them only inside a function: the contract must break (grimp counts function-local imports).
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as import-linter itself
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "acyclic_siblings"]
    pkg = tmp_path / "knot" / "inner"
    pkg.mkdir(parents=True)
    (tmp_path / "knot" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from knot.inner.b import g\n\ndef f():\n    return g\n")
    (pkg / "b.py").write_text("def g():\n    from knot.inner.a import f\n\n    return f\n")
    fields = {**contract, "ancestors": ["knot"]}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    (tmp_path / "cycle.toml").write_text(
        f'[tool.importlinter]\nroot_package = "knot"\n\n[[tool.importlinter.contracts]]\n{body}\n'
    )
    exe = BIN / "lint-imports"
    r = subprocess.run(
        [str(exe if exe.exists() else "lint-imports"), "--no-cache", "cycle.toml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode != 0, r.stdout[-4000:]
    assert "No cycles are allowed in knot.inner" in r.stdout, r.stdout[-4000:]


def test_complexity_bound_holds() -> None:
    # pyproject.toml selects C901 (McCabe <= 15) and PLR0915 (<= 45 statements) for dtcompile/.
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


def _recipe_field(dotted: str) -> bool:
    """``dotted`` is a field path of the recipe (``export.shapes.frames``)."""
    import typing

    from pydantic import BaseModel

    from dtcompile.recipe import Recipe

    model: object = Recipe
    for name in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or name not in model.model_fields:
            return False
        hint = model.model_fields[name].annotation
        models = [a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if models else None
    return True


def _doc_name_exists(token: str, source: str) -> bool:
    """A backticked name in docs/architecture.md: a file, a dotted module or attribute, or a class/constant."""
    import importlib
    import re

    if re.fullmatch(r"[\w./-]+\.py|[\w.-]+/[\w./-]+", token):
        return any((ROOT / base / token).exists() for base in ("", "dtcompile"))
    packages = {p.stem for p in (ROOT / "dtcompile").iterdir()} | {"dtcompile"}
    if re.fullmatch(r"[a-z_][\w]*(\.[\w]+)+", token) and token.split(".")[0] in packages:
        parts = token.removeprefix("dtcompile.").split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module("dtcompile." + ".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    return _recipe_field(token)
                obj = getattr(obj, attr)
            return True
        return _recipe_field(token)
    if re.fullmatch(r"[A-Z][A-Za-z0-9_]+", token):  # a class or constant, an environment variable, a lint rule
        return re.search(rf"\b{token}\b", source) is not None
    return True  # a value, a recipe field, an option or a command: checked by the tests of what it names


def test_every_name_in_the_architecture_doc_exists() -> None:
    """docs/architecture.md names files, modules, attributes and classes: each must exist in the code."""
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    files = [*(ROOT / "dtcompile").rglob("*.py"), ROOT / "pyproject.toml"]
    source = "\n".join(p.read_text() for p in files)
    tokens = {t for t in re.findall(r"`([^`\s<>*]+)`", doc) if not t.startswith(("-", "$", "dtc"))}
    missing = sorted(t for t in tokens if not _doc_name_exists(t.rstrip("()"), source))
    assert not missing, f"docs/architecture.md names what the code does not have: {missing}"
