"""Atomic file writes and folder swaps: a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: Suffixes of pickle-based weight files (torch.load runs code from them): never read, never carried.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


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


def make_temp_dir(dest: Path, kind: str) -> Path:
    """A fresh hidden folder next to ``dest`` (``.<name>.<kind>-<pid>-XXXX``), readable by all.

    The pid in the name lets ``collect_stale`` tell a live writer's folder from one a killed process left.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{kind}-{os.getpid()}-", dir=dest.parent))
    except OSError as exc:  # name the folder written to, not a temp name that never existed
        raise OSError(exc.errno, exc.strerror, str(dest.parent)) from None
    tmp.chmod(0o755)  # mkdtemp is owner-only; artifacts are shared read-only
    return tmp


def as_written_to(exc: OSError, tmp: Path, dest: Path) -> OSError:
    """``exc`` naming where the user asked to write: a path inside ``tmp`` (removed by now) becomes the same path
    under ``dest``, and an error without a file (a full disk during a write) names ``dest``."""

    def public(name: object) -> str | None:
        if name is None:
            return None
        path = Path(os.fsdecode(name))  # type: ignore[arg-type]
        try:
            return str(dest / path.relative_to(tmp))
        except ValueError:
            return str(path)

    first, second = public(exc.filename), public(exc.filename2)
    if first is None:
        first = str(dest)
    if second is not None:
        return OSError(exc.errno, exc.strerror, first, None, second)
    return OSError(exc.errno, exc.strerror or str(exc), first)


@contextmanager
def discarded_on_failure(tmp: Path, dest: Path) -> Iterator[None]:
    """Remove ``tmp`` if the block fails; an OSError (full or read-only disk) is re-raised naming ``dest``
    (``as_written_to``), not the temp folder removed here."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise as_written_to(exc, tmp, dest) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def collect_stale(dest: Path) -> list[str]:
    """Clean up after writers of ``dest`` that died (SIGKILL, power loss); returns what was done, one line each.

    A ``.<name>.old-<pid>`` folder of a dead process whose swap never finished is renamed back to ``dest`` when
    ``dest`` is missing (``replace_dir`` had moved the old artifact aside but not the new one in), so a crash at
    any point leaves the old or the new artifact. Temp folders of dead processes are removed; live ones are kept.
    """
    dest = Path(dest)
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.([a-z]+)-(\d+)(-.*)?$")
    done: list[str] = []
    if not dest.parent.is_dir():
        return done
    for path in sorted(dest.parent.iterdir()):
        m = pattern.match(path.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not dest.exists() and not dest.is_symlink():
            os.replace(path, dest)
            done.append(f"restored {dest} from the interrupted swap {path.name}")
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, left by process {m.group(2)} which no longer runs")
    return done


def cache_root() -> Path:
    """dtcompile's cache folder: ``$DTC_CACHE_DIR`` or ``~/.cache/dtcompile``."""
    root = os.environ.get("DTC_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dtcompile"


def copy_byte_range(src: Path, start: int, length: int, write: Callable[[bytes], object], what: str) -> None:
    """Pass ``length`` bytes of ``src`` from offset ``start`` to ``write`` in 64 MiB blocks (never the whole range
    in memory); BuildError naming ``what`` when the file ends first."""
    from dtcompile.core.errors import BuildError

    with open(src, "rb") as f:
        f.seek(start)
        left = length
        while left:
            block = f.read(min(1 << 26, left))
            if not block:
                raise BuildError(f"{src} is shorter than the data of {what} it should hold")
            write(block)
            left -= len(block)
