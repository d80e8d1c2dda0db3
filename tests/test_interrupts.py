"""Kills during a build and a refit (issue 12): SIGINT, SIGTERM and SIGKILL at several points.

After each: no partial artifact, the previous artifact (if any) intact, and the next build succeeds and leaves no
stale temp folder. Points are reached by watching the build's own temp folder (export written, build started).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtcompile.core.digests import sha256_file
from dtcompile.core.files import collect_stale, replace_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-flux.yaml"


def _default_sigint() -> None:
    # A shell's background jobs inherit SIGINT ignored (and Python then keeps ignoring it): undo that here so
    # the test sends its signal to a process in the state an interactive user's would be.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def build_cmd(out: Path, *overrides: str) -> list[str]:
    """``dtc build`` of the tiny recipe into ``out`` (sm_89 only unless ``overrides`` say otherwise)."""
    sets = [a for o in ("engine.targets=[sm_89]", *overrides) for a in ("--set", o)]
    return [sys.executable, "-m", "dtcompile", "build", "--recipe", str(RECIPE), "--set", f"output.dir={out}", *sets]


def start_build(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*build_cmd(out), "--force"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip


def wait_for(out: Path, pattern: str, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    t0 = time.time()
    while not list(out.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{pattern} never appeared"
        time.sleep(0.05)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A finished build of the tiny recipe (sm_89 only): the artifact every kill must leave intact."""
    out = tmp_path_factory.mktemp("kill")
    r = subprocess.run(build_cmd(out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, snapshot(out / "tiny-flux")


# (signal, the point to send it at: a glob under output.dir that appears when the build gets there)
POINTS = {
    "after export": ".tiny-flux.tmp-*/onnx/transformer.onnx",
    "during the TensorRT build": ".tiny-flux.tmp-*/pipeline/model_index.json",
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", list(POINTS))
def test_interrupt_stops_the_build_cleans_up_and_keeps_the_old_artifact(previous, sig, point) -> None:
    out, before = previous
    proc = start_build(out)
    wait_for(out, POINTS[point], proc)
    if point == "during the TensorRT build":
        time.sleep(1.0)  # the engine build is running by now (export done, pipeline saved)
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert time.time() - t0 < 60  # stops, instead of finishing the build
    assert leftovers(out) == []
    assert snapshot(out / "tiny-flux") == before


def test_sigkill_leaves_the_old_artifact_and_the_next_build_collects_the_temp_folder(previous) -> None:
    out, before = previous
    proc = start_build(out)
    wait_for(out, POINTS["after export"], proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert leftovers(out) and snapshot(out / "tiny-flux") == before  # a dead writer's temp folder
    r = subprocess.run([*build_cmd(out), "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "which no longer runs" in r.stderr
    assert leftovers(out) == []


def test_a_swap_killed_between_its_two_renames_is_recovered(tmp_path: Path) -> None:
    """replace_dir moves the old artifact aside, then the new one in: a death in between leaves only ``.old``."""
    dest = tmp_path / "art"
    dest.mkdir()
    (dest / "manifest.json").write_text("old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    os.replace(dest, tmp_path / f".art.old-{pid}")  # the first rename of the swap, then the crash
    (tmp_path / f".art.tmp-{pid}-x").mkdir()  # and the new artifact's temp folder
    assert collect_stale(dest) == [
        f"restored {dest} from the interrupted swap .art.old-{pid}",
        f"removed .art.tmp-{pid}-x, left by process {pid} which no longer runs",
    ]
    assert (dest / "manifest.json").read_text() == "old" and leftovers(tmp_path) == []
    # a live process's folders are never touched
    live = tmp_path / f".art.tmp-{os.getpid()}-y"
    live.mkdir()
    assert collect_stale(dest) == [] and live.is_dir()
    new = tmp_path / "new"
    new.mkdir()
    replace_dir(new, dest)
    assert not (dest / "manifest.json").exists()


def test_sigkill_during_refit_in_place_leaves_a_whole_artifact(tmp_path: Path) -> None:
    """Killed at any point of ``refit --in-place``: the old or the new artifact is whole, and the next refit
    (which must succeed) leaves no temp folder behind."""
    from dtcompile.manifest import read_manifest, verify_file

    out = tmp_path / "engines"
    r = subprocess.run(build_cmd(out, "engine={backends: [onnxruntime]}"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    art = out / "tiny-flux"
    lora = ROOT / "recipes" / "lora" / "tiny-flux-style.safetensors"
    cmd = [sys.executable, "-m", "dtcompile", "refit", str(art), "--lora", f"{lora}:0.5", "--in-place"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(out.glob(".tiny-flux.refit-*")) and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=60)
    from dtcompile.core.files import collect_stale

    collect_stale(art)  # what the next writer does first: restore an interrupted swap, drop dead temp folders
    m = read_manifest(art)  # whole: the old artifact or the refit one
    for entry in m.all_file_entries():
        verify_file(art, entry)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert leftovers(out) == []
    assert read_manifest(art).lora.adapters[0]["scale"] == 0.5
