"""`dtc serve`: OpenAI-compatible image generation over built artifacts (docs/serving.md)."""

from __future__ import annotations

import click

from dtcompile.runtime.run import BACKEND_CHOICES


@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key-env", metavar="VAR", help="Require 'Authorization: Bearer $VAR' on /v1 routes.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="Requests waiting beyond the running batch; more get 429.")  # fmt: skip
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Images per engine batch (capped by the artifact's built max batch).")  # fmt: skip
@click.option("--request-timeout", default=600.0, show_default=True, type=click.FloatRange(0.1, 86400),
              help="Seconds from accepted to answered; later gets 504.")  # fmt: skip
@click.option("--default-steps", default=28, show_default=True, type=click.IntRange(1, 1000),
              help="num_inference_steps when a request has none.")  # fmt: skip
@click.option("--max-prompt-chars", default=4000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(64))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--verify", type=click.Choice(("recorded", "full")), default="recorded", show_default=True,
              help="How engine files are checked at load (as for dtc run).")  # fmt: skip
@click.option("--no-warmup", is_flag=True, help="Skip the 1-step warm-up generation per model.")
@click.option("--ray", "ray_replicas", type=click.IntRange(1), metavar="N",
              help="Run as a Ray Serve deployment with N replicas (one per GPU where there are GPUs).")  # fmt: skip
@click.option(
    "--parallel",
    help="cfg=2 / ulysses=N / cfg=2,ulysses=N: each request split over local ranks (one artifact; docs/parallel.md).",
)
def serve(
    artifacts: tuple[str, ...],
    host: str,
    port: int,
    api_key_env: str | None,
    max_queue: int,
    max_batch: int,
    request_timeout: float,
    default_steps: int,
    max_prompt_chars: int,
    max_body_bytes: int,
    backend: str,
    verify: str,
    no_warmup: bool,
    ray_replicas: int | None,
    parallel: str | None,
) -> None:
    """Serve artifacts at /v1/images/generations, /v1/models, /health, /ready and /metrics."""
    from dtcompile.serve.models import ServeOptions
    from dtcompile.serve.server import open_state, read_api_key, serve

    spec = None
    if parallel is not None:
        from dtcompile.runtime.parallel import ParallelSpec

        spec = ParallelSpec.parse(parallel)
        if len(artifacts) != 1 or ray_replicas is not None:
            raise click.UsageError("--parallel serves one artifact in one process group: one ARTIFACT, no --ray")

    options = ServeOptions(
        backend=backend,
        verify=verify,
        max_queue=max_queue,
        max_batch=max_batch,
        request_timeout=request_timeout,
        max_prompt_chars=max_prompt_chars,
        max_body_bytes=max_body_bytes,
        default_steps=default_steps,
        warmup=not no_warmup,
        parallel=spec,
    )
    api_key = read_api_key(api_key_env)
    if ray_replicas is not None:
        from dtcompile.serve.ray_app import run_ray

        run_ray(list(artifacts), options, api_key, host=host, port=port, replicas=ray_replicas)
        return
    state = open_state(artifacts, options, api_key)
    click.echo(f"serving {', '.join(state.models)} on http://{host}:{port}/v1 (ready once /ready answers 200)")
    serve(state, host, port)
    click.echo("stopped")
