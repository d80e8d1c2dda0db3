"""`dtc run`: generate an image (or a video) with a built (or pulled) artifact."""

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
    help="Reference image to edit (FLUX.1 Kontext; resized to the generation size) or the first frame of an "
    "image-to-video artifact (Wan I2V; without --height/--width the size follows its aspect).",
)
@click.option(
    "--last-image",
    "last_image_path",
    type=click.Path(dir_okay=False),
    help="Image-to-video artifacts whose pipeline takes one (Wan2.2 I2V): the last frame's image.",
)
@click.option(
    "--frames", type=click.IntRange(1), help="Video artifacts: pixel frames (Wan: 4k+1); default: the built opt."
)
@click.option("--fps", default=16.0, show_default=True, type=click.FloatRange(0, 240, min_open=True),
              help="Video artifacts: frames per second of the MP4.")  # fmt: skip
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option(
    "--out",
    "out_path",
    default="out.png",
    show_default=True,
    type=click.Path(),  # a folder is allowed: PNG frames of a video (checked by _output_file)
    help=".png, .jpg or .webp; video artifacts: .mp4 (H.264), a folder (PNG frames) or an image with --frames 1",
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
@click.option(
    "--parallel",
    help="Split one request over local ranks: cfg=2 runs the two guidance branches at once, ulysses=N splits the "
    "sequence over N ranks, cfg=2,ulysses=N both (docs/parallel.md).",
)
@click.option(
    "--cache-threshold",
    type=float,
    help="first_block and teacache artifacts: the skip threshold for this run (default: the recipe's).",
)
@click.option("--residency", type=click.Choice(("all", "sequential")),
              help="sequential: only the running component's engine is loaded (docs/memory.md); "
              "default: from --device-memory, else all.")  # fmt: skip
@click.option("--device-memory", metavar="SIZE",
              help="Device-memory budget, e.g. 16GiB: picks the residency and streamable engines' budgets.")  # fmt: skip
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
    last_image_path: str | None,
    frames: int | None,
    fps: float,
    backend: str,
    out_path: str,
    verify: str,
    no_verify: bool,
    cache: str | None,
    cache_threshold: float | None,
    parallel: str | None,
    residency: str | None,
    device_memory: str | None,
) -> None:
    """Run the denoising loop with the artifact's engines and write an image or a video."""
    from dtcompile.runtime.limits import check_run_options
    from dtcompile.runtime.session import Session

    check_run_options(guidance=guidance, fps=fps)  # documented ranges, before any engine loads
    session = Session(Path(artifact), backend, verify="size" if no_verify else verify,
                      cache=None if cache is None else cache == "on", cache_threshold=cache_threshold,
                      residency=residency, device_memory=device_memory)  # fmt: skip
    out, image_format = _output_file(out_path, session.video, frames)  # checked before the run
    image = None if image_path is None else _reference_image(image_path)
    last_image = None if last_image_path is None else _reference_image(last_image_path, "--last-image")
    settings: dict[str, Any] = {"steps": steps, "seed": seed, "height": height, "width": width, "guidance": guidance,
                "negative_prompt": negative_prompt, "image": image, "frames": frames}  # fmt: skip
    if last_image is not None:
        settings["last_image"] = last_image
    if parallel is not None:
        from dtcompile.runtime.parallel import ParallelSpec
        from dtcompile.runtime.session import run_artifact_parallel

        if cache is not None or cache_threshold is not None:
            raise click.UsageError("--parallel runs monolithic artifacts: drop --cache and --cache-threshold")
        spec = ParallelSpec.parse(parallel)
        result = run_artifact_parallel(Path(artifact), spec, prompt, backend=backend, verify=session.verify, **settings)
    else:
        result = session.generate(session.request(prompt, **settings))
    what = _write(result.image, out, image_format, fps)
    click.echo(
        f"wrote {out} ({what}) with {result.backend} {result.arch}: {result.steps} steps in {result.seconds:.2f}s"
    )
    for line in _report_lines(result, session.residency.policy):
        click.echo(line)


