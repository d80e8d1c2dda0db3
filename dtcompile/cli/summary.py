"""The engine table `dtc build` and `dtc inspect` print: one row per engine, then what was not built."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from dtcompile.manifest import Manifest


def echo_engines(m: Manifest, components: list[str] | None = None) -> None:
    """Rows ``component backend arch MB sha256 file`` for ``components`` (None: all) under one header."""
    click.echo(f"  {'component':<22} {'backend':<13} {'arch':<7} {'MB':>9}  {'sha256':<16}  file")
    for comp in components or list(m.components):
        for e in m.components[comp].engines:
            click.echo(f"  {comp:<22} {e.backend:<13} {e.arch:<7} {e.size / 2**20:9.2f}  {e.sha256[:16]}  {e.file}")


def echo_not_built(m: Manifest) -> None:
    """The targets the build skipped, with the reason, and the stage a partial build stopped after."""
    for s in m.skipped:
        click.echo(f"  NOT BUILT {s.backend} {s.arch}: {s.reason}")
    if m.stopped_after:
        click.echo(f"stopped after stage '{m.stopped_after}': this artifact has no engines to run")
