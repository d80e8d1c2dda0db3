"""`dtc build`: recipe -> artifact folder (ONNX, engines per arch, manifest)."""

from __future__ import annotations

import click

from dtcompile.cli import set_quiet
from dtcompile.stages import STAGE_NAMES


@click.command()
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False), help="Recipe YAML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--dry-run", is_flag=True, help="Check the recipe and every target's requirements; load nothing.")
@click.option("--stop-after", type=click.Choice(STAGE_NAMES), help="Stop after this stage (artifact is marked).")
@click.option("--force", is_flag=True, help="Rebuild even if the artifact's key is unchanged.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or lines, only warnings and errors (as dtc -q).")
def build(
    recipe_path: str, overrides: tuple[str, ...], dry_run: bool, stop_after: str | None, force: bool, quiet: bool
) -> None:
    """Build an artifact from a recipe (progress: a bar on a terminal, a log line every 10% elsewhere)."""
    from dtcompile import api
    from dtcompile.cli.summary import echo_engines, echo_not_built
    from dtcompile.manifest import validate_manifest

    if quiet:
        set_quiet()
    if dry_run:
        for line in api.plan(recipe_path, overrides).lines():
            click.echo(line)
        click.echo("dry run: OK, nothing loaded or written")
        return
    report = api.build(recipe_path, overrides, stop_after=stop_after, force=force)
    m = validate_manifest(report.manifest)  # typed whether the report holds a Manifest or a dict
    click.echo(f"{'up to date' if report.up_to_date else 'built'}: {report.artifact_dir} (key {m.key[:12]})")
    echo_engines(m)
    echo_not_built(m)
