"""Reading a run's input files: the reference image of an editing family (``dtc run --image``, the server's
``/v1/images/edits`` upload), checked before anything is decoded.

Input: a path or the uploaded bytes. Output: an RGB PIL image. Refused in one line (``InputError``): a path that
is not a regular file (a FIFO would block the read forever, a device never end), a file that is not an image,
and an image whose header claims more than ``MAX_REFERENCE_PIXELS`` (read from the header: a 20000 x 20000 PNG
or a JPEG claiming 65000 x 65000 is refused before Pillow allocates it). A 16-bit grayscale PNG is scaled to
8 bits (``round(v / 257)``: its 8-bit twin exactly), where Pillow's own conversion would clip it.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

from dtcompile.core.errors import InputError

#: The largest reference image read (pixels, from the header): 8192 x 8192. It is resized to the generation size,
#: at most 16384 px a side, and decoding it takes 4 bytes a pixel.
MAX_REFERENCE_PIXELS = 8192 * 8192
#: Longest side of a reference image read.
MAX_REFERENCE_SIDE = 16384
#: The largest reference file read, in bytes (a PNG of MAX_REFERENCE_PIXELS without compression is 192 MiB).
MAX_REFERENCE_BYTES = 256 << 20

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}  # fmt: skip


def _read_file(path: Path, flag: str) -> bytes:
    """The bytes of regular file ``path``: opened without blocking (a FIFO with no writer), checked with fstat."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{flag} {path}: is a folder, not an image file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise InputError(f"{flag} {path}: is {kind}, not an image file; pass a .png, .jpg or .webp file")
        if st.st_size > MAX_REFERENCE_BYTES:
            raise InputError(
                f"{flag} {path}: {st.st_size} bytes is above the {MAX_REFERENCE_BYTES >> 20} MiB limit for a "
                "reference image; pass a smaller image"
            )
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read(MAX_REFERENCE_BYTES + 1)
    finally:
        if fd >= 0:
            os.close(fd)


def _too_large(width: int, height: int, max_pixels: int = MAX_REFERENCE_PIXELS) -> bool:
    return width * height > max_pixels or max(width, height) > MAX_REFERENCE_SIDE


def _limit_text(max_pixels: int = MAX_REFERENCE_PIXELS) -> str:
    side = int(max_pixels**0.5)
    return f"the limit is {side}x{side} = {max_pixels} pixels"


def _to_rgb(img: Any) -> Any:
    """RGB, 8 bits a channel; a 16-bit grayscale image scaled by 1/257 (Pillow's own conversion clips at 255)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        arr = np.asarray(img).astype(np.float64)
        if img.mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):  # 32-bit data: not 16-bit
            arr = np.clip(arr, 0, 65535)
        gray = np.rint(arr / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header by the format's own Pillow plugin, without ``Image.open``'s bomb check
    (which refuses to say the size); None when no plugin reads it."""
    from PIL import Image

    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(data[:16]):
                continue
            return tuple(factory(io.BytesIO(data), "").size)  # type: ignore[return-value]
        except Exception:  # noqa: BLE001, S112 - a plugin that cannot read it: try the next one
            continue
    return None


#: Pillow formats the server takes for an edit (``formats=WEB_FORMATS``; MPO: a camera JPEG with a second picture).
WEB_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})


def read_reference_image(
    source: str | Path | bytes,
    *,
    flag: str = "--image",
    name: str | None = None,
    max_pixels: int = MAX_REFERENCE_PIXELS,
    formats: frozenset[str] | None = None,
    fit: tuple[int, int] | None = None,
) -> Any:
    """A reference image as RGB PIL, from a path or the uploaded bytes; InputError naming ``flag`` and the file
    (``name`` for an upload) when it is not a regular file, not an image, or larger than the documented limit.

    ``max_pixels``: a lower pixel limit than ``MAX_REFERENCE_PIXELS`` (the server's). ``formats``: the Pillow
    formats taken (``WEB_FORMATS``: PNG, JPEG, WebP), checked from the header, and CMYK refused, before anything
    is decoded. ``fit``: (width, height) the image is resized to (Lanczos, as the editing pipeline does) right
    after decoding, so only that copy is kept."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), name or "the upload"
        if not data:
            raise InputError(f"{flag}: {where} is empty")
    else:
        data, where = _read_file(Path(source), flag), str(source)
    if len(data) > MAX_REFERENCE_BYTES:
        raise InputError(f"{flag} {where}: above the {MAX_REFERENCE_BYTES >> 20} MiB limit for a reference image")
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as img:  # reads the header only
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is lower
            width, height = img.size
            if _too_large(width, height, max_pixels):
                raise InputError(
                    f"{flag} {where}: {width}x{height} pixels is too large for a reference image "
                    f"({_limit_text(max_pixels)}); pass a smaller image"
                )
            if formats is not None:
                if img.format not in formats:
                    raise InputError(
                        f"{flag} {where}: a {img.format or 'unknown'} image; pass a PNG, JPEG or WebP file"
                    )
                if img.mode == "CMYK":
                    raise InputError(f"{flag} {where}: a CMYK image; pass an RGB (or grayscale) PNG, JPEG or WebP")
            img.load()
            rgb = _to_rgb(img)
            if fit is not None and rgb.size != fit:
                rgb = rgb.resize(fit, Image.Resampling.LANCZOS)
            return rgb
    except Image.DecompressionBombError as exc:  # Pillow's own check at open, past 2x its limit
        m = re.search(r"\((\d+) pixels\)", str(exc))
        dims = _header_size(data)
        size = f"{dims[0]}x{dims[1]} pixels" if dims else f"{m.group(1)} pixels" if m else "its size"
        raise InputError(
            f"{flag} {where}: {size} is too large for a reference image ({_limit_text(max_pixels)}); pass a smaller "
            "image"
        ) from None
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        why = type(exc).__name__
        raise InputError(f"{flag} {where}: not a readable image ({why}); pass a .png, .jpg or .webp file") from None


__all__ = ["MAX_REFERENCE_BYTES", "MAX_REFERENCE_PIXELS", "MAX_REFERENCE_SIDE", "WEB_FORMATS", "read_reference_image"]
