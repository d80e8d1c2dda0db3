"""`dtc build`: recipe -> artifact folder (ONNX, engines per arch, manifest)."""

from __future__ import annotations

import click

from dtcompile.stages import STAGE_NAMES


@click.command()
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False), help="Recipe YAML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--dry-run", is_flag=True, help="Check the recipe and every target's requirements; load nothing.")
@click.option("--stop-after", type=click.Choice(STAGE_NAMES), help="Stop after this stage (artifact is marked).")
@click.option("--force", is_flag=True, help="Rebuild even if the artifact's key is unchanged.")
def build(recipe_path: str, overrides: tuple[str, ...], dry_run: bool, stop_after: str | None, force: bool) -> None:
    """Build an artifact from a recipe."""
    from dtcompile import api
    from dtcompile.manifest import validate_manifest

    if dry_run:
        for line in api.plan(recipe_path, overrides).lines():
            click.echo(line)
        click.echo("dry run: OK, nothing loaded or written")
        return
    report = api.build(recipe_path, overrides, stop_after=stop_after, force=force)
    m = validate_manifest(report.manifest)  # typed whether the report holds a Manifest or a dict
    click.echo(f"{'up to date' if report.up_to_date else 'built'}: {report.artifact_dir} (key {m.key[:12]})")
    for comp, entry in m.components.items():
        for e in entry.engines:
            click.echo(f"  {comp:<12} {e.backend:<13} {e.arch:<7} {e.size / 2**20:8.2f} MB  {e.file}")
    for s in m.skipped:
        click.echo(f"  NOT BUILT    {s.backend:<13} {s.arch:<7} {s.reason}")
    if m.stopped_after:
        click.echo(f"stopped after stage '{m.stopped_after}'")
