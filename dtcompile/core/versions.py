"""Installed package versions (never imports the packages themselves)."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

#: dtcompile's own version (``dtcompile.__version__``).
DTC_VERSION = "0.1.0"

#: Name in the manifest -> distribution name: the tools whose versions shape an artifact (and its key).
TOOLS: dict[str, str] = {
    "dtcompile": "dtcompile",
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "tensorrt_rtx": "tensorrt-rtx-cu13",
    "tensorrt": "tensorrt",
    "modelopt": "nvidia-modelopt",
}


def dist_version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.14.1.post2"`` -> ``(10, 14, 1)``: the leading numeric parts."""
    out = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def tool_versions() -> dict[str, str | None]:
    """Versions of ``TOOLS`` (None where not installed), plus a digest of dtcompile's own source, so a code
    change between releases also changes the artifact key."""
    out: dict[str, str | None] = {name: dist_version(dist) for name, dist in TOOLS.items()}
    out["dtcompile_source"] = source_digest()
    return out


def source_digest() -> str:
    """16 hex digits over every .py file of the dtcompile package (path and content)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
