"""The ASGI app: OpenAI's image endpoints, model list, health, readiness and metrics over ``ServerState``.

The same app runs under uvicorn (``dtc serve``, ``dtcompile.serve.server``) and as a Ray Serve ingress
(``dtcompile.serve.ray_app``); routes find the state through a provider, so each Ray replica has its own.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dtcompile.serve.adapters import ServedLoras
from dtcompile.serve.bodies import bounded, read_body
from dtcompile.serve.metrics import ServerMetrics
from dtcompile.serve.models import ServedModel, ServeOptions
from dtcompile.serve.protocol import OUTPUT_FORMATS, APIError, parse_request
from dtcompile.serve.scheduler import Job, Scheduler
from dtcompile.serve.store import Gone, ImageStore
from dtcompile.serve.video_store import open_video_store
from dtcompile.serve.videos import router as video_router

log = logging.getLogger("dtcompile.serve")
IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never seen by a client


class ServerState:
    """Everything a server process holds: the models, the scheduler, metrics, the url store, readiness."""

    def __init__(self, models: list[ServedModel], options: ServeOptions, api_key: str | None = None) -> None:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            from dtcompile.core.errors import ArtifactError

            raise ArtifactError(f"two artifacts share a model name ({', '.join(names)}); each must be unique")
        self.models = {m.name: m for m in models}
        self.options = options
        self.api_key = api_key
        self.ready = False
        self.load_error: str | None = None
        self.on_fatal: Callable[[str], None] = lambda message: None
        self.started = time.time()
        self.metrics = ServerMetrics(lambda: len(self.scheduler), lambda: self.ready)
        self.store = ImageStore(options.url_ttl, options.url_max_bytes)
        self.videos = open_video_store(options, (m.adapter.video for m in models))  # None without video models
        self.decoding = threading.BoundedSemaphore(1)  # one edit image decoded at a time (its peak memory bounded)
        self.loras = ServedLoras(options.lora_dir, options.lora_max_wait, self._on_swap)
        self.scheduler = Scheduler(
            self._run_batch, self.capacity, options.max_queue, on_batch=self._on_batch, on_drop=self._on_drop,
            pick=self.loras.pick,
        )  # fmt: skip

    def capacity(self, model: str) -> int:
        return max(1, min(self.options.max_batch, self.models[model].batch_max))

    def load(self) -> None:
        """Load and warm every model, then start the worker (blocking; progress and timings in the log)."""
        t0 = time.perf_counter()
        for i, model in enumerate(self.models.values(), 1):
            log.info("[%d/%d] loading %s from %s", i, len(self.models), model.name, model.artifact_dir)
            model.load(self.options)
            self.loras.attach(model)
            if self.options.warmup:
                model.warm_up()
        self.scheduler.start()
        self.ready = True
        log.info("ready: %d model(s) in %.1fs", len(self.models), time.perf_counter() - t0)

    def load_in_background(self) -> None:
        def target() -> None:
            try:
                self.load()
            except Exception as exc:  # reported once, and the server stops (dtc serve exits non-zero)
                self.load_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.error("loading failed: %s", self.load_error)
                self.on_fatal(self.load_error)

        threading.Thread(target=target, name="dtc-loader", daemon=True).start()

    def drain(self) -> None:
        """Stop taking requests: queued ones get 503, the running batch completes."""
        self.ready = False
        answered = self.scheduler.drain()
        log.info("draining: %d queued request(s) answered 503, %d image(s) still running", answered,
                 self.scheduler.running)  # fmt: skip

    def not_ready(self) -> str:
        """Why requests get 503 now (only meaningful while ``ready`` is False)."""
        if self.load_error is not None:
            return f"loading failed: {self.load_error}"
        return "the server is shutting down" if not self.scheduler.accepting else "models are loading"

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise APIError(400, f"model: required (this server has {', '.join(self.models)})", param="model")
        if name not in self.models:
            raise APIError(
                404, f"model {name!r} does not exist (this server has: {', '.join(self.models)})",
                param="model", code="model_not_found",
            )  # fmt: skip
        return self.models[name]

    def _run_batch(self, jobs: list[Job]) -> list[list[Any]]:
        model = self.models[jobs[0].model]
        self.loras.activate(model.name, jobs[0].lora)
        step = self.metrics.step_seconds.labels(model.name)
        return model.generate(jobs, on_step=step.observe)

    def _on_batch(self, jobs: list[Job]) -> None:
        name = jobs[0].model
        now = time.monotonic()
        self.metrics.batch_size.labels(name).observe(sum(j.n for j in jobs))
        for job in jobs:
            self.metrics.queue_seconds.labels(name).observe(now - job.enqueued)

    def _on_swap(self, model: str, seconds: float) -> None:
        self.metrics.lora_swaps.labels(model).inc()
        self.metrics.lora_swap_seconds.labels(model).observe(seconds)

    def _on_drop(self, job: Job) -> None:
        self.metrics.dropped.labels(job.model).inc()


def create_app(provider: Callable[[], ServerState], *, autoload: bool = True) -> FastAPI:
    """The app; ``provider()`` returns the process's ``ServerState``. ``autoload``: load it at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if autoload:
            provider().load_in_background()
        yield
        state = provider()
        state.drain()
        await asyncio.to_thread(state.scheduler.join, max(30.0, state.options.request_timeout))  # a running video too

    from dtcompile.core.versions import DTC_VERSION

    app = FastAPI(title="dtcompile", version=DTC_VERSION, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.dtc_provider = provider

    @app.api_route("/openapi.json", methods=["GET", "HEAD"], include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        from dtcompile.serve.openapi import openapi_schema

        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app)
        return JSONResponse(app.openapi_schema)

    @app.middleware("http")
    async def name_the_server(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response = await call_next(request)
        # which process answered (a Ray replica unpickles this app: read the pid here, not when it was made)
        response.headers["x-dtc-server"] = f"{socket.gethostname()}-{os.getpid()}"
        return response

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.dtc_provider()


def _authorized(request: Request) -> None:
    key = _state(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")


State = Annotated[ServerState, Depends(_state)]
router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorized)])


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    headers = dict(exc.headers or {})  # a 405 carries Allow
    if "Allow" in headers and "HEAD" not in headers["Allow"] and "GET" in headers["Allow"]:
        headers["Allow"] += ", HEAD"
    path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
    return await _api_error(request, APIError(exc.status_code, f"{request.method} {path}: {message}",
                                              headers=headers))  # fmt: skip


