"""`dtc serve`: OpenAI-compatible image generation over built artifacts (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

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
@click.option("--video-dir", type=click.Path(file_okay=False),
              help="Finished videos go in DIR/serve-<pid>/ (removed at exit; dead servers' at start). Default: "
                   "$DTC_CACHE_DIR/serve-videos.")  # fmt: skip
@click.option("--video-ttl", default=3600.0, show_default=True, type=click.FloatRange(1, 30 * 86400),
              help="Seconds a finished video is kept; later its id answers 410.")  # fmt: skip
@click.option("--video-store-items", default=64, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Finished videos kept; beyond it the oldest are evicted (410).")  # fmt: skip
@click.option("--video-store-bytes", default=4 << 30, show_default=True, type=click.IntRange(1),
              help="Bytes of MP4 kept; beyond it the oldest are evicted (410).")  # fmt: skip
@click.option("--max-video-work", default=4_000_000_000, show_default=True, type=click.IntRange(1),
              help="Most frames x width x height x steps one video may take; more is a 400.")  # fmt: skip
@click.option("--lora-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of LoRA .safetensors files requests may name (extra_body lora; docs/serving.md).")  # fmt: skip
@click.option("--lora-max-wait", default=10.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds the oldest request may wait while requests with the loaded LoRAs go first.")  # fmt: skip
@click.option(
    "--parallel",
    help="cfg=2 / ulysses=N / cfg=2,ulysses=N: each request split over local ranks (one artifact; docs/parallel.md).",
)
@click.option("--max-steps", default=100, show_default=True, type=click.IntRange(1, 100_000),
              help="Largest num_inference_steps a request may ask for.")  # fmt: skip
@click.option("--max-work", "max_work", multiple=True, metavar="[MODEL=]MPIX_STEPS",
              help="Largest steps x width x height x n / 1e6 per request, for every model or one (repeatable); "
                   "default: --max-steps x the model's opt size x its batch capacity.")  # fmt: skip
@click.option("--max-image-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1, 8192 * 8192),
              help="Largest edit image (read from its header before decoding).")  # fmt: skip
@click.option("--body-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a request body may take to arrive; a stalled upload gets 408.")  # fmt: skip
@click.option("--public-url", metavar="URL",
              help="Base of url answers (https://images.example.com); default http://HOST:PORT, or relative paths "
                   "when bound to every interface. Never taken from the request's Host header.")  # fmt: skip
@click.option("--url-ttl", default=3600.0, show_default=True, type=click.FloatRange(1, 7 * 86400),
              help="Seconds a url image is kept (unless the store is full).")  # fmt: skip
@click.option("--url-store-mb", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Memory for url images; when full the oldest are evicted (their urls answer 410).")  # fmt: skip
@click.option("--residency", type=click.Choice(("all", "sequential")),
              help="sequential: only the running component's engine is loaded (docs/memory.md); "
              "default: from --device-memory, else all.")  # fmt: skip
@click.option("--device-memory", metavar="SIZE",
              help="Device-memory budget, e.g. 16GiB: picks the residency and streamable engines' budgets.")  # fmt: skip
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
    video_dir: str | None,
    video_ttl: float,
    video_store_items: int,
    video_store_bytes: int,
    max_video_work: int,
    parallel: str | None,
    max_steps: int,
    max_work: tuple[str, ...],
    max_image_pixels: int,
    body_timeout: float,
    public_url: str | None,
    url_ttl: float,
    url_store_mb: int,
    residency: str | None,
    device_memory: str | None,
    lora_dir: Path | None,
    lora_max_wait: float,
) -> None:
    """Serve artifacts at /v1/images/generations, /v1/videos (video artifacts), /v1/models, /health, /ready and
    /metrics."""
    from dtcompile.serve.models import ServeOptions
    from dtcompile.serve.server import open_state, read_api_key, serve

    spec = None
    if parallel is not None:
        from dtcompile.runtime.parallel import ParallelSpec

        spec = ParallelSpec.parse(parallel)
        if len(artifacts) != 1 or ray_replicas is not None:
            raise click.UsageError("--parallel serves one artifact in one process group: one ARTIFACT, no --ray")

    if default_steps > max_steps:
        raise click.BadParameter(f"{default_steps} is above --max-steps {max_steps}", param_hint="--default-steps")
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
        video_dir=video_dir,
        video_ttl=video_ttl,
        video_store_items=video_store_items,
        video_store_bytes=video_store_bytes,
        max_video_work=max_video_work,
        parallel=spec,
        max_steps=max_steps,
        max_work=_work_limits(max_work),
        max_image_pixels=max_image_pixels,
        body_timeout=body_timeout,
        public_url=_public_url(public_url, host, port),
        url_ttl=url_ttl,
        url_max_bytes=url_store_mb << 20,
        residency=residency,
        device_memory=device_memory,
        lora_dir=lora_dir,
        lora_max_wait=lora_max_wait,
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


def _work_limits(values: tuple[str, ...]) -> dict[str, float] | float | None:
    """``--max-work`` values: one number for every model, or MODEL=NUMBER entries (the others get the default)."""
    if not values:
        return None
    limits: dict[str, float] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        try:
            limit = float(number)
        except ValueError:
            limit = -1.0
        if not limit > 0 or limit == float("inf"):
            raise click.BadParameter(
                f"{value!r}: expected [MODEL=]MPIX_STEPS, a positive number", param_hint="--max-work"
            )
        if not name:
            if len(values) > 1:
                raise click.BadParameter("one value for every model, or MODEL=VALUE entries", param_hint="--max-work")
            return limit
        limits[name] = limit
    return limits


def _public_url(value: str | None, host: str, port: int) -> str | None:
    """The base of url answers: ``--public-url`` (checked), else this server's own address, or None (relative
    urls) when it listens on every interface (no one address to give)."""
    from urllib.parse import urlsplit

    if value is None:
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
            return None
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise click.BadParameter(f"{value!r}: expected http(s)://HOST[:PORT][/PREFIX]", param_hint="--public-url")
    return value.rstrip("/")
