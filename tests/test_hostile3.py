"""Hostile input, round three (issue 32): each class's hostile input made here, run through the real CLI.

Each test asserts the single ``error:`` line, the exit code and that nothing was written outside the intended
folder; for deletions, crashes and leftovers (classes 2, 3 and 7), that the user's files survive and the next
command finds a whole artifact or store. Class 1 (parity references in eval mode) is tests/test_foreign_configs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtcompile.core.digests import sha256_file
from dtcompile.manifest import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-flux.yaml"
LORA = ROOT / "recipes" / "lora" / "tiny-flux-style.safetensors"
PROMPT = "a red fox in the snow"


def dtc(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "dtcompile", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The CLI's single ``error:`` line (and no traceback, no internal error)."""
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-flux built for onnxruntime only (refittable, fast to copy, refit and publish)."""
    out = tmp_path_factory.mktemp("ort")
    r = dtc("build", "--recipe", str(RECIPE), "--set", f"output.dir={out}", "--set", "engine={backends: [onnxruntime]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "tiny-flux"


@pytest.fixture
def art(ort_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the onnxruntime-only artifact in ``tmp_path/box/tiny-flux``."""
    dst = tmp_path / "box" / "tiny-flux"
    shutil.copytree(ort_artifact, dst)
    return dst


def edit_manifest(art: Path, edit) -> None:
    path = art / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- 2. --force replaces only an artifact folder -------------------------------------------------------------------


def test_pull_force_never_deletes_a_folder_that_is_not_an_artifact(art: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    r = dtc("publish", str(art), "--to", str(store))
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path / "d")
    r = dtc("pull", str(store / "tiny-flux"), "--arch", "any", "--out", str(d), "--force")
    assert r.returncode == 2
    line = one_error_line(r)
    assert f"--out {d}: folder holds files but no dtcompile artifact (no manifest.json)" in line
    assert "choose a new or empty folder" in line
    assert snapshot(d) == before and hidden(tmp_path) == []
    # an artifact folder is replaced by --force; an empty folder is filled
    for out in (tmp_path / "empty", tmp_path / "empty"):
        out.mkdir(exist_ok=True)
        r = dtc("pull", str(store / "tiny-flux"), "--arch", "any", "--out", str(out), "--force")
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / MANIFEST).is_file()
    assert hidden(tmp_path) == []


def test_build_never_replaces_a_folder_that_is_not_an_artifact(tmp_path: Path) -> None:
    out = tmp_path / "engines"
    mine = out / "tiny-flux"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    r = dtc("build", "--recipe", str(RECIPE), "--set", f"output.dir={out}", "--force",
            "--set", "engine={backends: [onnxruntime]}")  # fmt: skip
    assert r.returncode == 2
    assert f"output.dir {mine}: folder holds files but no dtcompile artifact" in one_error_line(r)
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["tiny-flux"]


# --- 3. a crash at any step of a swap leaves a whole artifact, which the next command finds ----------------------


SWAP_POINTS = ["swap:start", "swap:exchanged", "swap:rename-aside", "swap:rename-in"]


@pytest.mark.parametrize("point", SWAP_POINTS)
def test_refit_in_place_killed_at_each_step_of_the_swap(art: Path, point: str) -> None:
    from dtcompile.manifest import read_manifest

    before = read_manifest(art).key
    cmd = ["refit", str(art), "--lora", f"{LORA}:0.5", "--in-place"]
    r = dtc(*cmd, env={"DTC_FAULT_AT": point})
    assert r.returncode == -9, r.stderr[-2000:]  # killed there, as a power loss would
    # the very next command, read-only or not, finds a whole artifact (the old one or the refit one)
    r = dtc("inspect", str(art), "--verify")
    assert r.returncode == 0, r.stderr[-2000:]
    key = read_manifest(art).key
    assert key == before if point in ("swap:start", "swap:rename-aside") else key != before
    if point == "swap:rename-aside":  # the state that used to say "artifact folder not found" everywhere
        r = dtc("run", str(art), "--prompt", PROMPT, "--steps", "1", "--out", str(art.parent / "o.png"))
        assert r.returncode == 0, r.stderr[-2000:]
        (art.parent / "o.png").unlink()
    r = dtc(*cmd)  # the natural retry succeeds and collects what the dead process left
    assert r.returncode == 0, r.stderr[-2000:]
    assert hidden(art.parent) == []
    assert read_manifest(art).lora.adapters[0]["scale"] == 0.5


def test_build_force_killed_between_the_renames_is_recovered_by_inspect(ort_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    shutil.copytree(ort_artifact, out / "tiny-flux")
    before = snapshot(out / "tiny-flux")
    build = ["build", "--recipe", str(RECIPE), "--set", f"output.dir={out}", "--set",
             "engine={backends: [onnxruntime]}", "--force"]  # fmt: skip
    r = dtc(*build, env={"DTC_FAULT_AT": "swap:rename-aside"})
    assert r.returncode == -9
    assert not (out / "tiny-flux").exists() and [n for n in hidden(out) if ".old-" in n]  # the crash's state
    r = dtc("inspect", str(out / "tiny-flux"), "--verify")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "restored" in r.stderr
    after = snapshot(out / "tiny-flux")
    assert {k: after.get(k) for k in before} == before  # the old artifact, every file as it was
    r = dtc(*build)
    assert r.returncode == 0, r.stderr[-2000:]
    assert hidden(out) == []


# --- 4. refit refuses adapters whose fused weights cannot be finite, and non-float factors ------------------------


def _hostile_lora(path: Path, how: str) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(LORA), "pt") as f:
        meta = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    first_b = next(k for k in sd if "lora_B" in k)
    if how == "x1e30":
        sd = {k: v * 1e30 for k, v in sd.items()}
    elif how == "int64":
        sd[first_b] = (sd[first_b] * 100).to(torch.int64)
    elif how == "bool":
        sd[first_b] = sd[first_b] > 0
    elif how == "nan-alpha":
        meta["lora_adapter_metadata"] = meta["lora_adapter_metadata"].replace(
            '"transformer.lora_alpha": 4.0', '"transformer.lora_alpha": NaN'
        )
        assert "NaN" in meta["lora_adapter_metadata"]
    save_file(sd, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    ("how", "scale", "message"),
    [
        ("plain", "1e39", "scale 1e+39: fusing gives"),
        ("plain", "-1e308", "scale -1e+308: fusing gives"),
        ("x1e30", "1", "scale 1: fusing gives"),
        ("int64", "1", "has int64 lora_B weights in 'hostile.safetensors'; LoRA factors must be floating point"),
        ("bool", "1", "has bool lora_B weights in 'hostile.safetensors'; LoRA factors must be floating point"),
        ("nan-alpha", "1", "has LoRA alpha nan in 'hostile.safetensors'; alpha must be a finite number"),
    ],
)
def test_refit_refuses_adapters_that_can_only_fail(
    art: Path, tmp_path: Path, how: str, scale: str, message: str
) -> None:
    lora = LORA if how == "plain" else _hostile_lora(tmp_path / "hostile.safetensors", how)
    before = snapshot(art)
    r = dtc("refit", str(art), "--lora", f"{lora}:{scale}", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr[-2000:]
    line = one_error_line(r)
    assert message in line, line
    if "fusing gives" in line:
        assert "overflows); the scale or the adapter's factors are too large" in line
    assert not (tmp_path / "o").exists() and hidden(tmp_path) == [] and hidden(art.parent) == []
    assert snapshot(art) == before