def _write(media_out: Any, out: Path, image_format: str, fps: float) -> str:
    """Write the run's image or frames to ``out``; what was written, for the summary line."""
    from dtcompile.runtime import media

    out.parent.mkdir(parents=True, exist_ok=True)
    if image_format == "MP4":
        return f"{media.write_mp4(media_out, out, fps)} frames at {fps:g} fps"
    if image_format == "FRAMES":
        return f"{media.write_frames(media_out, out)} PNG frames"
    picture = media_out
    if not hasattr(picture, "save"):  # a one-frame video
        from PIL import Image

        picture = Image.fromarray(media.video_uint8(picture)[0])
    media.write_image(picture, out, image_format)
    return f"{picture.width}x{picture.height}"


def _report_lines(result: Any, residency: str) -> list[str]:
    """The parallel, cache and residency lines after the summary (those that apply)."""
    lines = []
    if result.parallel is not None:
        p = result.parallel
        how = ", ".join(x for x in (f"{p['split']} guidance branches" if p["split"] else "",
                                    f"sequence over {p['ulysses']} ranks" if p["ulysses"] > 1 else "") if x)  # fmt: skip
        lines.append(
            f"parallel: {p['ranks']} ranks ({how}), {p['bytes_sent_per_step']:.0f} bytes sent per rank per step"
        )
        if "ulysses_bytes_per_step" in p:
            lines.append(f"ulysses: {p['ulysses_bytes_per_step']:.0f} bytes per rank per step in all-to-alls and the "
                         f"output gather (predicted from the shapes: {p['ulysses_predicted_bytes_per_step']:.0f})")  # fmt: skip
    if result.cache_stats is not None:
        from dtcompile.recipe.cache import stats_line

        lines.append(stats_line(result.cache_stats))
    if result.swaps:
        from dtcompile.runtime.residency import swap_line

        lines.append(swap_line(residency, result.swaps))
    return lines


def _reference_image(value: str, flag: str = "--image") -> Any:
    """``--image`` (or ``--last-image``): a regular image file within the documented size, as an RGB PIL image
    (runtime.inputs)."""
    from dtcompile.runtime.inputs import read_reference_image

    return read_reference_image(value, flag=flag)


def _output_file(value: str, video: bool = False, frames: int | None = None) -> tuple[Path, str]:
    """``--out``: the path and its format (an image format, "MP4" or "FRAMES" for a folder of PNGs);
    UsageError for anything else."""
    from dtcompile.runtime.media import IMAGE_FORMATS, VIDEO_SUFFIXES

    out = Path(value)
    suffix = out.suffix.lower()
    if video and (value.endswith("/") or out.is_dir()):
        if out.is_dir() and any(out.iterdir()):
            raise click.UsageError(f"--out {value}: folder is not empty; PNG frames go into an empty or new folder")
        return out, "FRAMES"
    if suffix in VIDEO_SUFFIXES:
        if not video:
            raise click.UsageError(
                f"--out {value}: this artifact makes images; expected a {', '.join(IMAGE_FORMATS)} file name"
            )
        return _parents_ok(out, value), "MP4"
    image_format = IMAGE_FORMATS.get(suffix)
    if video and image_format is not None and frames != 1:
        raise click.UsageError(
            f"--out {value}: a video artifact writes .mp4 or a folder/ of PNG frames (an image only with --frames 1)"
        )
    if image_format is None:
        choices = ", ".join([*VIDEO_SUFFIXES, *IMAGE_FORMATS, "a folder/"] if video else IMAGE_FORMATS)
        raise click.UsageError(f"--out {value}: expected a {choices} file name")
    return _parents_ok(out, value), image_format


def _parents_ok(out: Path, value: str) -> Path:
    """``out`` when no file stands where one of its folders should be (UsageError otherwise)."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise click.UsageError(f"--out {value}: {parent} is a file, not a folder")
            break
    return out
