"""`dtc run`: generate an image with a built (or pulled) artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dtcompile.runtime.run import BACKEND_CHOICES


@click.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 1000))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**64 - 1))
@click.option("--height", type=click.IntRange(1), help="Pixels; default: the artifact's opt height.")
@click.option("--width", type=click.IntRange(1), help="Pixels; default: the artifact's opt width.")
@click.option("--guidance", type=float, help="Guidance scale; default: the pipeline's (FLUX.1 3.5, SD3 7.0).")
@click.option("--negative-prompt", help="For pipelines with classifier-free guidance (SD3).")
@click.option(
    "--image",
    "image_path",
    type=click.Path(dir_okay=False),
    help="Reference image to edit (FLUX.1 Kontext); resized to the generation size.",
)
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option(
    "--out",
    "out_path",
    default="out.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help=".png, .jpg or .webp",
)
@click.option(
    "--verify",
    "verify",
    type=click.Choice(("recorded", "full")),
    default="recorded",
    show_default=True,
    help="recorded: hash only files changed since their last check; full: hash every file the run loads.",
)
@click.option("--no-verify", is_flag=True, help="Skip the sha256 checks (sizes are still checked).")
@click.option(
    "--cache",
    "cache",
    type=click.Choice(("on", "off")),
    help="Skip cached blocks of a block-engine artifact (default: on when it has a cache section).",
)
def run(
    artifact: str,
    prompt: str,
    steps: int,
    seed: int,
    height: int | None,
    width: int | None,
    guidance: float | None,
    negative_prompt: str | None,
    image_path: str | None,
    backend: str,
    out_path: str,
    verify: str,
    no_verify: bool,
    cache: str | None,
) -> None:
    """Run the denoising loop with the artifact's engine and write an image."""
    from dtcompile.runtime.run import run_artifact

    out, image_format = _output_file(out_path)  # checked before the run, not after it
    image = None if image_path is None else _reference_image(image_path)
    result = run_artifact(
        Path(artifact),
        prompt,
        steps=steps,
        seed=seed,
        height=height,
        width=width,
        guidance=guidance,
        negative_prompt=negative_prompt,
        image=image,
        backend=backend,
        verify="size" if no_verify else verify,
        cache=None if cache is None else cache == "on",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        result.image.save(tmp, format=image_format)
        tmp.replace(out)
    except OSError as exc:  # a full or read-only disk: nothing half-written, the error names --out
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from None
    click.echo(
        f"wrote {out} ({result.image.width}x{result.image.height}) with {result.backend} {result.arch}: "
        f"{result.steps} steps in {result.seconds:.2f}s"
    )
    if result.cache_stats is not None:
        from dtcompile.recipe.cache import stats_line

        click.echo(stats_line(result.cache_stats))


#: Image formats ``--out`` may name, by suffix.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _reference_image(value: str) -> Any:
    """``--image``: a readable image file, as an RGB PIL image; UsageError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(value) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise click.UsageError(f"--image {value}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise click.UsageError(f"--image {value}: not a readable image ({type(exc).__name__})") from None


def _output_file(value: str) -> tuple[Path, str]:
    """``--out``: the path and the image format its suffix names; UsageError for anything else."""
    out = Path(value)
    image_format = IMAGE_FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise click.UsageError(f"--out {value}: expected a {', '.join(IMAGE_FORMATS)} file name")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise click.UsageError(f"--out {value}: {parent} is a file, not a folder")
            break
    return out, image_format
