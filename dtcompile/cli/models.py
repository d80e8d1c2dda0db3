"""`dtc models`: the model families, their built-in tiny pipelines and the recipes that start from them."""

from __future__ import annotations

import re
from pathlib import Path

import click

SOURCE_RE = re.compile(r"^\s*source:\s*['\"]?builtin:([\w.-]+)", re.MULTILINE)


@click.command()
@click.option("--recipes", "recipes_dir", default="recipes", show_default=True, type=click.Path(file_okay=False),
              help="Folder whose *.yaml recipes are listed next to the built-in they start from.")  # fmt: skip
def models(recipes_dir: str) -> None:
    """List the model families and the built-in pipelines usable as `model.source: builtin:NAME`."""
    from dtcompile.models import ADAPTERS, PIPELINE_FAMILIES
    from dtcompile.models.builtin import builtins
    from dtcompile.models.components import COMPONENT_KINDS

    def listed(name: str, kind: str) -> str:  # with the quant formats a component takes (components[i].quant)
        formats = COMPONENT_KINDS[kind].quant_formats
        return f"{name} (quant: {', '.join(formats)})" if formats else name

    click.echo("families:")
    for family in ADAPTERS.names():
        classes = ", ".join(c for c, f in PIPELINE_FAMILIES.items() if f == family)
        adapter = ADAPTERS.get(family)
        engines = ", ".join([adapter.component, *(listed(n, k) for n, k in adapter.aux_components.items())])
        click.echo(f"  {family:<12} {classes}  components: {engines}")
    uses: dict[str, list[str]] = {}
    folder = Path(recipes_dir)
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for name in SOURCE_RE.findall(text):
            uses.setdefault(name, []).append(path.as_posix())
    click.echo("built-ins:")
    for name, model in builtins().items():
        click.echo(f"  builtin:{name:<17} {model.family:<12} {model.description}")
        if uses.get(name):
            click.echo(f"  {'':<39} recipes: {', '.join(uses[name])}")
