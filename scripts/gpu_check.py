#!/usr/bin/env python
"""GPU acceptance check: what the CPU suite cannot show, run on a machine with an NVIDIA GPU (docs/gpu-check.md).

Phases, each timed; a failure is recorded and the next phase runs (a phase whose input failed is SKIP):

1. ``environment``: nvidia-smi's GPU and driver, torch and its CUDA, the compute capability (sm_XY), which
   TensorRT flavours import (tensorrt, tensorrt_rtx) and their versions, the flavour used below (tensorrt-rtx
   where it targets this arch, else datacenter tensorrt: sm_90, sm_100). FAIL when no flavour targets this GPU.
2. ``build <recipe>``: ``dtc build`` of each tiny family recipe for this GPU only
   (``--set engine.backends=[onnxruntime, FLAVOUR] --set engine.targets=[sm_XY]``): tiny-flux, tiny-flux-fp8
   (sm_89+), tiny-sd3, tiny-wan21, tiny-flux-components and the four cache recipes.
3. ``parity <recipe>``: every engine of the artifact against its own ONNX graph on onnxruntime (seeded inputs at
   the profile's opt shapes), then the pipeline run on each backend with the same prompt and seed: rel L2 of
   every step's noise prediction and PSNR of the image (cache recipes: with the cache off and on).
4. ``refit``: tiny-flux built refittable on this GPU, ``dtc refit --lora`` on its engine, against a fresh build
   with the LoRA fused (tests/fixtures/engine_parity.py holds the tolerances).
5. ``gpu tests``: ``pytest -m gpu tests/``, every gpu-marked test.
6. ``bench flux-realwidth`` (not with ``--quick``): recipes/flux-realwidth.yaml (545.5M parameters, 2.1 GB of
   fp32 weights; the build peaks near 10 GB of host RAM) built for this GPU, then ``dtc bench`` against PyTorch.

Ends with one summary table (phase, status, seconds, key figure or reason) and a JSON report (``--json``,
written after every phase); exits 1 if any phase failed. Without a CUDA GPU it says so in one line and exits 2;
``--allow-no-gpu`` instead marks every phase SKIP and exits 0 (the CPU test suite checks the plumbing that way).

    python scripts/gpu_check.py [--quick] [--skip build,parity,refit,tests,bench] [--flavour auto]
                                [--workdir DIR] [--keep] [--json gpu-check.json] [--allow-no-gpu]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = "dtc-gpu-check/1"
#: The tiny family recipes built and compared; fp8 ones need sm_89 or newer.
TINY = (
    "tiny-flux",
    "tiny-flux-fp8",
    "tiny-sd3",
    "tiny-wan21",
    "tiny-flux-components",
    "tiny-flux-cache",
    "tiny-sd3-cache",
    "tiny-wan21-cache",
    "tiny-wan22-cache",
)
MIN_SM = {"tiny-flux-fp8": 89}
REALWIDTH = "flux-realwidth"
LORA = ROOT / "recipes" / "lora" / "tiny-flux-style.safetensors"
LORA_SCALE = 0.8
GROUPS = ("build", "parity", "refit", "tests", "bench")
STATUSES = ("PASS", "FAIL", "SKIP")
#: What the issue asks of a full run (a target, not a gate).
BUDGET_S = 600


class Skip(Exception):
    """The phase cannot run here; the message is the reason."""


class Fail(Exception):
    """The phase ran and its check failed; ``details`` go into the report."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


@dataclass
class Done:
    """A phase's outcome: its key figure (one short line), details for the JSON, and a value for later phases."""

    figure: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    value: Any = None


