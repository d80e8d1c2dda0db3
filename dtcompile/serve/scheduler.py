"""The bounded job queue and the worker thread that runs inference, so the event loop never waits on it.

One worker per process runs every model it serves on its device (one GPU, or the CPU reference backend);
several GPUs are several processes (docs/serving.md). The worker takes the oldest job and, behind it, every
queued job with the same batch key (model, size, steps, guidance, negative prompt, LoRA adapter set) that still
fits the batch, so requests that differ wait their turn in arrival order and none starves. ``pick`` may take a
younger job first (per-request LoRA: one whose adapters are loaded, within a wait bound; serve/adapters.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dtcompile.serve.protocol import APIError

log = logging.getLogger("dtcompile.serve")


@dataclass(eq=False)
class Job:
    """One request's work: ``n`` images (or, with ``frames``, videos) of one prompt; ``future`` gets them (or the
    error); ``steps_done`` counts the denoising steps of the batch running it."""

    model: str
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float | None
    seed: int
    negative_prompt: str | None = None
    image: Any = None  # the reference image of an edit (never batched with another job's)
    lora: tuple[tuple[str, float], ...] = ()  # the adapter set (serve/adapters.py); () the artifact's own weights
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    frames: int | None = None  # a video job's frame count (None: images)
    steps_done: int = 0
    #: set when nobody waits for the answer any more (504, client gone): a running batch stops between steps
    #: once every job in it is cancelled
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: a streamed request's previews: ``partial_images`` previews, one every ``preview_every`` steps, each passed
    #: to ``on_preview(index, images)`` from the worker thread
    partial_images: int = 0
    preview_every: int = 0
    on_preview: Callable[[int, list[Any]], None] | None = None

    @property
    def key(self) -> Hashable:
        # each edit has its own reference, each previewed stream its own latents to decode: batched alone
        alone = id(self) if self.image is not None or self.partial_images else None
        return (
            self.model,
            self.width,
            self.height,
            self.frames,
            self.steps,
            self.guidance,
            self.negative_prompt,
            alone,
            self.lora,
        )

    def cancel(self) -> None:
        """Nobody waits for this job any more: dropped if still queued, stopped between steps if running."""
        self.cancelled.set()
        self.future.cancel()


class JobCancelled(Exception):
    """Raised between denoising steps when every job of the running batch was cancelled (timed out, client gone)."""


class Scheduler:
    """A bounded FIFO of ``Job`` s and one worker thread; ``run_batch(jobs)`` returns each job's images.

    ``capacity(model)`` is how many images one batch of that model may hold (its engine's built max batch,
    capped by ``--max-batch``). Thread-safe: the event loop submits, the worker takes.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Job]], list[list[Any]]],
        capacity: Callable[[str], int],
        max_queue: int,
        *,
        on_batch: Callable[[list[Job]], None] | None = None,
        on_drop: Callable[[Job], None] | None = None,
        pick: Callable[[Sequence[Job]], int] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._capacity = capacity
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda jobs: None)
        self._on_drop = on_drop or (lambda job: None)
        self._pick = pick or (lambda queue: 0)  # which queued job goes next (LoRA: one whose adapters are loaded)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running = 0  # images in the batch being run
        self.last_batch_seconds = 1.0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dtc-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue ``job``; APIError 503 once draining, 429 (with Retry-After) when the queue is full."""
        with self._cond:
            if not self._accepting:
                raise APIError(503, "the server is shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue:
                retry = max(1, round(self.last_batch_seconds))
                raise APIError(
                    429,
                    f"the queue is full ({self.max_queue} requests waiting); retry after {retry} s",
                    headers={"Retry-After": str(retry)},
                )
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def drain(self) -> int:
        """Stop accepting; answer every queued job with 503; the running batch finishes. Returns how many."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(APIError(503, "the server is shutting down; the request was not started"))
        return len(queued)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        """The next batch (possibly empty when all were cancelled), or None once stopping."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].future.cancelled():
                    self._on_drop(self._queue.popleft())
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            at = self._pick(self._queue) if len(self._queue) > 1 else 0
            head = self._queue[at]
            del self._queue[at]
            batch, room = [head], self._capacity(head.model) - head.n
            for job in list(self._queue):
                if room <= 0:
                    break
                if job.key == head.key and job.n <= room:
                    if job.future.cancelled():
                        continue
                    self._queue.remove(job)
                    batch.append(job)
                    room -= job.n
        started = []
        for job in batch:
            if job.future.set_running_or_notify_cancel():
                started.append(job)
            else:
                self._on_drop(job)
        return started

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            self.running = sum(job.n for job in batch)
            self._on_batch(batch)
            t0 = time.perf_counter()
            try:
                results = self._run_batch(batch)
            except JobCancelled as exc:  # nobody is waiting: one line, no traceback
                log.info("batch of %d job(s) for %s stopped: %s", len(batch), batch[0].model, exc)
                for job in batch:
                    job.future.set_exception(exc)
            except Exception as exc:  # every job of the batch gets the error; the worker goes on
                log.exception("batch of %d job(s) for %s failed", len(batch), batch[0].model)
                for job in batch:
                    job.future.set_exception(exc)
            else:
                for job, images in zip(batch, results, strict=True):
                    job.future.set_result(images)
            finally:
                self.running = 0
                self.last_batch_seconds = time.perf_counter() - t0
