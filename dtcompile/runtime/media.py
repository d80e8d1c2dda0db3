"""Writing what a run made: images through PIL, videos as H.264 MP4 through PyAV (its bundled FFmpeg, no
system ffmpeg) or as a folder of PNG frames. Every writer writes next to the target and renames, so a failure
leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

from dtcompile.core.errors import MissingDependencyError, UnsupportedError

#: Image formats an ``--out`` file may name, by suffix.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_SUFFIXES = (".mp4",)


def video_uint8(video: Any) -> Any:
    """A video (frames x H x W x 3 floats in [0, 1], or a list of PIL images) as a uint8 numpy array."""
    import numpy as np

    if isinstance(video, list):
        return np.stack([np.asarray(frame.convert("RGB")) for frame in video])
    arr = np.asarray(video)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UnsupportedError(f"a video must be frames x height x width x 3, got shape {arr.shape}")
    return arr


def _temp_name(out: Path, suffix: str = "") -> Path:
    """A temp name next to ``out`` that ``core.files.collect_stale`` removes once this process is dead (a SIGKILL
    while writing); what dead writers left there before is collected now."""
    from dtcompile.core.files import collect_stale

    collect_stale(out)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}-partial{suffix}")


def _discard(tmp: Path) -> None:
    """Remove a half-written temp file; on a read-only disk even a missing one cannot be unlinked (EROFS), and
    that must not replace the error the caller reports (which names the output, not the temp file)."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def write_image(image: Any, out: Path, image_format: str) -> None:
    """``image`` (PIL) to ``out`` in ``image_format``, atomically."""
    tmp = _temp_name(out)
    try:
        image.save(tmp, format=image_format)
        tmp.replace(out)
    except OSError as exc:  # a full or read-only disk: nothing half-written, the error names the file
        _discard(tmp)
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from None


def write_mp4(video: Any, out: Path, fps: float) -> int:
    """H.264 (yuv420p, libx264) MP4 at ``fps``; returns the frame count written."""
    try:
        import av
    except ImportError:
        raise MissingDependencyError("av", "video", why="needed to write MP4") from None
    frames = video_uint8(video)
    n, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise UnsupportedError(f"H.264 needs even sizes; the video is {width}x{height}: write PNG frames instead")
    tmp = _temp_name(out, ".mp4")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "17"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        tmp.replace(out)
    except OSError as exc:
        _discard(tmp)
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from None
    except BaseException:
        _discard(tmp)
        raise
    return n


def write_frames(video: Any, folder: Path) -> int:
    """One PNG per frame (``frame_0000.png`` ...) into ``folder`` (created; must not hold files)."""
    from PIL import Image

    frames = video_uint8(video)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _temp_name(folder)  # collects what a killed writer left
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"frame_{i:04d}.png")
        if folder.exists():
            folder.rmdir()  # empty (checked before the run); a non-empty one raises and is left alone
        tmp.rename(folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(folder)) from None
    return len(frames)
