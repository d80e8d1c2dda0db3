"""`dtc models`: list the built-in tiny pipelines."""

from __future__ import annotations

import click


@click.command()
def models() -> None:
    """List built-in pipelines usable as `model.source: builtin:NAME`."""
    from dtcompile.models.builtin import builtins

    for name, model in builtins().items():
        click.echo(f"builtin:{name:<16} {model.family:<6} {model.description}")
