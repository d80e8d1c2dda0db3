"""One served artifact: its pipeline with the engines standing in, the request checks and the batch call."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtcompile.core.errors import DtcError
from dtcompile.manifest import Manifest, read_manifest
from dtcompile.serve.protocol import APIError, ImageGenerationRequest
from dtcompile.serve.scheduler import Job

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


class ServedModel:
    """An artifact loaded for serving; ``name`` is the artifact's name (the request's ``model``)."""

    def __init__(self, artifact_dir: Path, manifest: Manifest) -> None:
        from dtcompile.models import adapter_for
        from dtcompile.runtime.run import pipeline_config

        self.artifact_dir = artifact_dir
        self.manifest = manifest
        self.name = manifest.name
        self.adapter = adapter_for(manifest.source.pipeline_class)
        self.config = pipeline_config(artifact_dir)  # read once: requests are checked against it
        self.pipe: Any = None
        self.module: Any = None
        self.entry: Any = None

    @classmethod
    def open(cls, artifact_dir: str | Path) -> ServedModel:
        """Read (not load) an artifact; ArtifactError when it is no servable artifact."""
        from dtcompile.core.errors import ArtifactError

        path = Path(artifact_dir)
        manifest = read_manifest(path)
        if manifest.stopped_after:
            raise ArtifactError(f"{path}: the build stopped after '{manifest.stopped_after}'; it has no engines")
        return cls(path, manifest)

    @property
    def batch_max(self) -> int:
        return self.manifest.shapes["batch"].max

    def load(self, options: ServeOptions) -> None:
        from dtcompile.runtime.run import load_engine_pipeline

        t0 = time.perf_counter()
        self.pipe, self.module, _, self.entry = load_engine_pipeline(
            self.artifact_dir, options.backend, verify=options.verify
        )
        log.info("loaded %s (%s %s) in %.1fs", self.name, self.entry.backend, self.entry.arch, time.perf_counter() - t0)

    def warm_up(self) -> float:
        """One 1-step generation at the opt size (first-call allocations, kernel selection); seconds taken."""
        t0 = time.perf_counter()
        shapes = self.manifest.shapes
        job = Job(self.name, "warm-up", 1, shapes["width"].opt, shapes["height"].opt, 1, None, 0)
        self.generate([job])
        seconds = time.perf_counter() - t0
        log.info("warmed up %s in %.2fs", self.name, seconds)
        return seconds

    def make_job(self, req: ImageGenerationRequest, options: ServeOptions, capacity: int, image: Any = None) -> Job:
        """The ``Job`` for a request (``image``: an edit's reference), or APIError 400 naming the parameter the
        model cannot take."""
        from dtcompile.runtime.run import check_generation

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
        size = req.pixel_size() or (shapes["width"].opt, shapes["height"].opt)
        width, height = size
        try:
            check_generation(self.manifest, height, width, self.config, flag="{}")
        except DtcError as exc:
            raise APIError(400, f"size {width}x{height}: {str(exc).removeprefix('image ')}", param="size") from None
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
        steps = req.num_inference_steps or options.default_steps
        return Job(self.name, req.prompt, req.n, width, height, steps, req.guidance_scale, seed, req.negative_prompt,
                   image)  # fmt: skip

    def generate(self, jobs: list[Job], on_step: Callable[[float], None] | None = None) -> list[list[Any]]:
        """Run one batch (same size, steps and guidance) and split the images back by job.

        Image ``i`` of a job is seeded with ``seed + i``, each on its own CPU generator, so an image does not
        depend on what it was batched with, and ``n=1, seed=s`` equals ``dtc run --seed s``.
        """
        import torch

        from dtcompile.models.base import GenerationRequest

        head = jobs[0]
        prompts, generators = [], []
        for job in jobs:
            for i in range(job.n):
                prompts.append(job.prompt)
                generators.append(torch.Generator("cpu").manual_seed((job.seed + i) % 2**64))
        last = [time.perf_counter()]

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            if on_step is not None:
                on_step(now - last[0])
            last[0] = now
            return kwargs

        if hasattr(self.module, "begin_run"):
            self.module.begin_run(head.steps)
        request = GenerationRequest(
            prompts,
            head.steps,
            head.height,
            head.width,
            generator=generators,
            guidance=head.guidance,
            text_len=self.manifest.shapes["text_len"].opt,
            callback=step_end,
            negative_prompt=head.negative_prompt
            if head.negative_prompt is None
            else [head.negative_prompt] * len(prompts),
            image=head.image,
        )
        with torch.inference_mode():
            images = self.adapter.output_media(self.pipe(**self.adapter.call_kwargs(request)))
        out, at = [], 0
        for job in jobs:
            out.append(images[at : at + job.n])
            at += job.n
        return out
