"""`dtc refit`: swap LoRA weights into a built artifact without re-exporting or rebuilding it."""

from __future__ import annotations

import click


@click.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option(
    "--lora",
    "loras",
    multiple=True,
    required=True,
    metavar="PATH[:SCALE]",
    help="A LoRA .safetensors file (diffusers/PEFT or kohya keys) and its scale (default 1); repeat to stack. "
    "'none' restores the base weights.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write the refit artifact to this folder.")
@click.option("--in-place", is_flag=True, help="Replace ARTIFACT itself (atomically: a failure changes nothing).")
@click.option(
    "--drop-unrefittable",
    is_flag=True,
    help="Leave out engines that cannot be refit here (non-refittable, or no GPU of their arch) instead of failing.",
)
def refit(artifact: str, loras: tuple[str, ...], out_dir: str | None, in_place: bool, drop_unrefittable: bool) -> None:
    """Refit ARTIFACT with LoRA adapters: W' = W + sum(scale * alpha/r * B @ A) on every touched weight."""
    from pathlib import Path

    from dtcompile.core.errors import DtcError
    from dtcompile.tools.refit import refit_artifact

    if any(v.lower() == "none" for v in loras):
        if len(loras) > 1:
            raise DtcError("--lora none restores the base weights and cannot be combined with other --lora values")
        pairs: list[tuple[str, float]] = []
    else:
        pairs = [parse_lora_arg(v) for v in loras]
    report = refit_artifact(
        Path(artifact),
        pairs,
        out_dir=Path(out_dir) if out_dir else None,
        in_place=in_place,
        drop_unrefittable=drop_unrefittable,
    )
    m = report.manifest
    names = ", ".join(f"{Path(a['source']).name}:{a['scale']:g}" for a in report.adapters) or "none (base weights)"
    click.echo(f"refit: {report.artifact_dir} (key {m['key'][:12]}) with {names}")
    click.echo(
        f"  {report.updated} initializers written ({report.touched} weights ever touched) in {report.seconds:.2f}s"
    )
    for engine in ["onnxruntime:any", *report.refit_engines]:
        click.echo(f"  refit        {engine}")
    for d in report.dropped:
        click.echo(f"  DROPPED      {d['backend']}:{d['arch']}  {d['reason']}")


def parse_lora_arg(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a suffix that is not a number belongs to the path.

    A NaN or infinite scale parses; ``refit_artifact`` refuses it (for API callers too).
    """
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, 1.0