async def _client_gone(request: Request, exc: Exception) -> Response:
    """A client that hung up while sending its body: one log line, no traceback (nobody reads the answer)."""
    log.info("client gone during %s %s (request body not complete)", request.method, request.url.path)
    return Response(status_code=CLIENT_GONE)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return await _api_error(request, APIError(500, "internal server error (see the server log)"))


@router.api_route("/health", methods=["GET", "HEAD"])
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(s: State) -> dict[str, Any]:
    if not s.ready:
        raise APIError(503, s.not_ready())
    return {"status": "ready", "models": list(s.models)}


@router.get("/metrics")
async def metrics(s: State) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.api_route("/v1/images/files/{image_id}", methods=["GET", "HEAD"])
async def image_file(image_id: str, s: State) -> Response:
    # a capability url (unguessable, expiring): no bearer token, so a browser or <img> can fetch it
    try:
        item = s.store.get(image_id) if IMAGE_ID_RE.match(image_id) else None
    except Gone as exc:
        raise APIError(410, f"image {image_id}: {exc}", code="gone") from None
    if item is None:
        raise APIError(404, "no such image (image urls expire)", code="not_found")
    age = max(0, int(s.options.url_ttl))
    return Response(item[0], media_type=item[1], headers={"Cache-Control": f"private, max-age={age}"})


@v1.get("/models")
async def list_models(s: State) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(s, m) for m in s.models.values()]}


@v1.get("/models/{name}")
async def get_model(name: str, s: State) -> dict[str, Any]:
    return _model_card(s, s.model(name))


@v1.post("/images/generations")
async def generations(request: Request, s: State) -> Response:

    async def read() -> tuple[Any, Any]:
        return parse_request(await _read_json(request, s.options.max_body_bytes, s.options.body_timeout)), None

    return await _serve_images(request, s, read, "image_generation")


async def _serve_images(request: Request, s: ServerState, read: Callable[[], Any], events: str) -> Response:
    """One images request end to end: ``read()`` -> (request model, ``_Upload`` of the reference or None), then
    the job, the wait and the body (or the event stream, ``events`` naming its event types), with the status of
    every outcome counted."""
    t0 = time.monotonic()
    name = "-"
    try:
        if not s.ready:
            raise APIError(503, s.not_ready())
        req, upload = await read()
        model = s.model(req.model)
        name = model.name
        job = model.make_job(req, s.options, s.capacity(model.name), image=upload, lora=s.loras.choice(name, req.lora))
        if upload is not None:  # decoded after the size is known, off the event loop, one at a time
            job.image = await asyncio.to_thread(_decode, s, upload, (job.width, job.height))
        if req.stream:
            return _stream(request, s, name, job, req, t0, events)
        s.scheduler.submit(job)
        images = await _wait(request, job, s.options.request_timeout, t0)
        encoded = await asyncio.to_thread(_encode, images, req.output_format, req.output_compression)
    except APIError as exc:
        s.metrics.requests.labels(name, str(exc.status)).inc()
        raise
    except (_ClientGone, ClientDisconnect):
        s.metrics.requests.labels(name, str(CLIENT_GONE)).inc()
        log.info("client gone: %s %s for %s", request.method, request.url.path, name)
        return Response(status_code=CLIENT_GONE)
    except Exception:
        s.metrics.requests.labels(name, "500").inc()
        raise
    return _images_response(request, s, name, job, req, encoded, t0)


