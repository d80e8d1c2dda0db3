"""`dtc build`: recipe -> artifact folder (ONNX, engines per arch, manifest)."""

from __future__ import annotations

import click

from dtcompile.stages import STAGES


@click.command()
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False), help="Recipe YAML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--dry-run", is_flag=True, help="Check the recipe and every target's requirements; load nothing.")
@click.option("--stop-after", type=click.Choice(STAGES), help="Stop after this stage (artifact is marked).")
@click.option("--force", is_flag=True, help="Rebuild even if the artifact's key is unchanged.")
def build(recipe_path: str, overrides: tuple[str, ...], dry_run: bool, stop_after: str | None, force: bool) -> None:
    """Build an artifact from a recipe."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages import plan, run_build

    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        for line in plan(recipe).lines():
            click.echo(line)
        click.echo("dry run: OK, nothing loaded or written")
        return
    report = run_build(recipe, stop_after=stop_after, force=force, recipe_path=recipe_path)
    m = report.manifest
    click.echo(f"{'up to date' if report.up_to_date else 'built'}: {report.artifact_dir} (key {m['key'][:12]})")
    for comp, entry in m.get("components", {}).items():
        for e in entry.get("engines", []):
            click.echo(f"  {comp:<12} {e['backend']:<13} {e['arch']:<7} {e['size'] / 2**20:8.2f} MB  {e['file']}")
    for s in m.get("skipped", []):
        click.echo(f"  NOT BUILT    {s['backend']:<13} {s['arch']:<7} {s['reason']}")
    if m.get("stopped_after"):
        click.echo(f"stopped after stage '{m['stopped_after']}'")
