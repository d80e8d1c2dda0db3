"""Atomic file writes and folder swaps: a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import errno
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


#: Test-only fault hook: ``DTC_FAULT_AT=<point>`` SIGKILLs the process when it reaches ``<point>`` (``fault_point``).
FAULT_ENV = "DTC_FAULT_AT"


def fault_point(name: str) -> None:
    """Die here (SIGKILL, as a power loss would) when ``$DTC_FAULT_AT`` names this point, or get a Ctrl-C here when
    it is ``SIGINT@<point>``; used only by tests, so a crash or an interrupt can be placed at every step of a swap
    or a publish. A no-op otherwise."""
    want = os.environ.get(FAULT_ENV)
    if want in (name, f"SIGINT@{name}"):
        import signal

        os.kill(os.getpid(), signal.SIGINT if want.startswith("SIGINT@") else signal.SIGKILL)


def _exchange(src: Path, dest: Path) -> bool:
    """Swap ``src`` and ``dest`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, the C library or the filesystem cannot, so the caller falls back to two renames."""
    if os.environ.get(FAULT_ENV, "").startswith("swap:rename"):  # a test of the two-rename path
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dest), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dest))


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (a swap is never left half-way by an interrupt), then reach
    their handlers. Python runs handlers in the main thread only, so the handlers are swapped for a recorder here
    (blocking the signal with a mask would not do: another thread would take it)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in held}
    for sig in held:
        if before[sig] not in (signal.SIG_IGN, None):
            signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for signum in caught[:1]:  # delivered now, to the handler that was there (KeyboardInterrupt by default)
            handler = before[signal.Signals(signum)]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def replace_dir(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` (same filesystem), so a reader sees the old folder or the new one, never a
    half-written one, and a crash at any point leaves one of them at ``dest``.

    An existing ``dest`` folder is swapped with ``src`` in one atomic step (``renameat2(RENAME_EXCHANGE)``) and the
    old artifact, now under ``src``'s temp name, is removed after (``collect_stale`` removes it if the process
    dies first). Where the filesystem cannot exchange, ``dest`` is moved aside to ``.<name>.old-<pid>`` first and
    the new one renamed in; a death between those two renames is repaired by ``recover_swap`` (called by
    ``collect_stale`` and by ``manifest.read_manifest``). Ctrl-C and SIGTERM wait until the renames are done.
    """
    src, dest = Path(src), Path(dest)
    old: Path | None = None
    done = False
    try:
        with _signals_held():
            fault_point("swap:start")
            if dest.is_dir() and not dest.is_symlink() and _exchange(src, dest):
                old = src
                fault_point("swap:exchanged")
            else:
                if dest.exists() or dest.is_symlink():
                    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                    os.replace(dest, old)
                    fault_point("swap:rename-aside")
                os.replace(src, dest)
                fault_point("swap:rename-in")
            done = True
    finally:  # also when a held Ctrl-C is delivered as the block ends: the new artifact is in, the old one goes
        if done and old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def check_replaceable(dest: Path, option: str) -> None:
    """ArtifactError unless ``dest`` is missing, an empty folder or a folder holding a dtcompile artifact (its
    ``manifest.json``): ``--force`` and a rebuild replace artifacts, never a user's other files, a file or a link.
    ``option`` names where the path came from (``--out``, ``output.dir``)."""
    from dtcompile.core.errors import ArtifactError

    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ArtifactError(
            f"{option} {dest}: is a file or a link, not an artifact folder; --force will not replace it"
        )
    if not dest.is_dir():
        return
    manifest = dest / "manifest.json"
    if manifest.is_file() and not manifest.is_symlink():
        return
    if any(dest.iterdir()):
        raise ArtifactError(
            f"{option} {dest}: folder holds files but no dtcompile artifact (no manifest.json); it is only replaced "
            "when it holds an artifact, even with --force: choose a new or empty folder, or move its files away"
        )


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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        public_message(exc, {tmp: dest})
        raise


def public_message(exc: BaseException, names: dict[Path, object]) -> BaseException:
    """``exc`` with every temp path of ``names`` in its message replaced by what the user knows it as (the
    destination folder, a URL): a message never names a temp folder that is gone by the time it prints. A
    DtcError's message only; returns ``exc`` (changed in place)."""
    from dtcompile.core.errors import DtcError

    if isinstance(exc, DtcError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
        for tmp, public in sorted(names.items(), key=lambda kv: -len(str(kv[0]))):  # the longest path first
            text = text.replace(str(tmp), str(public))
        exc.args = (text,)
    return exc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale_pattern(dest: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(dest.name)}\.([a-z]+)-(\d+)(-.*)?$")


def recover_swap(dest: Path) -> str | None:
    """Put back the artifact an interrupted two-rename swap left as ``.<name>.old-<pid>`` (its process dead) when
    ``dest`` is missing; returns what was done, or None. An OSError (a read-only folder) becomes one line that
    says how to do it by hand."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink() or not dest.parent.is_dir():
        return None
    pattern = _stale_pattern(dest)
    for path in sorted(dest.parent.iterdir()):
        m = pattern.match(path.name)
        if not m or m.group(1) != "old" or m.group(3) or pid_alive(int(m.group(2))):
            continue
        try:
            os.replace(path, dest)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror}; an interrupted swap left the artifact there: rename it back "
                          f"with: mv '{path}' '{dest}'", str(path)) from None  # fmt: skip
        return f"restored {dest} from the interrupted swap {path.name}"
    return None


def collect_stale(dest: Path) -> list[str]:
    """Clean up after writers of ``dest`` that died (SIGKILL, power loss); returns what was done, one line each.

    A ``.<name>.old-<pid>`` folder of a dead process whose swap never finished is renamed back to ``dest`` when
    ``dest`` is missing (``recover_swap``), so a crash at any point leaves the old or the new artifact. Temp
    folders of dead processes are removed; live ones are kept.
    """
    dest = Path(dest)
    done: list[str] = []
    if not dest.parent.is_dir():
        return done
    restored = recover_swap(dest)
    if restored:
        done.append(restored)
    pattern = _stale_pattern(dest)
    for path in sorted(dest.parent.iterdir()):
        m = pattern.match(path.name)
        if not m or pid_alive(int(m.group(2))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:  # a temp file (an index being written) or a file/link an interrupted swap moved aside
            path.unlink(missing_ok=True)
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
