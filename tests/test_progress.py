"""dtcompile.core.progress.Progress: a tqdm bar with rate and ETA on a terminal, periodic ``dtcompile`` log lines
elsewhere, nothing when the log is quiet; and a real pseudo-terminal, which reports no size."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from dtcompile.core import progress as pr

#: tqdm's counter with elapsed<remaining: "3/8 [00:00<00:01, 4.1step/s]"
ETA_BAR = re.compile(r"\d+/8 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal (tqdm draws on it; no descriptor, so no size)."""

    def isatty(self) -> bool:
        return True


def run(bar: pr.Progress, steps: int, pause: float = 0.0) -> None:
    for _ in range(steps):
        time.sleep(pause)
        bar.update()
    bar.close()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dtcompile"]


def test_bar_with_rate_and_eta_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dtcompile")
    term = FakeTerminal()
    run(pr.Progress("calibrate", 8, stream=term), 8, pause=0.05)  # tqdm redraws at most every 0.1 s
    drawn = term.getvalue()
    assert "calibrate:" in drawn and ETA_BAR.search(drawn), drawn
    assert drawn.endswith("\r")  # cleared at the end (leave=False) ...
    assert re.fullmatch(r"calibrate: 8 steps in [\d.]+ s, [\d.]+ step/s", lines(caplog)[-1])  # ... for one line
    assert len(lines(caplog)) == 1  # no periodic lines next to a bar


def test_periodic_lines_off_a_terminal(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="dtcompile")
    monkeypatch.setattr(pr.Progress, "min_gap_s", 0.0)  # every tenth, however fast
    stream = io.StringIO()
    run(pr.Progress("calibrate", 20, stream=stream), 20)
    got = lines(caplog)
    assert stream.getvalue() == ""  # no bar in a pipe or a file
    assert len(got) == 10  # 2/20, 4/20, ... 18/20, then the summary
    assert re.fullmatch(r"calibrate: 6/20 steps, [\d.]+ step/s, ETA [\d.]+ s", got[2]), got
    assert got[-1].startswith("calibrate: 20 steps in ")


def test_lines_are_spaced_and_time_keeps_them_coming(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="dtcompile")
    run(pr.Progress("fast", 100, stream=io.StringIO()), 100)  # every tenth passes within min_gap_s
    assert lines(caplog) == [lines(caplog)[-1]] and lines(caplog)[0].startswith("fast: 100 steps in ")
    caplog.clear()
    monkeypatch.setattr(pr.Progress, "every_s", 0.05)
    run(pr.Progress("slow", 1000, stream=io.StringIO()), 3, pause=0.06)  # no tenth, but time passes
    assert len(lines(caplog)) == 4 and lines(caplog)[0].startswith("slow: 1/1000 steps, ")


def test_phases_and_the_heartbeat_through_one_long_call(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="dtcompile")
    monkeypatch.setattr(pr.Progress, "every_s", 0.5)
    bar = pr.Progress("export transformer", None, "phase", stream=io.StringIO(), heartbeat=True)
    bar.phase("tracing")
    time.sleep(1.3)  # one call that reports nothing: the heartbeat (checked each second) speaks for it
    bar.phase("writing")
    bar.close()
    got = lines(caplog)
    assert re.fullmatch(r"export transformer: tracing, [\d.]+ s so far", got[0]), got
    assert re.fullmatch(r"export transformer: 2 phases in [\d.]+ s", got[-1]), got


@pytest.mark.parametrize("where", ["terminal", "log"])
def test_quiet_log_means_no_bar_and_no_lines(where: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dtcompile")  # what dtc -q and dtc build --quiet set
    stream = FakeTerminal() if where == "terminal" else io.StringIO()
    run(pr.Progress("calibrate", 8, stream=stream), 8)
    assert stream.getvalue() == "" and not caplog.records


def test_a_real_pseudo_terminal_without_a_size_still_gets_a_bar() -> None:
    # A fresh pty reports 0 x 0; tqdm would then draw nothing (`script`, CI runners that allocate a tty).
    code = (
        "import logging, time\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from dtcompile.core.progress import Progress\n"
        "bar = Progress('calibrate', 8)\n"
        "for _ in range(8):\n    time.sleep(0.05)\n    bar.update()\n"
        "bar.close()\n"
    )
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL)
        os.close(follower)
        out = b""
        while chunk := _read(leader):
            out += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
    text = out.decode(errors="replace")
    assert ETA_BAR.search(text), text
    assert "calibrate: 8 steps in " in text


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO once the child has closed its side
        return b""


def test_measured_logs_wall_time_and_peak_rss_also_when_the_phase_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dtcompile")
    with pr.measured("export x: growing"):
        block = bytearray(64 * 2**20)  # touched: resident
        block[::4096] = b"\1" * len(block[::4096])
        time.sleep(0.2)  # at least one sample while it is held
        del block
    with pytest.raises(RuntimeError), pr.measured("export x: failing"):
        raise RuntimeError("boom")
    got = lines(caplog)
    grown = re.fullmatch(
        r"export x: growing took [\d.]+ s, peak RSS (\d+) MiB \(\+(\d+) MiB over its start.*\)", got[0]
    )
    assert grown and int(grown.group(2)) >= 60
    assert got[1].startswith("export x: failing took ")