@dataclass
class PhaseResult:
    """One row of the summary table and of the JSON report's ``phases``."""

    name: str
    group: str
    status: str
    seconds: float
    figure: str = ""
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Check:
    """Runs phases one after the other, records each, and rewrites the JSON report after every one."""

    def __init__(
        self, report_path: Path | None, environment: dict[str, Any], argv: list[str], t0: float | None = None
    ) -> None:
        self.report_path = report_path
        self.environment = environment
        self.argv = argv
        self.results: list[PhaseResult] = []
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter() if t0 is None else t0  # the total includes the environment report

    def run(self, name: str, group: str, fn: Callable[[], Done], *, skip: str | None = None) -> Any:
        """Run ``fn`` as phase ``name`` unless ``skip`` gives a reason not to; returns its ``Done.value``."""
        t0 = time.perf_counter()
        value = None
        if skip:
            result = PhaseResult(name, group, "SKIP", 0.0, reason=skip)
        else:
            try:
                done = fn()
                value = done.value
                result = PhaseResult(name, group, "PASS", 0.0, figure=done.figure, details=done.details)
            except Skip as e:
                result = PhaseResult(name, group, "SKIP", 0.0, reason=str(e))
            except Fail as e:
                result = PhaseResult(name, group, "FAIL", 0.0, reason=str(e), details=e.details)
            except Exception as e:  # a crash in one phase is that phase's failure, not the check's
                lines = str(e).strip().splitlines() or [""]
                tb = traceback.format_exc().splitlines()[-12:]
                result = PhaseResult(
                    name, group, "FAIL", 0.0, reason=f"{type(e).__name__}: {lines[0]}", details={"traceback": tb}
                )
        result.seconds = round(time.perf_counter() - t0, 2)
        self.results.append(result)
        print(f"[{result.status}] {name} ({result.seconds:.1f} s) {result.figure or result.reason}", flush=True)
        self.write()
        return value

    def passed(self, name: str) -> bool:
        return any(r.name == name and r.status == "PASS" for r in self.results)

    def report(self) -> dict[str, Any]:
        """The JSON report: schema, when, how it was called, the environment, every phase and the totals."""
        counts = {s: sum(r.status == s for r in self.results) for s in STATUSES}
        total = round(time.perf_counter() - self.t0, 2)
        return {
            "schema": SCHEMA,
            "date": self.started.isoformat(timespec="seconds"),
            "argv": self.argv,
            "environment": self.environment,
            "phases": [asdict(r) for r in self.results],
            "counts": counts,
            "total_s": total,
            "budget_s": BUDGET_S,
            "passed": counts["FAIL"] == 0,
        }

    def write(self) -> None:
        if self.report_path is not None:
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.report_path.with_name(self.report_path.name + ".tmp")
            tmp.write_text(json.dumps(self.report(), indent=2, default=str) + "\n")
            tmp.replace(self.report_path)


def summary_table(report: dict[str, Any]) -> str:
    """The report as one markdown table (phase, status, seconds, key figure or reason) and a totals line."""
    rows = [("phase", "status", "seconds", "key figure / reason")]
    for p in report["phases"]:
        rows.append((p["name"], p["status"], f"{p['seconds']:.1f}", p["figure"] or p["reason"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]), r[3]]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 1)}:|---|")
    c = report["counts"]
    over = f" (over the {report['budget_s']} s target)" if report["total_s"] > report["budget_s"] else ""
    lines.append(f"{c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP in {report['total_s']:.1f} s{over}")
    return "\n".join(lines)


# --- environment ------------------------------------------------------------------------------------------------


def _nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    for fields in ("name,driver_version,memory.total,compute_cap", "name,driver_version,memory.total"):
        try:
            out = subprocess.run(
                [exe, f"--query-gpu={fields}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"error": f"nvidia-smi: {e}"}
        if out.returncode == 0 and out.stdout.strip():
            gpus = [
                dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))
                for line in out.stdout.strip().splitlines()
            ]
            return {"driver": gpus[0].get("driver_version"), "gpus": gpus}
    return {"error": f"nvidia-smi exited {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}"}


def _module_version(module: str) -> dict[str, Any]:
    if importlib.util.find_spec(module) is None:
        return {"installed": False}
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # an installed but broken module (missing libs) is worth reporting as such
        return {"installed": True, "importable": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"installed": True, "importable": True, "version": getattr(mod, "__version__", None)}


