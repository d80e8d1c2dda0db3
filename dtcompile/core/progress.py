"""Stage progress: start/end log lines, wall time and peak resident memory while a stage runs, and ``Progress``
for the steps of one long loop inside a stage (a bar on a terminal, periodic log lines elsewhere)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

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


def _hwm_bytes() -> int:
    """This process's peak resident set size so far (Linux /proc VmHWM; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@contextmanager
def measured(what: str, logger: logging.Logger | None = None) -> Iterator[None]:
    """Log ``what``'s wall time and peak RSS when it ends, also when it raises: ``export transformer: tracing
    took 12.3 s, peak RSS 2345 MiB (+1100 MiB over its start)``. For the phases of one stage, whose own line
    gives only the stage's peak.

    The peak is sampled every 50 ms by a thread, which cannot sample while native code holds the GIL (torch's
    ONNX serialization does); where the phase raised the process's high-water mark (VmHWM), that exact value
    is taken instead and the line says ``process peak``."""
    sampler = _PeakSampler()
    start, hwm_start = sampler.peak, _hwm_bytes()
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        peak, hwm = sampler.stop(), _hwm_bytes()
        new_high = hwm > hwm_start
        peak = max(peak, hwm) if new_high else peak
        (logger or log).info(
            "%s took %.1f s, peak RSS %.0f MiB (%+.0f MiB over its start%s)",
            what,
            time.perf_counter() - t0,
            peak / 2**20,
            (peak - start) / 2**20,
            "; process peak" if new_high else "",
        )


# --- progress of one long loop ---------------------------------------------------------------------------------


def _rate(per_s: float) -> str:
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


def _duration(seconds: float) -> str:
    """``0.4 s``, ``8 s``, ``2 min 05 s``, ``1 h 03 min``: a time a reader takes in at a glance."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # a file-like object without a descriptor (tests)
        return 0


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


class Progress:
    """Counts the steps of one long loop (calibration steps, accuracy runs, export phases, engine build steps).

    On a terminal it draws a tqdm bar with rate and ETA on ``stream`` (stderr by default). Elsewhere (CI logs,
    a file) it logs a line through the ``dtcompile`` logger at every 10% of ``total`` (at most one per
    ``min_gap_s``) or after ``every_s`` seconds without one: ``calibrate: 6/16 steps, 1.3 step/s, ETA 8 s``.
    Either way ``close`` logs one summary line. When the logger is quiet (``dtc -q``, ``dtc build --quiet``)
    it draws and logs nothing. ``heartbeat`` keeps the bar's clock and the periodic line going through one long
    call that reports nothing (an ONNX trace, a TensorRT tactic search).
    """

    #: Off a terminal: a line at each tenth at most this often, and one at least this often.
    min_gap_s: float = 5.0
    every_s: float = 30.0
    #: On a terminal: the bar is redrawn at most this often (tqdm's ``mininterval``).
    redraw_s: float = 0.1

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "step",
        *,
        stream: IO[str] | None = None,
        heartbeat: bool = False,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.detail = ""  # what runs now (an export phase, a TensorRT build phase)
        self.enabled = log.isEnabledFor(logging.INFO)
        self._redirect = ExitStack()
        self._bar = self._tqdm(sys.stderr if stream is None else stream) if self.enabled else None
        self._t0 = self._last = time.perf_counter()
        self._next_tenth = 1
        self._phased = False
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        if heartbeat and self.enabled:
            self._beater = threading.Thread(target=self._beat, name=f"progress {label}", daemon=True)
            self._beater.start()

    def _tqdm(self, stream: IO[str]) -> Any:
        isatty = getattr(stream, "isatty", None)
        if not (callable(isatty) and isatty()):
            return None
        from tqdm import tqdm  # only on a terminal: logs and pipes never load it
        from tqdm.contrib.logging import logging_redirect_tqdm

        # log lines printed while the bar is up go above it instead of through it
        self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        # leave=False: the bar clears when done and the summary log line takes its place; no total: no bar to fill
        fmt = "{desc}{postfix} [{elapsed}]" if self.total is None else None
        # follow the terminal's size; on a pty that reports none (0 x 0) tqdm would draw nothing: assume 100 x 20
        size: dict[str, Any] = {"dynamic_ncols": True} if _columns(stream) > 0 else {"ncols": 100, "nrows": 20}
        return tqdm(
            total=self.total, desc=self.label, unit=self.unit, file=stream, leave=False, bar_format=fmt,
            mininterval=self.redraw_s, **size,
        )  # fmt: skip

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self._line_due(time.perf_counter()):
            log.info("%s", self.line())

    def note(self, detail: str) -> None:
        """Say what runs now (shown next to the count) without counting a step."""
        self.detail = detail
        if self._bar is not None:
            self._bar.set_postfix_str(detail)

    def phase(self, name: str) -> None:
        """Start phase ``name`` of a phase-counted loop (unit "phase"): the one before it counts as done."""
        if self._phased:
            self.update()
        self._phased = True
        self.note(name)

    def _line_due(self, now: float) -> bool:
        if self.total is not None and self.done >= self.total:
            return False  # close() says it
        since = now - self._last
        tenth = False
        if self.total is not None and self.total > 0 and self.done * 10 >= self._next_tenth * self.total:
            tenth = True
            self._next_tenth = self.done * 10 // self.total + 1  # a big update may cross several tenths
        if (tenth and since >= self.min_gap_s) or since >= self.every_s:
            self._last = now
            return True
        return False

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            if self._bar is not None:
                self._bar.refresh()  # the elapsed clock moves on a terminal
            elif time.perf_counter() - self._last >= self.every_s:
                self._last = time.perf_counter()
                log.info("%s", self.line())

    def line(self) -> str:
        """``label: done/total units (detail), rate unit/s, ETA s``: what a log shows (no total: time so far)."""
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = _count(self.done, self.unit) if self.total is None else f"{self.done}/{_count(self.total, self.unit)}"
        if self.total is None:
            return f"{self.label}: {self.detail or count}, {_duration(elapsed)} so far"
        text = f"{self.label}: {count}" + (f" ({self.detail})" if self.detail else "")
        if rate > 0:
            text += f", {_rate(rate)} {self.unit}/s, ETA {_duration((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        """Stop the heartbeat, clear the bar and log the summary: ``label: 16 steps in 12 s, 1.3 step/s``."""
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        if self._phased:  # the last phase ends here
            self.done += 1
            self._phased = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()
        if self.enabled:
            elapsed = time.perf_counter() - self._t0
            per_s = self.done / elapsed if elapsed > 0 and self.total is not None else 0.0
            rate = f", {_rate(per_s)} {self.unit}/s" if per_s else ""
            log.info("%s: %s in %s%s", self.label, _count(self.done, self.unit), _duration(elapsed), rate)
            self.enabled = False  # a second close says nothing


@contextmanager
def progress(label: str, total: int | None, unit: str = "step", **kwargs: Any) -> Iterator[Progress]:
    """A ``Progress`` closed on exit (also when the loop raises)."""
    bar = Progress(label, total, unit, **kwargs)
    try:
        yield bar
    finally:
        bar.close()
