"""The README's Python API example runs as written (in a scratch folder holding a copy of recipes/)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_block(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"README section {section!r} should hold one python block"
    return blocks[0]


def test_readme_python_api_example(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("Python API"), "README.md", "exec"), {})  # noqa: S102 - our own README
    from PIL import Image

    with Image.open(tmp_path / "fox.png") as image:
        assert image.size == (64, 64)
    assert (tmp_path / "engines" / "tiny-flux" / "manifest.json").is_file()


def test_family_matrix_names_tests_that_exist() -> None:
    """Every ``tested: `file.py::name` `` cell of README's family matrix names a test function in that file."""
    import re

    text = (ROOT / "README.md").read_text()
    cells = re.findall(r"tested: `([\w/]+\.py)::(\w+)", text)
    assert len(cells) >= 10
    for path, name in cells:
        source = (ROOT / "tests" / path).read_text()
        assert f"def {name}(" in source, f"README names {path}::{name}, which does not exist"