def environment(flavour_choice: str = "auto") -> dict[str, Any]:
    """What this machine has: GPU, driver, torch/CUDA, compute capability, TensorRT flavours; and the flavour
    the check uses (``flavour``, None with ``flavour_reason`` when none targets this GPU)."""
    import dtcompile
    from dtcompile.core.targets import TRT_ARCHS, TRT_MODULES, trt_flavour_for

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "dtcompile": dtcompile.__version__,
        "nvidia_smi": _nvidia_smi(),
    }
    try:
        import torch

        cuda = torch.cuda.is_available()
        env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda}
        if cuda:
            major, minor = torch.cuda.get_device_capability()
            env["arch"] = f"sm_{major}{minor}"
            env["device"] = torch.cuda.get_device_name()
            env["device_count"] = torch.cuda.device_count()
    except ImportError as e:
        env["torch"] = {"error": str(e)}
    env.setdefault("arch", None)
    env["tensorrt"] = {flavour: _module_version(module) for flavour, module in TRT_MODULES.items()}
    env["onnxruntime"] = _module_version("onnxruntime")
    importable = [f for f, v in env["tensorrt"].items() if v.get("importable")]
    arch = env["arch"]
    if flavour_choice == "auto":
        env["flavour"] = trt_flavour_for(arch, importable)
    else:
        env["flavour"] = trt_flavour_for(arch, [flavour_choice] if flavour_choice in importable else [])
    if arch is not None and env["flavour"] is None:
        targets = [f for f in TRT_MODULES if arch in TRT_ARCHS[f] and (flavour_choice in ("auto", f))]
        env["flavour_reason"] = (
            f"no TensorRT flavour targets {arch}"
            if not targets
            else f"{' or '.join(targets)} targets {arch} but is not importable here "
            f"(pip install 'dtcompile[{'rtx' if targets[0] == 'tensorrt-rtx' else 'trt'}]')"
        )
    return env


def environment_figure(env: dict[str, Any]) -> str:
    smi = env.get("nvidia_smi", {})
    torch_info = env.get("torch", {})
    flavour = env.get("flavour")
    version = env["tensorrt"].get(flavour, {}).get("version") if flavour else None
    return (
        f"{env.get('arch')} {env.get('device')}, driver {smi.get('driver', '?')}, torch {torch_info.get('version')} "
        f"CUDA {torch_info.get('cuda')}, {flavour or 'no TensorRT'} {version or ''}".strip()
    )


