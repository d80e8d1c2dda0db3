"""One served artifact: its pipeline with the engines standing in, the request checks and the batch call."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import DtcError
from dtcompile.runtime.session import REQUEST_NAMES
from dtcompile.serve.protocol import APIError, ImageGenerationRequest
from dtcompile.serve.scheduler import Job

if TYPE_CHECKING:
    from dtcompile.runtime.session import Session

log = logging.getLogger("dtcompile.serve")


@dataclass
class ServeOptions:
    """The server's limits and defaults (``dtc serve`` options)."""

    backend: str = "auto"
    verify: str = "recorded"
    max_queue: int = 64
    max_batch: int = 4
    request_timeout: float = 600.0
    max_prompt_chars: int = 4000
    max_body_bytes: int = 1 << 20
    default_steps: int = 28
    warmup: bool = True
    url_ttl: float = 3600.0
    url_max_items: int = 256
    url_max_bytes: int = 256 << 20
    parallel: Any = None  # runtime.parallel.ParallelSpec: each request's guidance branches on ranks of their own
    lora_dir: Path | None = None  # per-request LoRA adapters (serve/adapters.py)
    lora_max_wait: float = 10.0  # seconds the oldest job may be passed over to save a LoRA swap


class ServedModel:
    """An artifact served under its name (the request's ``model``): a runtime ``Session`` and the request checks
    in the API's terms."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.followers: Any = None  # runtime.parallel.Followers of a CFG-parallel model, once loaded
        self.artifact_dir = session.artifact_dir
        self.manifest = session.manifest
        self.name = session.name
        self.adapter = session.adapter

    @classmethod
    def open(cls, artifact_dir: str | Path, options: ServeOptions | None = None) -> ServedModel:
        """Open (not load) an artifact; ArtifactError when it is no servable artifact."""
        from dtcompile.runtime.session import Session

        options = options or ServeOptions()
        return cls(Session(Path(artifact_dir), options.backend, verify=options.verify, parallel=options.parallel))

    @property
    def batch_max(self) -> int:
        return self.manifest.shapes["batch"].max

    @property
    def pipe(self) -> Any:
        return self.session.pipe

    @property
    def entry(self) -> Any:
        return self.session.entry

    def start_ranks(self, options: ServeOptions) -> None:
        """A CFG-parallel model: make this process rank 0 and spawn the follower ranks. Call it from the main
        thread: a rank spawned from a thread that then finishes exits with it (seen with the server's loading
        thread: the follower left with code 0 once loading was done)."""
        spec = self.session.parallel
        if spec is not None and self.followers is None:
            import functools

            from dtcompile.runtime.parallel import start_followers
            from dtcompile.runtime.session import follow_requests

            job = functools.partial(follow_requests, self.artifact_dir, spec, options.backend, options.verify, None)
            self.followers = start_followers(spec, job)

    def load(self, options: ServeOptions) -> None:
        t0 = time.perf_counter()
        self.start_ranks(options)
        self.session.load()
        entry = self.session.entry
        assert entry is not None
        log.info("loaded %s (%s %s) in %.1fs", self.name, entry.backend, entry.arch, time.perf_counter() - t0)

    def warm_up(self) -> float:
        """One 1-step generation at the opt size (first-call allocations, kernel selection); seconds taken."""
        t0 = time.perf_counter()
        shapes = self.manifest.shapes
        width, height = shapes["width"].opt, shapes["height"].opt
        image = None
        if self.adapter.reference_image:  # an editing model warms up on a plain grey reference
            from PIL import Image

            image = Image.new("RGB", (width, height), (128, 128, 128))
        job = Job(self.name, "warm-up", 1, width, height, 1, None, 0, None, image)
        self.generate([job])
        seconds = time.perf_counter() - t0
        log.info("warmed up %s in %.2fs", self.name, seconds)
        return seconds

    def make_job(self, req: ImageGenerationRequest, options: ServeOptions, capacity: int, image: Any = None,
                 lora: tuple[tuple[str, float], ...] = ()) -> Job:  # fmt: skip
        """The ``Job`` for a request (``image``: an edit's reference; ``lora``: its checked adapter set), or
        APIError 400 naming the parameter the model cannot take."""
        if len(req.prompt) > options.max_prompt_chars:
            raise APIError(
                400, f"prompt: {len(req.prompt)} characters, at most {options.max_prompt_chars}", param="prompt"
            )
        if req.negative_prompt is not None and not self.adapter.negative_prompt:
            raise APIError(
                400,
                f"negative_prompt: model {self.name} ({self.manifest.source.pipeline_class}) is guidance-distilled "
                "and takes no negative prompt",
                param="negative_prompt",
            )
        if self.adapter.video:  # a video endpoint is not served yet
            raise APIError(
                400,
                f"model {self.name} ({self.manifest.source.pipeline_class}) makes videos; video generation is not "
                "served yet, use dtc run --out video.mp4",
                param="model",
            )
        if self.adapter.reference_image and image is None:
            raise APIError(
                400,
                f"model {self.name} ({self.manifest.source.pipeline_class}) edits a reference image: use "
                "/v1/images/edits with an image",
                param="model",
            )
        if image is not None and not self.adapter.reference_image:
            raise APIError(
                400,
                f"image: model {self.name} ({self.manifest.source.pipeline_class}) takes no reference image; "
                "use /v1/images/generations",
                param="image",
            )
        if req.n > capacity:
            raise APIError(400, f"n: {req.n} images, at most {capacity} per request for model {self.name}", param="n")
        shapes = self.manifest.shapes
        width, height = req.pixel_size() or (shapes["width"].opt, shapes["height"].opt)
        try:
            self.session.request(req.prompt, steps=1, height=height, width=width, guidance=req.guidance_scale,
                                 image=image, names=REQUEST_NAMES)  # fmt: skip
        except DtcError as exc:
            message = str(exc).removeprefix("image ")
            if req.guidance_scale is not None and message.startswith(REQUEST_NAMES.guidance):
                raise APIError(400, message, param="guidance_scale") from None
            raise APIError(400, f"size {width}x{height}: {message}", param="size") from None
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
        steps = req.num_inference_steps or options.default_steps
        return Job(self.name, req.prompt, req.n, width, height, steps, req.guidance_scale, seed, req.negative_prompt,
                   image, lora)  # fmt: skip

    def generate(self, jobs: list[Job], on_step: Callable[[float], None] | None = None) -> list[list[Any]]:
        """Run one batch (same size, steps and guidance) through the session and split the images back by job.

        Image ``i`` of a job is seeded with ``seed + i``, each on its own CPU generator, so an image does not
        depend on what it was batched with, and ``n=1, seed=s`` equals ``dtc run --seed s``.
        """
        from dtcompile.runtime.session import broadcast_request, seeded

        head = jobs[0]
        prompts, seeds = [], []
        for job in jobs:
            for i in range(job.n):
                prompts.append(job.prompt)
                seeds.append((job.seed + i) % 2**64)
        last = [time.perf_counter()]

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            if on_step is not None:
                on_step(now - last[0])
            last[0] = now
            return kwargs

        settings: dict[str, Any] = {
            "prompt": prompts,
            "steps": head.steps,
            "seeds": seeds,
            "height": head.height,
            "width": head.width,
            "guidance": head.guidance,
            "negative_prompt": None if head.negative_prompt is None else [head.negative_prompt] * len(prompts),
            "image": head.image,
            "names": REQUEST_NAMES,
        }
        if self.followers is not None:  # CFG parallel: the follower ranks run the same request beside this one
            if not self.followers.alive():
                raise APIError(503, f"model {self.name}: a parallel rank has exited; restart the server")
            broadcast_request(settings)
        images = self.session.generate(self.session.request(callback=step_end, **seeded(settings))).media
        out, at = [], 0
        for job in jobs:
            out.append(images[at : at + job.n])
            at += job.n
        return out
