"""`dtc bench`: an artifact's engines against the plain diffusers pipeline, interleaved, in one process.

Input: an artifact folder (its manifest names the source pipeline, the dtype and the shapes).
Output: a report dict (JSON-ready): per backend the per-step latency (median, p90), end-to-end latency,
images/s, host and device memory, the ratio of each to the PyTorch baseline, and the build cost recorded in
the manifest; ``format_report`` renders it as a table and ``write_report`` writes JSON and, with matplotlib,
a PNG next to it.

How it measures: the baseline is the artifact's source pipeline loaded with diffusers in the artifact's dtype
on the engine's device (torch transformer); the engine pipeline is a runtime ``Session``'s. Every
transformer call is timed by forward hooks (CUDA events on a GPU, ``time.perf_counter_ns`` on the CPU); a
step is the calls of one denoising step. After warm-up, the contenders run repeat by repeat, alternating
their order, on the same prompt, seed and size. Host memory is the RSS a contender added over its load and
warm-up (memory-mapped weights count once touched) plus the largest RSS rise during one of its timed runs
(sampled every 50 ms); device memory likewise from the CUDA driver's used memory (load + warm-up) and torch's
peak allocation (runs). One process holds every contender, so these are attributions, not isolated
footprints.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import ArtifactError, UnsupportedError
from dtcompile.core.metrics import psnr
from dtcompile.core.threads import torch_threads
from dtcompile.manifest import EngineEntry, Manifest
from dtcompile.models import adapter_for
from dtcompile.models.base import GenerationRequest
from dtcompile.runtime.residency import swap_summary

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dtcompile.models.base import ModelAdapter

log = logging.getLogger("dtcompile.bench")

BASELINE = "pytorch"
SCHEMA = "dtc-bench/1"
DEFAULT_PROMPT = "a red fox in the snow, detailed oil painting"
# Metrics compared with the baseline as value / baseline value (for images/s above 1 is faster, for the rest below).
RATIO_METRICS = (
    "step_median_ms",
    "step_p90_ms",
    "e2e_median_s",
    "e2e_p90_s",
    "images_per_s",
    "host_mb",
    "device_mb",
)


class StepTimer:
    """Times every forward call of a module with forward hooks: CUDA events on a GPU, perf counters otherwise."""

    def __init__(self, module: Any, cuda: bool, others: tuple[Any, ...] = ()) -> None:
        import torch

        self.cuda = cuda
        self._torch = torch
        self._marks: list[tuple[Any, Any]] = []
        self._open: Any = None
        self._handles = [
            h
            for m in (module, *others)  # others: the pipeline's other denoisers (Wan2.2's transformer_2)
            for h in (m.register_forward_pre_hook(self._start), m.register_forward_hook(self._stop))
        ]

    def _now(self) -> Any:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    def _start(self, *_: Any) -> None:
        self._open = self._now()

    def _stop(self, *_: Any) -> None:
        self._marks.append((self._open, self._now()))

    def reset(self) -> None:
        self._marks.clear()

    def durations_ms(self) -> list[float]:
        """Milliseconds of each call since the last reset (synchronizes the GPU first)."""
        if self.cuda:
            self._torch.cuda.synchronize()
            return [float(a.elapsed_time(b)) for a, b in self._marks]
        return [(b - a) / 1e6 for a, b in self._marks]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class Contender:
    """One pipeline under test and everything measured about it."""

    name: str
    backend: str
    arch: str
    pipe: Any
    module: Any
    device: Any
    timer: StepTimer
    load_s: float
    warmup_s: float = 0.0
    resident_host_mb: float = 0.0  # RSS growth over load + warm-up (lazily mapped weights are touched by then)
    resident_device_mb: float | None = None
    step_ms: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    run_host_mb: list[float] = field(default_factory=list)
    run_device_mb: list[float] = field(default_factory=list)
    calls_per_step: int = 0
    image: Any = None
    swap_s: list[float] = field(default_factory=list)  # per timed run: engine loads + releases (--residency sequential)
    swaps: list[Any] = field(default_factory=list)  # runtime.residency.Swap of the timed runs


# --- memory --------------------------------------------------------------------------------------------------


def _cuda(device: Any) -> bool:
    return getattr(device, "type", str(device)) == "cuda"


def _device_used_mb(device: Any) -> float | None:
    """Device-wide used memory (driver view: includes TensorRT's own allocations); None off the GPU."""
    if not _cuda(device):
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


class _HostPeak:
    """Peak RSS rise over the RSS at entry, sampled in the background."""

    def __enter__(self) -> _HostPeak:
        from dtcompile.core.progress import _PeakSampler, rss_bytes

        gc.collect()
        self.start = rss_bytes()
        self._sampler = _PeakSampler(interval=0.05)
        self._sampler.start()
        self.rise_mb = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        peak = self._sampler.stop()
        self.rise_mb = max(0.0, (peak - self.start) / 2**20)


# --- loading ---------------------------------------------------------------------------------------------------


def baseline_source(manifest: Manifest, *, verify: bool = True) -> tuple[Path, bool | None]:
    """The artifact's source pipeline folder, and whether its engine component still hashes as at build time.

    ``None`` for the match when ``verify`` is off or the manifest has no digest. Built-ins are (re)generated,
    local folders must still exist, hub ids are fetched (``model.revision`` honoured).
    """
    from dtcompile.recipe import ModelSpec
    from dtcompile.stages.load import resolve_source, source_dir

    src = manifest.source
    folder = source_dir(resolve_source(ModelSpec(source=src.model, revision=src.revision)))
    digest = src.component_sha256
    comp_dir = folder / manifest.main_component()
    if not verify or not digest or digest == "unknown" or not comp_dir.is_dir():
        return folder, None
    from dtcompile.core.digests import sha256_tree

    return folder, sha256_tree(comp_dir) == digest


def _load_baseline(manifest: Manifest, device: Any, folder: Path) -> tuple[Any, Any]:
    import diffusers
    import torch

    dtype = getattr(torch, manifest.dtype)
    pipe_cls = getattr(diffusers, manifest.source.pipeline_class)
    diffusers.utils.logging.disable_progress_bar()
    pipe = pipe_cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe, getattr(pipe, manifest.main_component())


@contextlib.contextmanager
def _resident(out: dict[str, float | None]) -> Iterator[None]:
    """Resident host (RSS) and device (driver) memory growth over the block, into ``out``."""
    import torch

    from dtcompile.core.progress import rss_bytes

    gc.collect()
    host0 = rss_bytes()
    dev0 = _device_used_mb("cuda") if torch.cuda.is_available() else None
    yield
    gc.collect()
    out["host_mb"] = max(0.0, (rss_bytes() - host0) / 2**20)
    dev1 = _device_used_mb("cuda") if dev0 is not None else None
    out["device_mb"] = dev1 - dev0 if dev1 is not None and dev0 is not None else None


# --- running ---------------------------------------------------------------------------------------------------


def _run_once(c: Contender, adapter: ModelAdapter, request: GenerationRequest, record: bool) -> None:
    import torch

    steps = request.steps  # a block-cache run begins in the pipeline's call (Session.prepare_call)
    cuda = _cuda(c.device)
    c.timer.reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    with _HostPeak() as host:
        t0 = time.perf_counter()
        out = c.pipe(**adapter.call_kwargs(request))
        if cuda:
            torch.cuda.synchronize()
        e2e = time.perf_counter() - t0
    calls = c.timer.durations_ms()
    owner = getattr(c.pipe, "_dtc_session", None)  # an engine pipeline's Session: its residency's swaps
    swaps = owner.residency.take_swaps() if owner is not None else []
    if not record:
        return
    c.swaps.extend(swaps)
    c.swap_s.append(sum(s.seconds for s in swaps))
    if not calls or len(calls) % steps:
        raise ArtifactError(f"{c.name}: the pipeline made {len(calls)} transformer calls for {steps} steps")
    per = len(calls) // steps
    c.calls_per_step = per
    c.step_ms.extend(sum(calls[i : i + per]) for i in range(0, len(calls), per))
    c.e2e_s.append(e2e)
    c.run_host_mb.append(host.rise_mb)
    if cuda:
        c.run_device_mb.append((torch.cuda.max_memory_allocated() - alloc0) / 2**20)
    c.image = adapter.output_media(out)[0]


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _psnr(a: Any, b: Any) -> float | None:
    """PSNR of two 8-bit images (videos: their uint8 frames); None when one is missing or the sizes differ."""
    import numpy as np

    from dtcompile.runtime.media import video_uint8

    if a is not None and b is not None and np.asarray(a).ndim == 4:  # videos: frames x H x W x 3 in [0, 1]
        a, b = video_uint8(a), video_uint8(b)

    if a is None or b is None or np.asarray(a).shape != np.asarray(b).shape:
        return None
    return psnr(np.asarray(a), np.asarray(b), peak=255.0)


def _summary(c: Contender, batch: int) -> dict[str, Any]:
    e2e_med = _percentile(c.e2e_s, 50)
    host = c.resident_host_mb + max(c.run_host_mb, default=0.0)
    device = None if c.resident_device_mb is None else c.resident_device_mb + max(c.run_device_mb, default=0.0)
    return {
        "name": c.name,
        "backend": c.backend,
        "arch": c.arch,
        "device": str(c.device),
        "steps_timed": len(c.step_ms),
        "calls_per_step": c.calls_per_step,
        "step_median_ms": _percentile(c.step_ms, 50),
        "step_p90_ms": _percentile(c.step_ms, 90),
        "step_min_ms": min(c.step_ms),
        "e2e_median_s": e2e_med,
        "e2e_p90_s": _percentile(c.e2e_s, 90),
        "images_per_s": batch / e2e_med,
        "host_mb": host,
        "host_resident_mb": c.resident_host_mb,
        "host_run_peak_mb": max(c.run_host_mb, default=0.0),
        "device_mb": device,
        "device_resident_mb": c.resident_device_mb,
        "device_run_peak_mb": max(c.run_device_mb) if c.run_device_mb else None,
        "load_s": c.load_s,
        "warmup_s": c.warmup_s,
        "step_ms": c.step_ms,
        "e2e_s": c.e2e_s,
        "swap_median_s": _percentile(c.swap_s, 50) if any(c.swap_s) else None,
        "swaps": swap_summary(c.swaps) if c.swaps else None,
    }


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per non-baseline result: value / baseline value of each RATIO_METRICS entry (None where n/a)."""
    base = next(r for r in results if r["name"] == BASELINE)
    out: dict[str, dict[str, float | None]] = {}
    for r in results:
        if r["name"] == BASELINE:
            continue
        row: dict[str, float | None] = {}
        for m in RATIO_METRICS:
            a, b = r.get(m), base.get(m)
            row[m] = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        row["step_speedup"] = base["step_median_ms"] / r["step_median_ms"] if r["step_median_ms"] else None
        out[r["name"]] = row
    return out


def build_profile(manifest: Manifest) -> dict[str, Any]:
    """Build cost recorded in the manifest: wall time and peak RSS per stage, per engine build time and size."""
    stages: list[dict[str, Any]] = [
        {"name": s.name, "wall_s": s.wall_s, "peak_rss_mb": s.peak_rss_mb} for s in manifest.stages
    ]
    engines = [
        {"component": name, "backend": e.backend, "arch": e.arch, "size_mb": e.size / 2**20, "build_s": e.build_s}
        for name, comp in manifest.components.items()
        for e in comp.engines
    ]
    return {
        "stages": stages,
        "total_s": sum(s["wall_s"] for s in stages),
        "peak_rss_mb": max((s["peak_rss_mb"] for s in stages), default=0.0),
        "engines": engines,
    }


def _machine(device: Any) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if _cuda(device):
        import torch

        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _check_options(backends: tuple[str, ...] | list[str], steps: int, batch: int, repeat: int, warmup: int,
                   threads: int | None) -> None:  # fmt: skip
    from dtcompile.runtime.run import BACKEND_CHOICES

    for b in backends:
        if b not in BACKEND_CHOICES:
            raise UnsupportedError(f"--backend {b}: unknown backend; choose one of: {', '.join(BACKEND_CHOICES)}")
    if threads is not None and threads < 1:
        raise UnsupportedError(f"--threads {threads}: must be >= 1 (or left out for the libraries' defaults)")
    if steps < 1 or repeat < 1 or warmup < 0 or batch < 1:
        raise UnsupportedError(
            f"steps {steps}, repeat {repeat}, batch {batch} must be >= 1 and warmup {warmup} >= 0; fix the option"
        )


@dataclass
class _Session:
    """What every contender runs with, and the contenders loaded so far (one per (backend, arch))."""

    prompt: str
    steps: int
    batch: int
    size: tuple[int, int]
    seed: int
    guidance: float
    text_len: int
    warmup: int
    adapter: ModelAdapter
    frames: int | None = None  # video artifacts
    experts: tuple[str, ...] = ()  # denoisers besides the main one, timed with it
    contenders: list[Contender] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)

    def run(self, c: Contender, steps: int, *, record: bool) -> None:
        import torch

        request = GenerationRequest(
            self.prompt,
            steps,
            *self.size,
            generator=torch.Generator("cpu").manual_seed(self.seed),
            guidance=self.guidance,
            text_len=self.text_len,
            images_per_prompt=self.batch,
            frames=self.frames,
        )
        _run_once(c, self.adapter, request, record=record)

    def admit(self, name: str, backend: str, arch: str, load: Any) -> Contender | None:
        """Load a contender and warm it up, measuring the time of each and the memory that stays resident."""
        mem: dict[str, float | None] = {}
        with _resident(mem):
            t0 = time.perf_counter()
            pipe, module, entry, device = load()
            load_s = time.perf_counter() - t0
            entry = entry if entry is None or isinstance(entry, EngineEntry) else EngineEntry.model_validate(entry)
            key = (entry.backend, entry.arch) if entry else (backend, arch)
            if key in self.seen:  # e.g. "auto" and the backend it resolved to
                return None
            self.seen.add(key)
            c = Contender(
                key[0] if entry else name, *key, pipe, module, device,
                StepTimer(module, _cuda(device), tuple(getattr(pipe, n) for n in self.experts)), load_s,
            )  # fmt: skip
            self.contenders.append(c)
            t0 = time.perf_counter()
            for _ in range(self.warmup):
                self.run(c, 1, record=False)
            c.warmup_s = time.perf_counter() - t0
        c.resident_host_mb, c.resident_device_mb = mem["host_mb"] or 0.0, mem["device_mb"]
        log.info("[bench] %s: loaded in %.1f s, warm-up %.1f s, +%.0f MB resident", c.name, load_s, c.warmup_s,
                 c.resident_host_mb)  # fmt: skip
        return c


@dataclass
class _Measured:
    """The contenders timed (the baseline first), and where the baseline came from."""

    everyone: list[Contender]
    baseline: Contender
    device: Any
    folder: Path
    matches: bool | None


def _measure(
    session: _Session, manifest: Manifest, artifact_dir: Path, backends: Any, repeat: int, verify: bool,
    threads: int | None, residency: str = "all",
) -> _Measured:  # fmt: skip
    """Load every backend's contender, then the PyTorch baseline, and time ``repeat`` alternating rounds."""
    import torch

    try:
        with torch.inference_mode():
            for b in backends:
                session.admit(b, b, "", lambda b=b: _engine_pipeline(artifact_dir, b, verify, threads, residency))
            devices = {str(c.device) for c in session.contenders}
            if len(devices) > 1:
                raise UnsupportedError(
                    f"--backend: the chosen engines run on different devices ({', '.join(sorted(devices))}); "
                    "the baseline runs on one: bench one device at a time"
                )
            device = session.contenders[0].device
            folder, matches = baseline_source(manifest, verify=verify)
            if matches is False:
                log.warning(
                    "[bench] the source model's %s no longer hashes as when the artifact was built: speeds "
                    "compare, images will differ",
                    manifest.main_component(),
                )
            baseline = session.admit(
                BASELINE, BASELINE, "-", lambda: (*_load_baseline(manifest, device, folder), None, device)
            )
            assert baseline is not None  # its key is new: nothing to deduplicate
            everyone = [baseline, *(c for c in session.contenders if c is not baseline)]
            for r in range(repeat):
                for c in everyone if r % 2 == 0 else everyone[::-1]:
                    session.run(c, session.steps, record=True)
                    log.info("[bench] repeat %d/%d %s: %.3f s", r + 1, repeat, c.name, c.e2e_s[-1])
    finally:
        for c in session.contenders:
            c.timer.remove()
    return _Measured(everyone, baseline, device, folder, matches)


def bench_artifact(
    artifact_dir: Path,
    backends: tuple[str, ...] | list[str] = ("auto",),
    *,
    steps: int = 4,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    repeat: int = 3,
    warmup: int = 1,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    guidance: float = 3.5,
    verify: bool = True,
    threads: int | None = None,
    residency: str = "all",
) -> dict[str, Any]:
    """Benchmark ``artifact_dir``'s engines for ``backends`` against PyTorch; returns the report dict.

    ``warmup`` 1-step runs per contender precede ``repeat`` timed runs of ``steps`` steps each. ``threads``
    sets torch's intra-op threads and onnxruntime's (None: each library's default). ``residency``: the engine
    pipelines' (``runtime/residency.py``); with ``sequential`` each run's engine loads and releases are timed
    (``swap_median_s``, ``swaps`` per component).
    """
    from dtcompile.runtime.session import Session

    artifact_dir = Path(artifact_dir)
    _check_options(backends, steps, batch, repeat, warmup, threads)
    probe = Session(artifact_dir, verify=verify)  # the manifest, read once; engines load per contender
    checked = probe.request(prompt, steps=steps, height=height, width=width, frames=frames, guidance=guidance,
                            images_per_prompt=batch)  # fmt: skip
    manifest = probe.manifest
    height, width, frames = checked.height, checked.width, checked.frames
    text_len = manifest.shapes["text_len"].opt

    import diffusers  # noqa: F401  (imported before any load is measured)
    import torch

    if "onnxruntime" in backends or "auto" in backends:
        with contextlib.suppress(ImportError):
            import onnxruntime  # noqa: F401  (its import is not part of a contender's load)

    _preimport(artifact_dir / "pipeline")
    adapter = adapter_for(manifest.source.pipeline_class)
    session = _Session(prompt, steps, batch, (height, width), seed, guidance, text_len, warmup, adapter, frames,
                       tuple(manifest.denoiser_names()[1:]))  # fmt: skip
    with torch_threads(threads):  # put back after: a caller's process goes on (tests, a server)
        m = _measure(session, manifest, artifact_dir, backends, repeat, verify, threads, residency)
        torch_count = torch.get_num_threads()

    results = [_summary(c, batch) for c in m.everyone]
    for c, res in zip(m.everyone, results, strict=True):
        res["psnr_db_vs_pytorch"] = None if c is m.baseline else _psnr(c.image, m.baseline.image)
    return {
        "schema": SCHEMA,
        "artifact": str(artifact_dir),
        "name": manifest.name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(m.device),
        "settings": {
            "backends": list(backends),
            "steps": steps,
            "batch": batch,
            "height": height,
            "width": width,
            "frames": frames,
            "text_len": text_len,
            "repeat": repeat,
            "warmup": warmup,
            "prompt": prompt,
            "seed": seed,
            "guidance": guidance,
            "dtype": manifest.dtype,
            "device": str(m.device),
            "timer": "cuda_events" if _cuda(m.device) else "perf_counter_ns",
            "threads": torch_count,  # torch's; onnxruntime's too when --threads is given
            "threads_set": threads is not None,
            "residency": residency,
            "baseline_source": str(m.folder),
            "baseline_matches_artifact": m.matches,
        },
        "results": results,
        "ratios": ratios(results),
        "build": build_profile(manifest),
        "versions": manifest.versions,
    }


def _preimport(pipeline_dir: Path) -> None:
    """Import every component class of the pipeline, so that neither contender's load pays the lazy imports."""
    import importlib
    import json

    try:
        index = json.loads((pipeline_dir / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # the Session reports the missing pipeline with its own message
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            with contextlib.suppress(ImportError, AttributeError):
                getattr(importlib.import_module(value[0]), value[1])


def _engine_pipeline(
    artifact_dir: Path, backend: str, verify: bool, threads: int | None, residency: str = "all"
) -> tuple[Any, ...]:
    from dtcompile.runtime.session import Session

    session = Session(artifact_dir, backend, verify=verify, threads=threads, residency=residency)
    pipe, module, entry = session.load(), session.module, session.entry
    return pipe, module, entry, module.device


# --- output ----------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table: one row per backend, ratios to PyTorch, then the build cost."""
    s = report["settings"]
    lines = [
        f"dtc bench {report['name']}: {s['steps']} steps, batch {s['batch']}, {s['height']}x{s['width']}, "
        + (f"{s['frames']} frames, " if s.get("frames") else "")
        + f"text {s['text_len']}, {s['dtype']} on {s['device']} (threads: {s['threads']}); {s['repeat']} interleaved "
        f"repeats after {s['warmup']} warm-up ({s['timer']})",
        f"{'backend':<14}{'step med ms':>12}{'step p90 ms':>12}{'e2e med s':>11}{'e2e p90 s':>11}{'images/s':>10}"
        f"{'host MB':>9}{'device MB':>11}{'load s':>8}{'PSNR dB':>9}",
    ]
    for r in report["results"]:
        psnr = r.get("psnr_db_vs_pytorch")
        lines.append(
            f"{r['name']:<14}{r['step_median_ms']:>12.2f}{r['step_p90_ms']:>12.2f}{r['e2e_median_s']:>11.3f}"
            f"{r['e2e_p90_s']:>11.3f}{r['images_per_s']:>10.3f}{r['host_mb']:>9.0f}{_fmt(r['device_mb'], '.0f'):>11}"
            f"{r['load_s']:>8.1f}{_fmt(psnr, '.1f', '-'):>9}"
        )
    for name, q in report["ratios"].items():
        lines.append(
            f"{name + '/' + BASELINE:<14}{_fmt(q['step_median_ms'], '.3f'):>12}{_fmt(q['step_p90_ms'], '.3f'):>12}"
            f"{_fmt(q['e2e_median_s'], '.3f'):>11}{_fmt(q['e2e_p90_s'], '.3f'):>11}{_fmt(q['images_per_s'], '.3f'):>10}"
            f"{_fmt(q['host_mb'], '.2f'):>9}{_fmt(q['device_mb'], '.2f'):>11}"
            f"   (ratio; step speedup {_fmt(q['step_speedup'], '.2f')}x)"
        )
    for r in report["results"]:
        if r.get("swaps"):
            per = ", ".join(f"{n} {w['loads']} loads {w['load_s']:.2f} s, {w['releases']} releases {w['release_s']:.2f} s"
                            for n, w in r["swaps"].items())  # fmt: skip
            lines.append(f"{r['name']} swaps (residency {s.get('residency')}, median {r['swap_median_s']:.2f} s per "
                         f"run; all timed runs): {per}")  # fmt: skip
    b = report["build"]
    if b["stages"]:
        stages = ", ".join(f"{st['name']} {st['wall_s']:.1f} s / {st['peak_rss_mb']:.0f} MB" for st in b["stages"])
        lines.append(f"build (manifest): {stages}; total {b['total_s']:.1f} s, peak RSS {b['peak_rss_mb']:.0f} MB")
    built = [e for e in b["engines"] if e["build_s"] is not None]
    manifest_components = {e.get("component") for e in b["engines"]}
    if built:
        lines.append(
            "engines: "
            + ", ".join(
                f"{e['component'] + ' ' if len(manifest_components) > 1 else ''}{e['backend']} {e['arch']} "
                f"{e['build_s']:.1f} s ({e['size_mb']:.1f} MB)"
                for e in built
            )
        )
    return "\n".join(lines)


def plot_report(report: dict[str, Any], png: Path) -> str | None:
    """Bar charts of per-step and end-to-end latency per backend; returns a one-line note if not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'dtcompile[bench]'): no PNG written"
    results = report["results"]
    names = [r["name"] for r in results]
    s = report["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (med, p90, unit, title) in zip(
        axes,
        (
            ("step_median_ms", "step_p90_ms", "ms", "transformer step"),
            ("e2e_median_s", "e2e_p90_s", "s", f"end to end ({s['steps']} steps)"),
        ),
        strict=True,
    ):
        m = [r[med] for r in results]
        err = [[0.0] * len(results), [r[p90] - r[med] for r in results]]
        bars = ax.bar(names, m, yerr=err, capsize=4, color=["#888888", *["#3b7dd8"] * (len(results) - 1)])
        for bar, r in zip(bars[1:], results[1:], strict=True):
            ratio = report["ratios"][r["name"]][med]
            ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, r[p90]), ha="center",
                        va="bottom", xytext=(0, 3), textcoords="offset points")  # fmt: skip
        ax.set(ylabel=f"median latency ({unit}); whisker: p90", title=title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{report['name']}: {s['height']}x{s['width']}, batch {s['batch']}, {s['dtype']}, {s['device']} "
        "(ratio = backend / pytorch)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return None


def write_report(report: dict[str, Any], json_path: Path) -> tuple[list[Path], str | None]:
    """Write the JSON (atomically) and the PNG next to it; returns the paths written and a note if no PNG."""
    import json
    import math

    def clean(value: Any) -> Any:  # JSON has no inf/nan (a bit-identical image has infinite PSNR)
        if isinstance(value, float) and not math.isfinite(value):
            return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(clean(report), indent=1) + "\n")
    tmp.replace(json_path)
    written = [json_path]
    png = json_path.with_suffix(".png")
    note = plot_report(report, png)
    if note is None:
        written.append(png)
    return written, note
