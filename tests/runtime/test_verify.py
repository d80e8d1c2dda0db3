"""Recorded verification (issue 17 item 4): a run hashes only files changed since their last full check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtcompile.core.errors import ArtifactError
from dtcompile.manifest import Verifier, read_manifest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def art(tiny_artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact, dst)
    return dst


def test_a_copy_is_hashed_once_then_trusted_by_its_record(art: Path) -> None:
    entries = read_manifest(art).all_file_entries()
    first = Verifier(art)
    for e in entries:
        first.check(e)
    first.save()
    files = {e.file for e in entries}  # the ONNX graph is listed twice (graph and onnxruntime engine)
    assert set(first.hashed) == files and set(first.trusted) <= files  # a copy has no record yet
    second = Verifier(art)
    for e in entries:
        second.check(e)
    assert second.hashed == [] and set(second.trusted) == files
    full = Verifier(art, "full")
    for e in entries:
        full.check(e)
    assert set(full.hashed) == files and full.trusted == []


def test_a_file_changed_since_its_record_is_hashed_and_refused(art: Path) -> None:
    m = read_manifest(art)
    v = Verifier(art)
    for e in m.all_file_entries():
        v.check(e)
    v.save()
    entry = next(e for e in m.components["transformer"].engines if e.backend == "tensorrt-rtx")
    path = art / entry.file
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the ctime tells
    with pytest.raises(ArtifactError, match="sha256 does not match the manifest"):
        Verifier(art).check(entry)


def test_build_records_what_it_wrote_and_run_hashes_nothing(tmp_path: Path) -> None:
    # its own build: a refit hard-links the shared artifact's files (a new ctime), which re-hashes them once
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    recipe = load_recipe(
        ROOT / "recipes" / "tiny-flux.yaml", [f"output.dir={tmp_path}", "engine={backends: [onnxruntime]}"]
    )
    tiny_artifact = run_build(recipe).artifact_dir
    r = subprocess.run(
        [sys.executable, "-m", "dtcompile", "run", str(tiny_artifact), "--prompt", "a fox", "--backend",
         "onnxruntime", "--out", str(tiny_artifact.parent / "verify.png")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-1500:]
    assert "verified 0 file(s) by sha256" in r.stderr and "(verify=recorded)" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "dtcompile", "run", str(tiny_artifact), "--prompt", "a fox", "--backend",
         "onnxruntime", "--verify", "full", "--out", str(tiny_artifact.parent / "verify.png")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0 and "by their record (verify=full)" in r.stderr
    assert "verified 0 file(s) by sha256" not in r.stderr