# --- phases -----------------------------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """The environment of ``dtc`` and pytest children: this checkout's dtcompile first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _call(args: list[str], log: Path, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``args`` (a ``python -m ...`` command line), keep its output in ``log``; Fail with its last error line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=_child_env(), timeout=timeout)
    log.write_text(f"$ {' '.join(args)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise Fail(f"exit {proc.returncode}: {lines[-1] if lines else 'no output'} (log: {log})", {"log": str(log)})
    return proc


def dtc(*args: str) -> list[str]:
    """A ``dtc`` command line run with this interpreter (``python -m dtcompile``)."""
    return [sys.executable, "-m", "dtcompile", *args]


def recipe_overrides(out_dir: Path, flavour: str, arch: str, *extra: str) -> list[str]:
    """The ``--set`` values that build a recipe for this GPU only, next to onnxruntime (the reference)."""
    return [f"output.dir={out_dir}", f"engine.backends=[onnxruntime, {flavour}]", f"engine.targets=[{arch}]", *extra]


#: The fused-LoRA rebuild's ``--set`` value (the refit phase compares the refit engine with it).
LORA_FUSED = f"lora=[{{source: '{LORA}', scale: {LORA_SCALE}}}]"
#: The refittable base's ``--set`` value.
REFITTABLE = "engine.refittable=true"


def build_phase(recipe: str, out_dir: Path, flavour: str, arch: str, logs: Path, *extra: str) -> Done:
    """``dtc build`` of ``recipes/<recipe>.yaml`` for this GPU; the artifact folder is the value."""
    sets = [x for s in recipe_overrides(out_dir, flavour, arch, *extra) for x in ("--set", s)]
    args = dtc("-q", "build", "--recipe", str(ROOT / "recipes" / f"{recipe}.yaml"), *sets)
    _call(args, logs / f"build-{out_dir.name}.log")
    manifests = sorted(out_dir.glob("*/manifest.json"))
    if len(manifests) != 1:
        raise Fail(f"expected one artifact in {out_dir}, found {len(manifests)}")
    art = manifests[0].parent
    m = json.loads(manifests[0].read_text())
    engines = [
        {"component": name, **{k: e.get(k) for k in ("backend", "arch", "size", "build_s", "file")}}
        for name, c in m["components"].items()
        for e in c.get("engines", [])
        if e["backend"] == flavour
    ]
    if not engines or any(e["arch"] != arch for e in engines):
        why = "; ".join(s.get("reason", "") for s in m.get("skipped") or [] if s.get("backend") == flavour)
        raise Fail(f"the artifact has no {flavour} {arch} engine{': ' + why if why else ''}", {"engines": engines})
    mb = sum(e["size"] or 0 for e in engines) / 1e6
    build_s = sum(e["build_s"] or 0 for e in engines)
    figure = f"{len(engines)} {flavour} engine(s), {mb:.1f} MB, TensorRT build {build_s:.1f} s"
    return Done(figure, {"artifact": str(art), "engines": engines}, art)


def _runs(art: Path, backend: str, **kw: Any) -> Any:
    """One traced run of ``art`` on ``backend`` with the comparison settings (engine_parity.run_settings)."""
    from dtcompile.runtime.session import run_artifact
    from tests.fixtures.engine_parity import run_settings

    settings = run_settings(art)
    return run_artifact(art, settings.pop("prompt"), backend=backend, trace=True, **settings, **kw)


def _free_gpu() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        torch.cuda.empty_cache()


def parity_phase(art: Path, flavour: str, arch: str, cached: bool) -> Done:
    """Per-engine and per-run parity of ``art``'s engines for this GPU against onnxruntime.

    Cache recipes run with the cache off and on; with it on, the two backends are compared only where they skipped
    the same calls (a first-block change within rounding of its threshold sends the runs different ways).
    """
    from tests.fixtures.engine_parity import cache_decisions, compare_engines, compare_runs, tolerance

    max_l2, min_psnr = tolerance(art)
    try:
        rows = compare_engines(art, flavour, arch)
        if not rows:
            raise Fail(f"no {flavour} {arch} engine to compare")
        runs: dict[str, dict[str, Any]] = {}
        for label, kw in [("cache off", {"cache": False}), ("cache on", {})] if cached else [("run", {})]:
            got, ref = _runs(art, flavour, **kw), _runs(art, "onnxruntime", **kw)
            ours, theirs = cache_decisions(got.cache_stats), cache_decisions(ref.cache_stats)
            if ours != theirs:
                runs[label] = {"compared": False, "cached_calls": ours, "onnxruntime_cached_calls": theirs}
            else:
                runs[label] = {"compared": True, **compare_runs(got, ref), "cached_calls": ours}
            del got, ref
    finally:
        _free_gpu()
    worst = max(rows, key=lambda r: r["rel_l2"])
    compared = {k: v for k, v in runs.items() if v["compared"]}  # "run" and "cache off" always are
    step = max(r["max_step_rel_l2"] for r in compared.values())
    psnr = min(r["psnr_db"] for r in compared.values())
    details = {"engines": rows, "runs": runs, "tolerance": {"max_rel_l2": max_l2, "min_psnr_db": min_psnr}}
    figure = (
        f"{len({r['component'] for r in rows})} engine(s) rel L2 <= {worst['rel_l2']:.1e}, "
        f"{len(compared)} run(s): step rel L2 <= {step:.1e}, PSNR >= {psnr:.1f} dB"
    )
    if len(compared) < len(runs):
        figure += "; cache on not compared (the backends skipped different calls)"
    problems = []
    if worst["rel_l2"] > max_l2:
        problems.append(f"{worst['component']}.{worst['output']} rel L2 {worst['rel_l2']:.2e} > {max_l2:g}")
    for k, v in compared.items():
        if v["max_step_rel_l2"] > max_l2:
            problems.append(f"{k}: step rel L2 {v['max_step_rel_l2']:.2e} > {max_l2:g}")
        if v["psnr_db"] < min_psnr:
            problems.append(f"{k}: PSNR {v['psnr_db']:.1f} dB < {min_psnr:g}")
    if cached and not runs["cache on"]["cached_calls"]:
        problems.append("cache on: the engine skipped no block")
    if problems:
        raise Fail("; ".join(problems), details)
    return Done(figure, details)


def refit_phase(base: Path, fused: Path, flavour: str, arch: str, work: Path, logs: Path) -> Done:
    """``dtc refit`` of the refittable base with the LoRA, run on the engine, against the fused rebuild."""
    from tests.fixtures.engine_parity import compare_runs, lora_moved, tolerance

    out = work / "refit-lora"
    shutil.rmtree(out, ignore_errors=True)
    proc = _call(dtc("refit", str(base), "--lora", f"{LORA}:{LORA_SCALE}", "--out", str(out)), logs / "refit.log")
    target = f"{flavour}:{arch}"
    if not re.search(rf"refit\s+{re.escape(target)}", proc.stdout):
        raise Fail(f"dtc refit did not refit the {target} engine", {"stdout": proc.stdout})
    m = re.search(r"in ([\d.]+)s", proc.stdout)
    refit_s = float(m.group(1)) if m else None
    max_l2, min_psnr = tolerance(base)
    try:
        refit_run = _runs(out, flavour)
        vs_fused = compare_runs(refit_run, _runs(fused, flavour))
        vs_base = compare_runs(refit_run, _runs(base, flavour))
    finally:
        _free_gpu()
    details = {"refit_s": refit_s, "vs_fused": vs_fused, "vs_base": vs_base, "lora": str(LORA), "scale": LORA_SCALE}
    figure = (
        f"refit {refit_s} s; vs fused build: step rel L2 <= {vs_fused['max_step_rel_l2']:.1e}, "
        f"PSNR {vs_fused['psnr_db']:.1f} dB (base differs by {vs_base['max_step_rel_l2']:.1e})"
    )
    if vs_fused["max_step_rel_l2"] > max_l2 or vs_fused["psnr_db"] < min_psnr:
        raise Fail(f"refit engine differs from the fused build: {figure}", details)
    if not lora_moved(vs_base["max_step_rel_l2"], vs_fused["max_step_rel_l2"]):
        raise Fail(f"the refit engine still runs like the base (rel L2 {vs_base['max_step_rel_l2']:.1e})", details)
    return Done(figure, details)


def tests_phase(work: Path, logs: Path) -> Done:
    """``pytest -m gpu tests/``: every gpu-marked test; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    if not (ROOT / "tests").is_dir():
        raise Skip(f"no tests/ folder next to this script ({ROOT})")
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed (pip install 'dtcompile[dev]')")
    xml = work / "gpu-tests.xml"
    env = {**_child_env(), "DTC_GPU_CHECK_ENGINES": str(work / "engines")}  # the builds above are no-ops there
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-rs",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "tests",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    (logs / "gpu-tests.log").write_text(f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    if not xml.is_file():
        raise Fail(f"pytest exited {proc.returncode} without a report (log: {logs / 'gpu-tests.log'})")
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome.tag if outcome is not None else "passed",
                "message": (outcome.get("message") or "")[:300] if outcome is not None else "",
            }
        )
    details = {"counts": {**n, "passed": passed}, "cases": cases, "log": str(logs / "gpu-tests.log")}
    figure = f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"
    if n["tests"] == 0:
        raise Fail("pytest collected no gpu-marked test", details)
    if proc.returncode != 0 or n["failures"] or n["errors"]:
        failed = [c["test"] for c in cases if c["outcome"] in ("failure", "error")]
        raise Fail(f"{figure}: {', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}", details)
    return Done(figure, details)


def bench_phase(art: Path, flavour: str, work: Path, logs: Path) -> Done:
    """``dtc bench`` of the real-width artifact's engine against PyTorch on this GPU."""
    out = work / "bench.json"
    _call(
        dtc("bench", str(art), "--backend", flavour, "--steps", "4", "--repeat", "3", "--json", str(out)),
        logs / "bench.log",
    )
    report = json.loads(out.read_text())
    engine = next(r for r in report["results"] if r["backend"] == flavour)
    torch_row = next(r for r in report["results"] if r["name"] not in report["ratios"])  # the PyTorch baseline
    speedup = report["ratios"][engine["name"]]["step_speedup"]
    psnr = engine.get("psnr_db_vs_pytorch")  # "inf" for identical images (the report's JSON has no infinity)
    figure = (
        f"step {engine['step_median_ms']:.1f} ms vs PyTorch {torch_row['step_median_ms']:.1f} ms "
        f"({speedup:.2f}x faster), PSNR vs PyTorch {f'{psnr:.1f}' if isinstance(psnr, float) else psnr} dB"
    )
    keep = ("name", "backend", "arch", "step_median_ms", "step_p90_ms", "e2e_median_s", "device_mb", "load_s")
    details = {
        "json": str(out),
        "results": [{k: r.get(k) for k in keep} for r in report["results"]],
        "ratios": report.get("ratios"),
        "settings": report.get("settings"),
    }
    return Done(figure, details)


# --- the plan ---------------------------------------------------------------------------------------------------


def phase_names() -> list[tuple[str, str]]:
    """(phase, group) of every phase, in the order they run (``--quick`` and ``--skip`` make SKIP rows)."""
    names = [("environment", "environment")]
    names += [(f"build {r}", "build") for r in TINY]
    names += [(f"parity {r}", "parity") for r in TINY]
    names += [("build tiny-flux refittable", "refit"), ("build tiny-flux + LoRA fused", "refit"), ("refit", "refit")]
    names += [("gpu tests", "tests"), (f"build {REALWIDTH}", "bench"), (f"bench {REALWIDTH}", "bench")]
    return names


def run_check(
    args: argparse.Namespace, env: dict[str, Any], report_path: Path | None, work: Path, t0: float | None = None
) -> Check:
    """Every phase, in ``phase_names`` order; without a GPU (``--allow-no-gpu``) each is SKIP."""
    check = Check(report_path, env, sys.argv[1:], t0)
    arch, flavour = env.get("arch"), env.get("flavour")
    skipped = set(args.skip) | ({"bench"} if args.quick else set())
    logs, engines = work / "logs", work / "engines"
    if arch is None:
        for name, group in phase_names():
            check.run(name, group, lambda: Done(), skip="no CUDA GPU (--allow-no-gpu)")
        return check

    def env_phase() -> Done:
        if flavour is None:
            raise Fail(env.get("flavour_reason", f"no TensorRT flavour for {arch}"), {"environment": env})
        return Done(environment_figure(env))

    check.run("environment", "environment", env_phase)
    no_trt = None if flavour else env.get("flavour_reason", "no TensorRT flavour")

    def why_not(group: str, needs: tuple[str, ...] = (), min_sm: int | None = None) -> str | None:
        from dtcompile.core.targets import sm_number

        if group in skipped:
            return "--quick" if group == "bench" and args.quick else f"--skip {group}"
        if no_trt:
            return no_trt
        if min_sm and sm_number(arch) < min_sm:
            return f"needs sm_{min_sm} or newer (this GPU is {arch})"
        failed = [n for n in needs if not check.passed(n)]
        return f"{failed[0]} did not pass" if failed else None

    built: dict[str, Path] = {}
    for recipe in TINY:
        art = check.run(
            f"build {recipe}",
            "build",
            lambda r=recipe: build_phase(r, engines / r, flavour, arch, logs),
            skip=why_not("build", min_sm=MIN_SM.get(recipe)),
        )
        if art is not None:
            built[recipe] = art
    for recipe in TINY:
        check.run(
            f"parity {recipe}",
            "parity",
            lambda r=recipe: parity_phase(built[r], flavour, arch, cached=r.endswith("-cache")),
            skip=why_not("parity", (f"build {recipe}",), MIN_SM.get(recipe)),
        )

    base = check.run(
        "build tiny-flux refittable",
        "refit",
        lambda: build_phase("tiny-flux", engines / "refit-base", flavour, arch, logs, REFITTABLE),
        skip=why_not("refit"),
    )
    fused = check.run(
        "build tiny-flux + LoRA fused",
        "refit",
        lambda: build_phase("tiny-flux", engines / "lora-fused", flavour, arch, logs, LORA_FUSED),
        skip=why_not("refit"),
    )
    check.run(
        "refit",
        "refit",
        lambda: refit_phase(base, fused, flavour, arch, work, logs),
        skip=why_not("refit", ("build tiny-flux refittable", "build tiny-flux + LoRA fused")),
    )
    check.run("gpu tests", "tests", lambda: tests_phase(work, logs), skip=why_not("tests"))
    rw = check.run(
        f"build {REALWIDTH}",
        "bench",
        lambda: build_phase(REALWIDTH, engines / REALWIDTH, flavour, arch, logs),
        skip=why_not("bench"),
    )
    check.run(
        f"bench {REALWIDTH}",
        "bench",
        lambda: bench_phase(rw, flavour, work, logs),
        skip=why_not("bench", (f"build {REALWIDTH}",)),
    )
    return check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"skip the real-width build and bench ({REALWIDTH})")
    p.add_argument("--skip", default="", help=f"comma-separated phase groups to skip: {', '.join(GROUPS)}")
    p.add_argument(
        "--flavour",
        default="auto",
        choices=("auto", "tensorrt-rtx", "tensorrt"),
        help="TensorRT flavour (auto: tensorrt-rtx where it targets this GPU, else tensorrt)",
    )
    p.add_argument("--workdir", type=Path, help="where artifacts and logs go (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (kept anyway when a phase failed)")
    p.add_argument("--json", type=Path, default=Path("gpu-check.json"), help="the JSON report [gpu-check.json]")
    p.add_argument("--allow-no-gpu", action="store_true", help="without a CUDA GPU: every phase SKIP, exit 0")
    args = p.parse_args(argv)
    args.skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    unknown = sorted(set(args.skip) - set(GROUPS))
    if unknown:
        p.error(f"--skip {','.join(unknown)}: unknown group; choose from {', '.join(GROUPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    t0 = time.perf_counter()
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    env = environment(args.flavour)
    if env["arch"] is None:
        why = env.get("torch", {}).get("error") or "torch.cuda.is_available() is False"
        smi = env["nvidia_smi"].get("error") or f"nvidia-smi sees {len(env['nvidia_smi'].get('gpus', []))} GPU(s)"
        line = f"gpu_check: no CUDA GPU found ({why}; {smi}): this check runs only on a machine with an NVIDIA GPU"
        if not args.allow_no_gpu:
            print(line, file=sys.stderr)
            return 2
        print(line + "; --allow-no-gpu: every phase SKIP")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dtc-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = run_check(args, env, args.json, work, t0)
    report = check.report()
    check.write()
    print()
    print(summary_table(report))
    print(f"report: {args.json}")
    if report["passed"] and not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder (artifacts, logs): {work}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
