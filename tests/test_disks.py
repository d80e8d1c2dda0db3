"""Each writing command on a full disk and on a read-only one: one error line, exit 1, nothing half-written.

The disks are small tmpfs mounts (this needs root or CAP_SYS_ADMIN; the tests skip with the reason elsewhere),
because root ignores `chmod` and a real full disk cannot be made otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DTC = [str(Path(sys.executable).parent / "dtc")]
PROMPT = "a red fox in the snow"


@pytest.fixture(params=["full", "read-only"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A mounted folder that is either 64 KiB with 60 KiB already used, or read-only; and the expected error."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        if request.param == "full":
            (mnt / "filler").write_bytes(b"\0" * 60 * 1024)
            yield mnt, "No space left on device"
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            yield mnt, "Read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def dtc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DTC, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def check(r: subprocess.CompletedProcess[str], mnt: Path, message: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert sorted(p.name for p in mnt.iterdir()) in ([], ["filler"])  # nothing half-written, no temp folder
    assert str(mnt) in lines[0] and not re.search(r"/\.[^/]+\.[a-z]+-\d+-", lines[0]), lines[0]  # no temp names


def test_build(disk: tuple[Path, str]) -> None:
    mnt, message = disk
    r = dtc("-q", "build", "--recipe", "recipes/tiny-flux.yaml", "--set", f"output.dir={mnt}",
            "--set", "engine={backends: [onnxruntime]}")  # fmt: skip
    check(r, mnt, message)


def test_run(tiny_artifact: Path, disk: tuple[Path, str]) -> None:
    mnt, message = disk
    r = dtc("-q", "run", str(tiny_artifact), "--prompt", PROMPT, "--steps", "2", "--out", str(mnt / "fox.png"))
    check(r, mnt, message)


def test_refit(tiny_artifact: Path, disk: tuple[Path, str]) -> None:
    mnt, message = disk
    r = dtc("-q", "refit", str(tiny_artifact), "--lora", "none", "--out", str(mnt / "refit"), "--drop-unrefittable")
    check(r, mnt, message)


def test_publish_and_pull(tiny_artifact: Path, disk: tuple[Path, str], tmp_path: Path) -> None:
    mnt, message = disk
    check(dtc("-q", "publish", str(tiny_artifact), "--to", str(mnt)), mnt, message)
    published = tmp_path / "published"
    assert dtc("-q", "publish", str(tiny_artifact), "--to", str(published)).returncode == 0
    r = dtc("-q", "pull", str(published / tiny_artifact.name), "--arch", "sm_89", "--out", str(mnt / "pulled"))
    check(r, mnt, message)
    assert r.stderr.startswith((f"error: {mnt / 'pulled'}: ", f"error: {mnt}: "))  # not a temp folder that is gone
