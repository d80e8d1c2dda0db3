"""Video jobs and their finished MP4s: job records in memory, files on disk, bounded by count, bytes and age.

A ``VideoStore`` belongs to one server process and writes into ``<root>/serve-<pid>/``; at start-up it removes
the folders that servers no longer running left there (a crash or SIGKILL), and at exit its own. Finished jobs
(completed or failed) count against ``max_items``; completed ones' files against ``max_bytes``; each lives
``ttl`` seconds after it finished. The oldest finished go first. An evicted or expired id is remembered (the
last ``TOMBSTONES``) so that asking for it again answers 410 with the reason, not 404.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dtcompile.core.files import pid_alive

log = logging.getLogger("dtcompile.serve")
VIDEO_ID_RE = re.compile(r"^video_[0-9a-f]{32}$")
TOMBSTONES = 4096  # evicted ids remembered for their 410
_FOLDER_RE = re.compile(r"^serve-(\d+)$")


class VideoGone(Exception):
    """The video was evicted or expired (HTTP 410); the message says which and why."""


@dataclass(eq=False)
class VideoRecord:
    """One video job as the API shows it (``body()``: OpenAI's Video object) and where its MP4 is."""

    id: str
    model: str
    prompt: str
    width: int
    height: int
    frames: int
    fps: float
    steps: int
    seed: int
    job: Any = None  # the scheduler's Job (steps_done, future) while it is queued or running
    created_at: float = field(default_factory=time.time)
    status: str = "queued"  # queued | in_progress | completed | failed (queued/in_progress read from the job)
    completed_at: float | None = None
    expires_at: float | None = None
    error: dict[str, Any] | None = None
    path: Path | None = None
    nbytes: int = 0
    ended: float | None = None  # when the job's future ended with an error (set without the lock; see settle)

    def settle(self, ttl: float) -> None:
        """Record a failure the job's future holds (set by the worker, or by the drain from a signal handler,
        which must not take the store's lock: the store reads it here, under its lock)."""
        exc = self.failure() if not self.finished else None
        if exc is not None:
            when = self.ended or time.time()
            self.status, self.completed_at, self.expires_at = "failed", when, when + ttl
            message = getattr(exc, "message", None) or "generation failed (see the server log)"
            self.error = {"code": getattr(exc, "code", None) or "generation_failed", "message": message}

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def current(self) -> tuple[str, int]:
        """(status, progress in percent): a running job's progress is its denoising steps done (99 at most
        until its MP4 is stored)."""
        if self.status == "completed":
            return self.status, 100
        done = min(99, int(100 * self._steps_done() / max(1, self.steps)))
        if self.finished or self.failure() is not None:
            return "failed", done
        if self.job is not None and (self.job.future.running() or self.job.future.done()):  # done: being encoded
            return "in_progress", done
        return "queued", 0

    def failure(self) -> BaseException | None:
        """The exception the job's future ended with (a failed generation; 503 for a job the drain answered)."""
        fut = None if self.job is None else self.job.future
        if fut is None or not fut.done() or fut.cancelled():
            return None
        return fut.exception()

    def _steps_done(self) -> int:
        return int(getattr(self.job, "steps_done", 0)) if self.job is not None else 0

    def body(self) -> dict[str, Any]:
        """OpenAI's Video object, plus this server's generation settings (``num_frames``, ``fps``, ``seed``,
        ``num_inference_steps``)."""
        status, progress = self.current()
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": status,
            "progress": progress,
            "created_at": int(self.created_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "expires_at": None if self.expires_at is None else int(self.expires_at),
            "prompt": self.prompt,
            "seconds": f"{self.frames / self.fps:g}",
            "size": f"{self.width}x{self.height}",
            "error": self.error,
            "remixed_from_video_id": None,
            "num_frames": self.frames,
            "fps": self.fps,
            "seed": self.seed,
            "num_inference_steps": self.steps,
        }


class VideoStore:
    """Video job records and their MP4 files under ``root`` (see the module docstring). Thread-safe: the event
    loop adds, reads and deletes; the worker thread completes and fails."""

    def __init__(self, root: Path, ttl: float, max_items: int, max_bytes: int) -> None:
        self.ttl, self.max_items, self.max_bytes = ttl, max_items, max_bytes
        self.folder = Path(root) / f"serve-{os.getpid()}"
        removed = clean_stale(Path(root))
        if removed:
            log.info("video store: removed %d folder(s) left by servers no longer running", removed)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, VideoRecord] = {}  # in creation order
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        atexit.register(self.close)

    @staticmethod
    def new_id() -> str:
        return f"video_{secrets.token_hex(16)}"

    def path_for(self, video_id: str) -> Path:
        return self.folder / f"{video_id}.mp4"

    def add(self, record: VideoRecord) -> None:
        with self._lock:
            self._records[record.id] = record

    def get(self, video_id: str) -> VideoRecord | None:
        """The record, None when there never was one (or it was deleted); VideoGone when evicted or expired."""
        with self._lock:
            self._evict()
            record = self._records.get(video_id) if VIDEO_ID_RE.match(video_id) else None
            if record is None and video_id in self._gone:
                raise VideoGone(self._gone[video_id])
        return record

    def list(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[VideoRecord],
                                                                                             bool]:  # fmt: skip
        """(up to ``limit`` records after id ``after`` in creation ``order``, whether more follow)."""
        with self._lock:
            self._evict()
            records = list(self._records.values())
        if order == "desc":
            records.reverse()
        if after is not None:
            ids = [r.id for r in records]
            records = records[ids.index(after) + 1 :] if after in ids else []
        return records[:limit], len(records) > limit

    def complete(self, video_id: str, path: Path) -> None:
        """The job's MP4 is at ``path`` (inside ``folder``): completed, and the store evicts what no longer fits."""
        with self._lock:
            record = self._records.get(video_id)
            if record is None:  # deleted while it ran
                path.unlink(missing_ok=True)
                return
            now = time.time()
            record.status, record.completed_at, record.expires_at = "completed", now, now + self.ttl
            record.path, record.nbytes, record.job = path, path.stat().st_size, None
            self._bytes += record.nbytes
            self._evict()

    def fail(self, video_id: str, code: str, message: str) -> None:
        with self._lock:
            record = self._records.get(video_id)
            if record is None:
                return
            now = time.time()
            record.status, record.completed_at, record.expires_at = "failed", now, now + self.ttl
            record.error = {"code": code, "message": message}
            record.job = None
            self._evict()

    def delete(self, video_id: str) -> VideoRecord | None:
        """Remove a record and its file; the removed record, or None when there was none."""
        with self._lock:
            record = self._records.pop(video_id, None)
            if record is not None:
                self._drop_file(record)
        return record

    def open_content(self, video_id: str) -> tuple[IO[bytes], int]:
        """An open handle on a completed video's MP4 and its size (the handle keeps the bytes readable even if
        the video is evicted meanwhile); KeyError when the record has no file."""
        with self._lock:
            record = self._records.get(video_id)
            if record is None or record.path is None:
                raise KeyError(video_id)
            return open(record.path, "rb"), record.nbytes  # noqa: SIM115 (the caller closes it)

    def usage(self) -> tuple[int, int]:
        """(finished videos held, bytes of MP4 held)."""
        with self._lock:
            return sum(r.finished for r in self._records.values()), self._bytes

    def close(self) -> None:
        """Remove this process's folder (at exit: the records die with the process)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _drop_file(self, record: VideoRecord) -> None:
        if record.path is not None:
            with contextlib.suppress(OSError):
                record.path.unlink()
            self._bytes -= record.nbytes
            record.path, record.nbytes = None, 0

    def _evict(self) -> None:
        """Expired finished records, then the oldest finished while over ``max_items`` or ``max_bytes``."""
        now = time.time()
        for record in self._records.values():
            record.settle(self.ttl)
        finished = sorted((r for r in self._records.values() if r.finished), key=lambda r: r.completed_at or 0.0)
        count = len(finished)
        for record in finished:  # oldest finished first
            if record.expires_at is not None and record.expires_at <= now:
                why = f"it expired {self.ttl:g} s after it finished (dtc serve --video-ttl)"
            elif count > self.max_items:
                why = f"the server keeps at most {self.max_items} finished videos (dtc serve --video-store-items)"
            elif self._bytes > self.max_bytes and record.path is not None:
                why = f"the server keeps at most {self.max_bytes} bytes of videos (dtc serve --video-store-bytes)"
            else:
                continue
            self._drop_file(record)
            del self._records[record.id]
            count -= 1
            self._gone[record.id] = f"video {record.id} is gone: {why}; generate it again"
            while len(self._gone) > TOMBSTONES:
                self._gone.popitem(last=False)


def clean_stale(root: Path) -> int:
    """Remove the ``serve-<pid>`` folders under ``root`` whose process no longer runs (and this process's own
    from an earlier life of its pid); how many."""
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.iterdir():
        m = _FOLDER_RE.match(path.name)
        if not m or not path.is_dir() or path.is_symlink():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def open_video_store(options: Any, video_models: Iterable[bool]) -> VideoStore | None:
    """The store for a server's ``ServeOptions``, or None when none of its models makes videos."""
    if not any(video_models):
        return None
    from dtcompile.core.files import cache_root

    root = Path(options.video_dir) if options.video_dir else cache_root() / "serve-videos"
    try:
        return VideoStore(root, options.video_ttl, options.video_store_items, options.video_store_bytes)
    except OSError as exc:
        from dtcompile.core.errors import InputError

        raise InputError(f"--video-dir {root}: cannot keep videos there ({exc.strerror or exc}); name a writable "
                         "folder") from None  # fmt: skip