def _raise_failure(exc: BaseException | None, name: str) -> None:
    """A job's error as the APIError its client gets (None: no error)."""
    if isinstance(exc, APIError):
        raise exc
    if exc is not None:
        log.error("generation failed for %s: %s", name, exc)
        raise APIError(500, "generation failed (see the server log)")


def _count_ok(s: ServerState, name: str, images: int, t0: float) -> None:
    s.metrics.requests.labels(name, "200").inc()
    s.metrics.images.labels(name).inc(images)
    s.metrics.request_seconds.labels(name).observe(time.monotonic() - t0)


def _decode(s: ServerState, upload: _Upload, fit: tuple[int, int]) -> Any:
    from dtcompile.serve.protocol import read_reference

    with s.decoding:
        return read_reference(upload.data, upload.filename, s.options.max_image_pixels, fit)


def _sse(event: str, body: dict[str, Any]) -> bytes:
    import json

    return f"event: {event}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def _stream(request: Request, s: ServerState, name: str, job: Job, req: Any, t0: float, events: str) -> Response:
    """OpenAI's image streaming: server-sent events ``<events>.partial_image`` (a preview decoded from the latents
    every ``preview_every`` steps, ``partial_images`` of them) then ``<events>.completed``; an error after the
    stream began is an ``error`` event with OpenAI's error body."""
    loop = asyncio.get_running_loop()
    previews: asyncio.Queue[tuple[int, list[Any]]] = asyncio.Queue()

    def on_preview(index: int, images: list[Any]) -> None:  # on the worker thread
        loop.call_soon_threadsafe(previews.put_nowait, (index, images))

    job.on_preview = on_preview
    s.scheduler.submit(job)  # 429/503 before the stream begins: an ordinary error answer
    common = {"background": req.background or "auto", "output_format": req.output_format,
              "quality": req.quality or "auto", "size": f"{job.width}x{job.height}"}  # fmt: skip

    async def event(kind: str, index: int | None, images: list[Any]) -> bytes:
        data = await asyncio.to_thread(_encode, images[:1], req.output_format, req.output_compression)
        body = {"type": f"{events}.{kind}", "b64_json": base64.b64encode(data[0]).decode("ascii"),
                "created_at": int(time.time()), **common}  # fmt: skip
        if index is not None:
            body["partial_image_index"] = index
        return _sse(body["type"], body)

    async def body() -> Any:
        result = asyncio.wrap_future(job.future)
        finished = False
        try:
            while not result.done():
                left = s.options.request_timeout - (time.monotonic() - t0)
                if left <= 0:
                    raise APIError(504, f"the request did not finish within the server's request timeout "
                                   f"({s.options.request_timeout:g} s)", code="timeout")  # fmt: skip
                getter = asyncio.ensure_future(previews.get())
                done, _ = await asyncio.wait({result, getter}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield await event("partial_image", *getter.result())
                else:
                    getter.cancel()
            while not previews.empty():  # previews sent before the result came back
                yield await event("partial_image", *previews.get_nowait())
            _raise_failure(result.exception(), name)
            finished = True
            yield await event("completed", None, result.result())
            _count_ok(s, name, 1, t0)
        except APIError as exc:
            s.metrics.requests.labels(name, str(exc.status)).inc()
            yield _sse("error", exc.body())
        finally:
            if not finished:  # timed out, failed, or the client left mid-stream: stop the work between steps
                job.cancel()
                asyncio.wrap_future(job.future).add_done_callback(_discard)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _images_response(request: Request, s: ServerState, name: str, job: Job, req: Any, encoded: list[bytes],
                     t0: float) -> JSONResponse:  # fmt: skip
    """OpenAI's images body (b64_json or url data) for a finished job, with its metrics."""
    mime = OUTPUT_FORMATS[req.output_format][1]
    if req.response_format == "url":
        # never the request's Host header (a client could make the url point anywhere): --public-url, else a
        # path relative to this server
        base = (s.options.public_url or "").rstrip("/")
        data = [{"url": f"{base}/v1/images/files/{s.store.put(b, mime)}"} for b in encoded]
    else:
        data = [{"b64_json": base64.b64encode(b).decode("ascii")} for b in encoded]
    _count_ok(s, name, len(data), t0)
    body = {"created": int(time.time()), "data": data, "output_format": req.output_format,
            "size": f"{job.width}x{job.height}"}  # fmt: skip
    return JSONResponse(body)


@v1.post("/images/edits")
async def edits(request: Request, s: State) -> Response:
    """OpenAI's image edit: a multipart form with ``image`` (the reference) and the generation parameters."""
    return await _serve_images(request, s, lambda: _read_edit(request, s.options), "image_edit")


@dataclass(frozen=True)
class _Upload:
    """An edit's image file as uploaded (decoded once the generation size is known)."""

    data: bytes
    filename: str | None


async def _read_edit(request: Request, options: ServeOptions) -> tuple[Any, _Upload]:
    """(request model, the uploaded image) of a multipart edit; 413 beyond ``max_body_bytes`` (counted while
    reading, with or without Content-Length), 408 past ``body_timeout``, 400 naming the field."""
    from dtcompile.serve.adapters import form_lora
    from dtcompile.serve.protocol import parse_edit_form

    limit = options.max_body_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "the request body must be multipart/form-data with an image file and a prompt")
    request_in = bounded(request, limit, options.body_timeout)
    async with request_in.form(max_files=1, max_fields=32, max_part_size=min(limit, 1 << 20)) as form:
        uploads = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
        fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str) and k[:4] != "lora"}
        lora = form_lora([(k, v) for k, v in form.multi_items() if isinstance(v, str) and k[:4] == "lora"])
        if not uploads or uploads[0][0] not in ("image", "image[]"):
            raise APIError(400, "image: missing (upload the reference image as the 'image' file)", param="image")
        data = await uploads[0][1].read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"image: over the limit of {limit} bytes", param="image")
        upload = _Upload(data, uploads[0][1].filename)
    return parse_edit_form(fields if lora is None else {**fields, "lora": lora}), upload


