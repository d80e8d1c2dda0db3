"""GPU arches and backends: the one table of which backend can target which arch, and the arch parser."""

from __future__ import annotations

import re
from collections.abc import Iterable

from dtcompile.core.errors import UnsupportedError
from dtcompile.core.versions import dist_version

#: Every arch a recipe may name, oldest first.
KNOWN_ARCHS: tuple[str, ...] = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "sm_121")
#: Every backend a recipe may name; onnxruntime is the reference (any machine, arch "any").
REFERENCE_BACKEND = "onnxruntime"
RTX_BACKEND = "tensorrt-rtx"
TRT_BACKEND = "tensorrt"
BACKENDS: tuple[str, ...] = (REFERENCE_BACKEND, RTX_BACKEND, TRT_BACKEND)
#: Arches each TensorRT flavour can target. TensorRT-RTX 1.7's ComputeCapability enum has SM75, SM80, SM86,
#: SM89, SM120 and SM121; Turing (sm_75) has no fp32 GEMM, so graphs with fp32 matmuls (FLUX's RoPE) fail there.
TRT_ARCHS: dict[str, tuple[str, ...]] = {
    "tensorrt-rtx": ("sm_75", "sm_80", "sm_86", "sm_89", "sm_120", "sm_121"),
    "tensorrt": ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"),
}
#: TensorRT flavour -> Python module, distribution name, and the dtcompile extra that installs it.
TRT_MODULES: dict[str, str] = {TRT_BACKEND: "tensorrt", RTX_BACKEND: "tensorrt_rtx"}
TRT_DISTS: dict[str, str] = {TRT_BACKEND: "tensorrt", RTX_BACKEND: "tensorrt-rtx-cu13"}
TRT_EXTRAS: dict[str, str] = {TRT_BACKEND: "trt", RTX_BACKEND: "rtx"}

_ARCH_RE = re.compile(r"sm_(\d+)(\d)")


def parse_arch(arch: str | None) -> tuple[int, int]:
    """``"sm_89"`` -> ``(8, 9)``; ``"sm_120"`` -> ``(12, 0)``. UnsupportedError for anything else."""
    m = _ARCH_RE.fullmatch(arch or "")
    if m is None:
        raise UnsupportedError(f"arch must look like 'sm_89', got {arch!r}")
    return int(m.group(1)), int(m.group(2))


def sm_number(arch: str | None) -> int:
    """``"sm_89"`` -> 89, ``"sm_120"`` -> 120 (for ``min_sm`` comparisons)."""
    major, minor = parse_arch(arch)
    return major * 10 + minor


def arch_order(arch: str) -> tuple[int, str]:
    """Sort key: by SM number, unparseable names last."""
    try:
        return sm_number(arch), arch
    except UnsupportedError:
        return 1 << 30, arch


def cc_name(arch: str) -> str:
    """``"sm_89"`` -> ``"SM89"`` (TensorRT-RTX's ComputeCapability member name)."""
    major, minor = parse_arch(arch)
    return f"SM{major}{minor}"


def gpu_arch() -> str | None:
    """The current CUDA device's arch ("sm_89"), or None without torch, CUDA or a visible device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def trt_flavour_for(arch: str | None, installed: Iterable[str]) -> str | None:
    """The TensorRT flavour, among the ``installed`` ones, that builds and runs engines for ``arch``: tensorrt-rtx
    where it targets the arch (the flavour the recipes use), else datacenter tensorrt (sm_90, sm_100); None when
    neither does or ``arch`` is None."""
    have = set(installed)
    for flavour in ("tensorrt-rtx", "tensorrt"):
        if flavour in have and arch in TRT_ARCHS[flavour]:
            return flavour
    return None


def installed_trt_major(flavour: str) -> int | None:
    """Major version of the installed TensorRT flavour, None when it is not installed (or not a flavour)."""
    dist = TRT_DISTS.get(flavour)
    version = dist_version(dist) if dist else None
    try:
        return int(version.split(".")[0]) if version else None
    except ValueError:
        return None


def is_arch(value: str) -> bool:
    """Whether ``value`` looks like an arch name (``sm_89``), known or not."""
    return _ARCH_RE.fullmatch(value) is not None
