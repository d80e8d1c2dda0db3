"""`dtc bench`: measured speed and memory of an artifact's engines next to the plain PyTorch pipeline."""

from __future__ import annotations

import click

from dtcompile.runtime.run import BACKEND_CHOICES


@click.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(BACKEND_CHOICES),
    help="Engine backend to compare with PyTorch; repeat for several. [default: auto]",
)
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 1000), help="Denoising steps per run.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="Images per prompt.")
@click.option("--height", type=click.IntRange(1), help="Pixels; default: the artifact's opt height.")
@click.option("--width", type=click.IntRange(1), help="Pixels; default: the artifact's opt width.")
@click.option("--frames", type=click.IntRange(1), help="Video artifacts: pixel frames; default: the built opt.")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1), help="Timed runs per backend.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed 1-step runs first.")
@click.option("--prompt", default=None, help="Text prompt (default: a fixed one).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for torch and onnxruntime (default: theirs).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here (+ a PNG beside).")
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks of the engine and the source model.")
@click.option(
    "--parallel", help="cfg=2, ulysses=N, cfg=2,ulysses=N: step latency over the ranks against 1 rank, and bytes sent."
)
@click.option("--residency", type=click.Choice(("all", "sequential")), default="all", show_default=True,
              help="sequential: engines load when their component runs and release after (swap times reported).")  # fmt: skip
def bench(
    artifact: str,
    backends: tuple[str, ...],
    steps: int,
    batch: int,
    height: int | None,
    width: int | None,
    frames: int | None,
    repeat: int,
    warmup: int,
    prompt: str | None,
    seed: int,
    threads: int | None,
    json_path: str | None,
    no_verify: bool,
    parallel: str | None,
    residency: str,
) -> None:
    """Run PyTorch and the artifact's engines interleaved on the same inputs; print latency, memory, ratios."""
    from pathlib import Path

    from dtcompile.tools.bench import DEFAULT_PROMPT, bench_artifact, format_report, write_report

    if parallel is not None:
        import json

        from dtcompile.runtime.parallel import ParallelSpec
        from dtcompile.tools.bench_parallel import bench_parallel, format_parallel_report

        if len(backends) > 1:
            raise click.UsageError("--parallel compares ranks on one backend: give one --backend")
        settings = {"prompt": prompt or DEFAULT_PROMPT, "steps": steps, "seed": seed, "height": height, "width": width,
                    "frames": frames, "images_per_prompt": batch, "backend": (backends or ("auto",))[0]}  # fmt: skip
        result = bench_parallel(Path(artifact), ParallelSpec.parse(parallel), settings, repeat=repeat, threads=threads)
        click.echo(format_parallel_report(result))
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
            click.echo(f"wrote {json_path}")
        return

    report = bench_artifact(
        Path(artifact),
        backends or ("auto",),
        steps=steps,
        batch=batch,
        height=height,
        width=width,
        frames=frames,
        repeat=repeat,
        warmup=warmup,
        prompt=prompt or DEFAULT_PROMPT,
        seed=seed,
        verify=not no_verify,
        threads=threads,
        residency=residency,
    )
    click.echo(format_report(report))
    if json_path:
        written, note = write_report(report, Path(json_path))
        click.echo("wrote " + ", ".join(str(p) for p in written))
        if note:
            click.echo(note)
