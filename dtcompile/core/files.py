"""Atomic file writes and folder swaps: a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write ``data`` to ``path`` via a temporary file, fsync and a rename; returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    write_atomic(path, text.encode())
    return path


def replace_dir(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` (same filesystem); an existing ``dest`` is moved aside first and removed only
    after the swap, so a reader sees the old folder or the new one, never a half-written one."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def cache_root() -> Path:
    """dtcompile's cache folder: ``$DTC_CACHE_DIR`` or ``~/.cache/dtcompile``."""
    root = os.environ.get("DTC_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dtcompile"
