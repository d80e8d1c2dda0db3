"""`dtc pull`: fetch one arch of a published artifact, verify every sha256, extract it safely."""

from __future__ import annotations

import click

from dtcompile.tools.publish import BACKEND_FILTERS  # light: publish.py imports nothing heavy at module level


@click.command()
@click.argument("url")
@click.option(
    "--arch",
    default="auto",
    show_default=True,
    help="auto (this machine's GPU), sm_89, sm_120, ..., or any (the onnxruntime model only, no engines).",
)
@click.option(
    "--backend",
    type=click.Choice(BACKEND_FILTERS),
    default="all",
    show_default=True,
    help="Which TensorRT flavour's engines to pull for the arch.",
)
@click.option("--key", metavar="PREFIX", help="Pick this version (key prefix) from a URL/<name> index.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Artifact folder to create.")
@click.option("--force", is_flag=True, help="Replace --out if it already exists.")
def pull(url: str, arch: str, backend: str, key: str | None, out_dir: str, force: bool) -> None:
    """Pull URL (URL/<name> for the newest version with the arch, or URL/<name>/<key>) into --out.

    Nothing is unpacked before every archive's sha256 matches SHA256SUMS; every extracted file is checked against
    the manifest, and --out appears only when all of it passed. `dtc run OUT` then runs it like a built artifact.
    """
    from pathlib import Path

    from dtcompile.tools.publish import pull_artifact

    report = pull_artifact(url, Path(out_dir), arch=arch, backend=backend, key=key, force=force)
    engines = ", ".join(f"{e['backend']} {e['arch']}" for e in report.engines)
    click.echo(f"pulled {report.name} key {report.key[:12]} from {report.url} into {report.artifact_dir}")
    click.echo(f"  archives {', '.join(report.archives)} (sha256 verified); engines: {engines}")
    for w in report.warnings:
        click.echo(f"  warning: {w}")
    click.echo(f"run it with: dtc run {report.artifact_dir} --prompt '...'")
