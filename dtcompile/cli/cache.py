"""`dtc cache fit`: fit TeaCache's rescaling polynomial for a built teacache artifact (docs/cache.md)."""

from __future__ import annotations

from pathlib import Path

import click

from dtcompile.runtime.run import BACKEND_CHOICES


@click.group("cache")
def cache() -> None:
    """Block-cache tools for built artifacts."""


@cache.command("fit")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help="Prompt file: one per line (# comments and blank lines skipped).")  # fmt: skip
@click.option("--steps", default=20, show_default=True, type=click.IntRange(3, 200))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--degree", default=4, show_default=True, type=click.IntRange(1, 8), help="Polynomial degree.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--dry-run", is_flag=True, help="Fit and print, but leave the manifest unchanged.")
def fit(artifact: str, prompts_file: str, steps: int, seed: int, degree: int, backend: str, dry_run: bool) -> None:
    """Run every prompt in full and fit each denoiser's TeaCache polynomial into the artifact's manifest."""
    from dtcompile.tools.cache_fit import fit_artifact, read_prompts

    prompts = read_prompts(Path(prompts_file))
    results = fit_artifact(
        Path(artifact), prompts, steps=steps, seed=seed, backend=backend, degree=degree, write=not dry_run
    )
    for r in results:
        poly = ", ".join(f"{c:.6g}" for c in r.coefficients)
        click.echo(
            f"{r.component}: [{poly}] from {r.points} calls (signal change {r.x_range[0]:.3g}..{r.x_range[1]:.3g}), "
            f"rms {r.rms:.3g}"
        )
    click.echo("manifest unchanged (--dry-run)" if dry_run else f"wrote the coefficients into {artifact}/manifest.json")
