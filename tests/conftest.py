"""Shared fixtures: an isolated built-in cache and one tiny-flux artifact built per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests import their fixtures as `tests.fixtures` (not part of the library)
    sys.path.append(str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-ins are generated into a per-session cache, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("dtc-cache")
    os.environ["DTC_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _torch_threads_kept() -> object:
    """A test that changes torch's thread count in this process puts it back (an in-process reference run of a
    later test must compute as the server or CLI it is compared with does)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipes/tiny-flux.yaml built for real (ONNX + TensorRT-RTX sm_89/sm_120) into a temp engines/ folder."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines")
    recipe = load_recipe(ROOT / "recipes" / "tiny-flux.yaml", [f"output.dir={out}"])
    return run_build(recipe).artifact_dir
