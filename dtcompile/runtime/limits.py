"""Documented ranges of a run's numeric options, checked before any engine loads (pure functions, no torch).

docs/reliability.md lists them. Each check raises ``InputError`` with one line naming the option, the value,
the range and the fix; the CLI (``dtc run``), the Python API and the server call the same functions.
"""

from __future__ import annotations

import math

from dtcompile.core.errors import InputError

#: ``--guidance`` / ``guidance_scale``: the server's range too (serve.protocol). FLUX.1 uses 3.5, SD3 7.0, Wan 5.0.
GUIDANCE_RANGE = (0.0, 100.0)
#: ``--fps`` of an MP4: the writer's rate is this as a fraction with denominator <= 1000, so it plays as asked.
FPS_RANGE = (0.1, 240.0)


def check_number(flag: str, value: float, lo: float, hi: float, what: str = "") -> float:
    """``value`` when it is a finite number in ``lo..hi``; InputError naming ``flag`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{flag} {value!r}: must be a number from {lo:g} to {hi:g}{what}") from None
    if not math.isfinite(number):
        raise InputError(f"{flag} {value}: must be a finite number, from {lo:g} to {hi:g}{what}")
    if not lo <= number <= hi:
        raise InputError(f"{flag} {value:g}: must be from {lo:g} to {hi:g}{what}")
    return number


def check_guidance(value: float | None, flag: str = "--guidance") -> float | None:
    """The guidance scale: None (the pipeline's default) or a finite number in ``GUIDANCE_RANGE``."""
    if value is None:
        return None
    return check_number(flag, value, *GUIDANCE_RANGE, " (typical: FLUX.1 3.5, SD3 7, Wan 5)")


def check_fps(value: float, flag: str = "--fps") -> float:
    """Frames per second of a written MP4: a finite number in ``FPS_RANGE``."""
    return check_number(flag, value, *FPS_RANGE, " frames per second")


def check_run_options(*, guidance: float | None = None, fps: float | None = None) -> None:
    """Every numeric run option at once (the CLI's one call before the run): InputError for the first bad one."""
    check_guidance(guidance)
    if fps is not None:
        check_fps(fps)


__all__ = ["FPS_RANGE", "GUIDANCE_RANGE", "check_fps", "check_guidance", "check_number", "check_run_options"]
