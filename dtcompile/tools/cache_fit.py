"""``dtc cache fit``: TeaCache's rescaling polynomial fitted for a built artifact, as TeaCache's authors fit theirs.

Input: an artifact built with ``cache: {mode: teacache}`` and a prompt file. Every prompt runs in full (no block
skipped) through a runtime ``Session``; each denoiser call gives one point: the relative L1 change of the TeaCache
signal (the prologue output the manifest's ``cache.teacache.signal`` names) against the same branch's previous
call, and that of the model output. Output: per denoiser (Wan2.2: each expert), ``numpy.polyfit`` of degree 4
over its points, written into the manifest's ``cache.teacache`` (``coefficients``, ``source``, ``fit``), which
later runs use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtcompile.core.errors import RecipeError, UnsupportedError

log = logging.getLogger("dtcompile.cache")

MAX_PROMPTS = 1000


@dataclass(frozen=True)
class FitResult:
    """One denoiser's fitted polynomial (numpy.poly1d order), the points it was fitted on and its error."""

    component: str
    coefficients: tuple[float, ...]
    points: int
    rms: float
    x_range: tuple[float, float]


def fit_polynomial(points: list[tuple[float, float]], degree: int = 4) -> tuple[list[float], float]:
    """Least-squares polynomial of ``degree`` through (x, y) ``points`` and its RMS residual; UnsupportedError
    when there are too few distinct x to determine it."""
    import numpy as np

    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    if len(np.unique(x)) <= degree:
        raise UnsupportedError(
            f"{len(points)} points ({len(np.unique(x))} distinct signal changes) cannot determine a degree-{degree} "
            "polynomial; fit on more prompts or more --steps"
        )
    coefficients = np.polyfit(x, y, degree)
    rms = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    return [float(c) for c in coefficients], rms


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (blank lines and ``#`` comments skipped), at most ``MAX_PROMPTS``; RecipeError naming
    the file otherwise."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"--prompts {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise RecipeError(f"--prompts {path}: no prompt in it (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise RecipeError(f"--prompts {path}: {len(prompts)} prompts, at most {MAX_PROMPTS}")
    return prompts


def fit_artifact(
    artifact_dir: Path,
    prompts: list[str],
    *,
    steps: int = 20,
    seed: int = 0,
    backend: str = "auto",
    degree: int = 4,
    write: bool = True,
) -> list[FitResult]:
    """Fit every split denoiser's TeaCache polynomial from full runs of ``prompts`` (``steps`` each, seeds from
    ``seed``) and, with ``write``, store them in the artifact's manifest."""
    from dtcompile.manifest import read_manifest, write_manifest
    from dtcompile.runtime.cache import TeaCacheFit
    from dtcompile.runtime.session import Session

    session = Session(artifact_dir, backend, cache=False)
    names = session.manifest.denoiser_names()
    for name in names:
        entry = session.manifest.denoiser(name)
        if not (entry.cache or {}).get("teacache"):
            mode = (entry.cache or {}).get("spec", {}).get("mode", "none")
            raise UnsupportedError(
                f"{artifact_dir}: {name} was built with cache mode {mode}; dtc cache fit needs a teacache artifact "
                "(cache: {mode: teacache, threshold: ...})"
            )
    pipe = session.load()
    fit = TeaCacheFit()
    for name in names:
        getattr(pipe, name).fit = fit
    for i, prompt in enumerate(prompts):
        session.generate(session.request(prompt, steps=steps, seed=seed + i))
        log.info("[cache fit] prompt %d/%d: %s", i + 1, len(prompts), {k: len(v) for k, v in fit.points.items()})
    results = []
    for name in names:
        points = fit.points.get(name, [])
        coefficients, rms = fit_polynomial(points, degree)
        xs = [p[0] for p in points]
        results.append(FitResult(name, tuple(coefficients), len(points), rms, (min(xs), max(xs))))
    if write:
        manifest = read_manifest(artifact_dir)
        for r in results:
            record: dict[str, Any] = (manifest.denoiser(r.component).cache or {})["teacache"]
            record["coefficients"] = list(r.coefficients)
            record["source"] = (
                f"fitted: dtc cache fit, {len(prompts)} prompt(s) x {steps} steps, {r.points} calls, rms {r.rms:.3g}"
            )
            record["fit"] = {"prompts": len(prompts), "steps": steps, "seed": seed, "points": r.points,
                             "rms": r.rms if math.isfinite(r.rms) else None, "x_range": list(r.x_range)}  # fmt: skip
        write_manifest(artifact_dir, manifest)
    return results
