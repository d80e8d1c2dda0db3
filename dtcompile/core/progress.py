"""Stage progress: start/end log lines, wall time and peak resident memory while a stage runs."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("dtcompile")


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class StageStats:
    """Measured cost of one stage, stored in the manifest."""

    name: str
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    wrote: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "wrote": self.wrote,
        }


class _PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes())


@contextmanager
def stage(name: str, detail: str = "") -> Iterator[StageStats]:
    """Log a stage's start and end with wall time and peak RSS; yields stats to fill ``wrote``."""
    stats = StageStats(name)
    log.info("[%s] start%s", name, f": {detail}" if detail else "")
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield stats
    finally:
        stats.wall_s = time.perf_counter() - t0
        stats.peak_rss_mb = sampler.stop() / 2**20
    log.info("[%s] done in %.2fs, peak RSS %.0f MB", name, stats.wall_s, stats.peak_rss_mb)
    for path in stats.wrote:
        log.info("[%s] wrote %s", name, path)
