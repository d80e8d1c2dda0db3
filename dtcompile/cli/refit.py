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
    metavar="PATH[:SCALE][@DENOISER]",
    help="A LoRA .safetensors file (diffusers/PEFT or kohya keys), its scale (default 1) and the denoiser it goes "
    "into (default the main one; Wan2.2's low-noise expert: @transformer_2); repeat to stack. "
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
        pairs: list[tuple[str, float, str | None]] = []
    else:
        pairs = [(*parse_lora_arg(arg), denoiser) for arg, denoiser in map(split_denoiser, loras)]
    report = refit_artifact(
        Path(artifact),
        pairs,
        out_dir=Path(out_dir) if out_dir else None,
        in_place=in_place,
        drop_unrefittable=drop_unrefittable,
    )
    m = report.manifest
    names = ", ".join(
        f"{Path(a['source']).name}:{a['scale']:g}" + (f"@{a['component']}" if a.get("component") else "")
        for a in report.adapters
    )
    names = names or "none (base weights)"
    click.echo(f"refit: {report.artifact_dir} (key {m['key'][:12]}) with {names}")
    click.echo(
        f"  {report.updated} initializers written ({report.touched} weights ever touched) in {report.seconds:.2f}s"
    )
    for engine in m["lora"]["refit"]["engines"]:  # "[denoiser ]backend:arch", onnxruntime's graph included
        click.echo(f"  refit        {engine}")
    for d in report.dropped:
        where = f"{d['component']} " if d.get("component") else ""
        click.echo(f"  DROPPED      {where}{d['backend']}:{d['arch']}  {d['reason']}")


def split_denoiser(value: str) -> tuple[str, str | None]:
    """``ARG@DENOISER`` -> (ARG, DENOISER); (value, None) when there is no ``@name`` suffix."""
    import re

    head, at, name = value.rpartition("@")
    if at and head and re.fullmatch(r"[A-Za-z_]\w*", name):
        return head, name
    return value, None


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