v1.include_router(video_router)  # /v1/videos...: serve/videos.py
router.include_router(v1)


def _model_card(s: ServerState, model: ServedModel) -> dict[str, Any]:
    shapes = model.manifest.shapes
    return {
        "id": model.name,
        "object": "model",
        "created": int(s.started),
        "owned_by": "dtcompile",
        "pipeline": model.manifest.source.pipeline_class,
        "sizes": {k: shapes[k].model_dump() for k in ("height", "width") if k in shapes},
        "max_images_per_batch": s.capacity(model.name),
        "lora": s.loras.offered(model.name),
    }


class _ClientGone(Exception):
    pass


async def _read_json(request: Request, limit: int, timeout: float) -> Any:
    """The decoded JSON body; APIError 413 beyond ``limit`` bytes (checked while reading), 408 past ``timeout``
    seconds, 400 if not JSON or nested too deep to decode."""
    import json

    body = await read_body(request, limit, timeout)
    try:
        return json.loads(body)
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:  # 50k nested brackets: a client's error, not the server's
        raise APIError(400, "the request body is nested too deeply to be a request") from None


async def _wait(request: Request, job: Job, timeout: float, since: float) -> list[Any]:
    """The job's images; drops a job whose client went away before it started, 504 ``timeout`` s after ``since``."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    left = max(0.0, timeout - (time.monotonic() - since))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        if result.cancelled():  # cancelled by us below, never otherwise
            raise _ClientGone
        exc = result.exception()
        if isinstance(exc, APIError):
            raise exc
        if exc is not None:
            raise APIError(500, "generation failed (see the server log)") from exc
        return result.result()
    result.add_done_callback(_discard)
    job.cancel()  # dropped while still queued; a running batch stops between steps once nobody waits for it
    if gone in done:
        raise _ClientGone
    raise APIError(
        504, f"the request did not finish within the server's request timeout ({timeout:g} s)", code="timeout"
    )


def _discard(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _encode(images: list[Any], output_format: str, compression: int | None) -> list[bytes]:
    pil_format = OUTPUT_FORMATS[output_format][0]
    out = []
    for image in images:
        buf = io.BytesIO()
        kwargs = {"quality": compression} if compression is not None and pil_format != "PNG" else {}
        image.save(buf, format=pil_format, **kwargs)
        out.append(buf.getvalue())
    return out
