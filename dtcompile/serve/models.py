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
from dtcompile.serve.scheduler import Job, JobCancelled

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
    video_dir: str | None = None  # finished videos (None: $DTC_CACHE_DIR/serve-videos); serve-<pid>/ per process
    video_ttl: float = 3600.0
    video_store_items: int = 64
    video_store_bytes: int = 4 << 30
    max_video_work: int = 4_000_000_000  # frames x width x height x steps of one video (81 x 1280x720 x 50 fits)
    url_max_bytes: int = 1 << 30
    parallel: Any = None  # runtime.parallel.ParallelSpec: each request's guidance branches on ranks of their own
    max_steps: int = 100
    #: a request's work bound in megapixel-steps (steps x width x height x n / 1e6): one value for every model,
    #: or per model name; a model not named gets ``max_steps`` x its opt size x its batch capacity
    max_work: dict[str, float] | float | None = None
    #: the largest edit image taken, in pixels (read from its header before decoding)
    max_image_pixels: int = 4096 * 4096
    #: seconds a request body may take to arrive in full (a stalled upload gets 408)
    body_timeout: float = 60.0
    #: the base of ``url`` answers (``https://images.example.com``); None: relative urls (``/v1/images/files/..``)
    public_url: str | None = None
    residency: str | None = None  # all | sequential (runtime/residency.py); None: from device_memory
    device_memory: str | None = None  # a device-memory budget such as "16GiB" (runtime/memory.py)
    lora_dir: Path | None = None  # per-request LoRA adapters (serve/adapters.py)
    lora_max_wait: float = 10.0  # seconds the oldest job may be passed over to save a LoRA swap

    def work_limit(self, model: str, opt_pixels: int, capacity: int) -> float:
        """The megapixel-steps one request to ``model`` may ask for."""
        if isinstance(self.max_work, dict) and model in self.max_work:
            return self.max_work[model]
        if isinstance(self.max_work, (int, float)):
            return float(self.max_work)
        return self.max_steps * opt_pixels * capacity / 1e6


#: Pipelines whose latents decode to a preview the way their own last step does (unpack, unscale, VAE decode).
PREVIEW_PIPELINES = frozenset({"FluxPipeline", "FluxKontextPipeline", "StableDiffusion3Pipeline"})


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
        return cls(Session(Path(artifact_dir), options.backend, verify=options.verify, parallel=options.parallel,
                           residency=options.residency, device_memory=options.device_memory))  # fmt: skip

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
        if self.adapter.video:
            raise APIError(
                400,
                f"model {self.name} ({self.manifest.source.pipeline_class}) makes videos: use /v1/videos",
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
        if req.stream and req.partial_images and self.pipeline_class not in PREVIEW_PIPELINES:
            raise APIError(
                400, f"partial_images: model {self.name} ({self.pipeline_class}) has no latent preview; use "
                "partial_images: 0", param="partial_images",
            )  # fmt: skip
        shapes = self.manifest.shapes
        width, height = req.pixel_size() or (shapes["width"].opt, shapes["height"].opt)
        steps = req.num_inference_steps or options.default_steps
        self.check_work(req, options, capacity, steps, width, height)
        try:
            self.session.request(req.prompt, steps=1, height=height, width=width, guidance=req.guidance_scale,
                                 image=image, names=REQUEST_NAMES)  # fmt: skip
        except DtcError as exc:
            message = str(exc).removeprefix("image ")
            if req.guidance_scale is not None and message.startswith(REQUEST_NAMES.guidance):
                raise APIError(400, message, param="guidance_scale") from None
            raise APIError(400, f"size {width}x{height}: {message}", param="size") from None
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
        job = Job(self.name, req.prompt, req.n, width, height, steps, req.guidance_scale, seed, req.negative_prompt,
                  image, lora)  # fmt: skip
        if req.stream and req.partial_images:
            job.partial_images = req.partial_images
            job.preview_every = max(1, steps // (req.partial_images + 1))
        return job

    @property
    def pipeline_class(self) -> str:
        return self.manifest.source.pipeline_class

    def check_work(self, req: ImageGenerationRequest, options: ServeOptions, capacity: int, steps: int, width: int,
                   height: int) -> None:  # fmt: skip
        """APIError 400 when a request asks for more steps than ``--max-steps`` or more megapixel-steps (steps x
        width x height x n) than the model's ``--max-work``; the message names the parameter to lower."""
        if steps > options.max_steps:
            raise APIError(400, f"num_inference_steps: {steps}, at most {options.max_steps} on this server "
                           "(dtc serve --max-steps)", param="num_inference_steps")  # fmt: skip
        shapes = self.manifest.shapes
        limit = options.work_limit(self.name, shapes["width"].opt * shapes["height"].opt, capacity)
        work = steps * width * height * req.n / 1e6
        if work > limit:
            # name the field the request chose that weighs most: steps, then n, then size
            param = ("num_inference_steps" if req.num_inference_steps is not None else
                     "n" if req.n > 1 else "size")  # fmt: skip
            raise APIError(
                400,
                f"{param}: {steps} steps x {width}x{height} x n={req.n} is {work:.3g} megapixel-steps, over this "
                f"server's limit of {limit:.3g} for model {self.name} (dtc serve --max-work); lower "
                "num_inference_steps, size or n",
                param=param,
            )

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
        previews = [0] * len(jobs)
        # CFG-parallel follower ranks run the same steps in lockstep: stopping rank 0 alone would strand them
        stoppable = self.followers is None

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            if on_step is not None:
                on_step(now - last[0])
            last[0] = now
            for job in jobs:  # a video's progress (GET /v1/videos/{id})
                job.steps_done = step + 1
            if stoppable and all(job.cancelled.is_set() for job in jobs):
                raise JobCancelled(f"nobody waits for it any more (timed out or gone), after {step + 1} of "
                                   f"{head.steps} steps")  # fmt: skip
            at = 0
            for i, job in enumerate(jobs):
                due = (step + 1) % max(job.preview_every, 1) == 0 and step + 1 < head.steps
                if job.on_preview is not None and previews[i] < job.partial_images and due:
                    latents = kwargs["latents"][at : at + job.n]
                    job.on_preview(previews[i], self.preview(pipe, latents, job.height, job.width))
                    previews[i] += 1
                at += job.n
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
            "frames": head.frames,
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

    @staticmethod
    def preview(pipe: Any, latents: Any, height: int, width: int) -> list[Any]:
        """PIL previews of a step's latents, decoded as the pipeline's own last step does (``PREVIEW_PIPELINES``:
        unpack FLUX's 2x2 tokens, undo the VAE's scale and shift, decode, post-process)."""
        vae = pipe.vae
        if latents.ndim == 3:  # FLUX packs 2x2 latent patches into tokens
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents / vae.config.scaling_factor + shift
        image = vae.decode(latents.to(getattr(vae, "dtype", latents.dtype)), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")
