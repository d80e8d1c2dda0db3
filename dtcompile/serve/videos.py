"""OpenAI's video API for video artifacts (Wan): the ``/v1/videos`` routes, as an APIRouter ``app.py`` mounts
under ``/v1`` (so the bearer check covers them).

- ``POST /v1/videos``: a job (JSON or multipart, as ``client.videos.create`` sends it), answered at once with
  OpenAI's Video object; the worker runs it beside the image requests, and the MP4 goes to the ``VideoStore``.
- ``GET /v1/videos`` (list), ``GET /v1/videos/{id}`` (status and progress), ``GET /v1/videos/{id}/content``
  (the MP4, with HTTP range requests), ``DELETE /v1/videos/{id}``.
- ``POST /v1/videos/generations``: the same request, answered with the MP4 itself once it is made (as
  trtllm-serve's synchronous route does); the job is listed like the others.

A job does not depend on its client: it runs to the end whether or not anyone waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dtcompile.core.errors import DtcError
from dtcompile.runtime.limits import FPS_RANGE
from dtcompile.runtime.session import REQUEST_NAMES
from dtcompile.serve.bodies import read_body
from dtcompile.serve.protocol import SIZE_RE, APIError
from dtcompile.serve.scheduler import Job
from dtcompile.serve.video_store import VideoGone, VideoRecord, VideoStore

if TYPE_CHECKING:
    from dtcompile.serve.app import ServerState
    from dtcompile.serve.models import ServedModel

log = logging.getLogger("dtcompile.serve")
router = APIRouter()
#: Frames per second when a request names none (Wan2.1/2.2 are trained at 16; ``dtc run --fps``'s default).
DEFAULT_FPS = 16.0
CHUNK = 1 << 20  # bytes per read of a download


class VideoRequest(BaseModel):
    """``POST /v1/videos`` and ``/v1/videos/generations`` (everything but the ``input_reference`` upload).

    OpenAI's fields (``prompt``, ``model``, ``seconds``, ``size``, ``user``) plus ``num_frames``, ``fps``,
    ``seed``, ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``; any other field is a 400.
    """

    model_config = ConfigDict(extra="forbid", strict=False)

    prompt: str = Field(min_length=1)
    model: str | None = None
    seconds: float | None = Field(default=None, gt=0, le=3600, allow_inf_nan=False)
    num_frames: int | None = Field(default=None, ge=1, le=100_000)
    size: str | None = None
    fps: float | None = Field(default=None, ge=FPS_RANGE[0], le=FPS_RANGE[1], allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, allow_inf_nan=False, ge=0, le=100)
    negative_prompt: str | None = None
    user: str | None = Field(default=None, max_length=256)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    """APIError whose OpenAI ``type`` is the client's for the statuses ``protocol.ERROR_KINDS`` does not list."""
    err = APIError(status, message, param=param, code=code)
    if 400 <= status < 500:
        err.type = "invalid_request_error"
    return err


def _state(request: Request) -> ServerState:
    return request.app.state.dtc_provider()


def _store(s: ServerState) -> VideoStore | None:
    return getattr(s, "videos", None)


# --- reading a request ----------------------------------------------------------------------------------------


async def read_video_request(request: Request, limit: int, timeout: float) -> tuple[VideoRequest, bytes | None]:
    """(the request, the ``input_reference`` image bytes or None) of a JSON or multipart body read within
    ``limit`` bytes and ``timeout`` seconds (``serve.bodies``); 400 naming the field otherwise."""
    body = await read_body(request, limit, timeout)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    reference: bytes | None = None
    if kind == "multipart/form-data":
        fields, reference = await _read_form(request, body)
    elif kind in ("application/json", ""):
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise APIError(400, "the request body must be a JSON object")
        value = fields.pop("input_reference", None)
        if value is not None:
            reference = _reference_from_json(value)
    else:
        raise APIError(400, f"Content-Type {kind!r}: send application/json or multipart/form-data")
    return parse_video_fields(fields), reference


async def _read_form(request: Request, body: bytes) -> tuple[dict[str, Any], bytes | None]:
    """A multipart body already in memory: its text fields and the ``input_reference`` file (or a
    ``input_reference[image_url]`` data URL, as the openai client sends a reference object)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    fields: dict[str, Any] = {}
    reference: bytes | None = None
    async with Request(request.scope, replay).form(max_files=1, max_fields=64) as form:
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key.startswith("input_reference["):
                    reference = _reference_from_json({key[len("input_reference[") : -1]: value})
                else:
                    fields[key] = value
            elif key != "input_reference":
                raise APIError(400, f"{key}: unexpected file (the only upload is input_reference)", param=key)
            else:
                reference = await value.read()
    return fields, reference


def _reference_from_json(value: Any) -> bytes:
    """``input_reference`` given as a reference object ``{"image_url": "data:image/png;base64,..."}``: the image
    bytes (no URL is fetched, no file id resolved)."""
    url = value.get("image_url") if isinstance(value, dict) else None
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise APIError(
            400,
            "input_reference: upload the image as a multipart file, or give {'image_url': 'data:image/png;base64,...'}"
            " (no URL is fetched, no file_id resolved)",
            param="input_reference",
        )
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "input_reference: image_url is not valid base64", param="input_reference") from None


def parse_video_fields(fields: dict[str, Any]) -> VideoRequest:
    """The request model for decoded fields, or APIError 400 naming the first bad one."""
    try:
        return VideoRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            message = f"{param}: unknown parameter (this route accepts: input_reference, {', '.join(VideoRequest.model_fields)})"
        else:
            message = f"{param}: {err['msg']}"
        raise APIError(400, message, param=param) from None


# --- from a request to a job ----------------------------------------------------------------------------------


def frames_for_seconds(model: ServedModel, seconds: float, fps: float) -> int:
    """The frame count the model makes nearest to ``seconds`` at ``fps`` (ties: fewer); 400 naming ``seconds``
    when that rounds outside what it makes."""
    from dtcompile.core.errors import UnsupportedError
    from dtcompile.runtime.run import check_frames

    r = model.manifest.shapes["frames"]
    valid = []
    for n in range(r.min, r.max + 1):
        try:
            check_frames(model.manifest, n, model.session.config)
        except UnsupportedError:
            continue
        valid.append(n)
    wanted = seconds * fps
    if not valid or not valid[0] <= round(wanted) <= valid[-1]:
        span = f"{valid[0]}..{valid[-1]}" if valid else "none"
        lo, hi = (valid[0] / fps, valid[-1] / fps) if valid else (0.0, 0.0)
        raise APIError(
            400,
            f"seconds: {seconds:g} s at {fps:g} fps is {wanted:g} frames; model {model.name} makes {span} frames "
            f"({lo:.4g}..{hi:.4g} s at {fps:g} fps): lower seconds or fps, or give num_frames",
            param="seconds",
        )
    return min(valid, key=lambda n: (abs(n - wanted), n))


def check_work(req: VideoRequest, frames: int, width: int, height: int, steps: int, limit: int) -> None:
    """400 when frames x width x height x steps is over ``limit`` (``dtc serve --max-video-work``), naming the
    parameter the request set that weighs most (steps, then frames, then size)."""
    work = frames * width * height * steps
    if work <= limit:
        return
    if req.num_inference_steps is not None:
        param = "num_inference_steps"
    elif req.num_frames is not None or req.seconds is not None:
        param = "num_frames" if req.num_frames is not None else "seconds"
    else:
        param = "size" if req.size not in (None, "auto") else "num_inference_steps"
    raise APIError(
        400,
        f"{param}: {frames} frames x {width}x{height} x {steps} steps = {work} pixel-steps, over this server's "
        f"limit of {limit} per video (dtc serve --max-video-work); lower num_inference_steps, num_frames/seconds "
        "or size",
        param=param,
    )


def _param_of(message: str, req: VideoRequest) -> str:
    """Which request parameter a ``Session.request`` error (worded with ``REQUEST_NAMES``) is about."""
    if message.startswith(REQUEST_NAMES.frames):
        return "seconds" if req.seconds is not None else "num_frames"
    if message.startswith(REQUEST_NAMES.guidance):
        return "guidance_scale"
    if message.startswith(REQUEST_NAMES.negative_prompt):
        return "negative_prompt"
    if message.startswith(f"{REQUEST_NAMES.image}:"):
        return "input_reference"
    return "size"  # "image width 63 ...", "height 200 is outside ..."


def make_video_job(s: ServerState, model: ServedModel, req: VideoRequest, image: Any) -> tuple[Job, float]:
    """(the scheduler's ``Job`` for one video, its fps), or APIError 400 naming the parameter the model cannot
    take. Checks run here, before anything is queued."""
    options, name, pipeline = s.options, model.name, model.manifest.source.pipeline_class
    if not model.adapter.video:
        raise APIError(400, f"model {name} ({pipeline}) makes images: use /v1/images/generations", param="model")
    if len(req.prompt) > options.max_prompt_chars:
        raise APIError(400, f"prompt: {len(req.prompt)} characters, at most {options.max_prompt_chars}", param="prompt")
    if image is not None and not model.adapter.reference_image:
        raise _no_reference(model)
    if model.adapter.reference_image and image is None:
        raise APIError(
            400, f"input_reference: model {name} ({pipeline}) needs a reference image", param="input_reference"
        )
    if req.seconds is not None and req.num_frames is not None:
        raise APIError(400, "seconds: give seconds or num_frames, not both", param="seconds")
    shapes = model.manifest.shapes
    fps = req.fps if req.fps is not None else DEFAULT_FPS
    if req.size in (None, "auto"):
        width, height = shapes["width"].opt, shapes["height"].opt
    else:
        match = SIZE_RE.match(req.size)
        if not match:
            raise APIError(400, f"size {req.size!r}: expected 'WIDTHxHEIGHT' such as '832x480'", param="size")
        width, height = int(match.group(1)), int(match.group(2))
    if req.num_frames is not None:
        frames = req.num_frames
    elif req.seconds is not None:
        frames = frames_for_seconds(model, req.seconds, fps)
    else:
        frames = shapes["frames"].opt
    steps = req.num_inference_steps or options.default_steps
    if steps > options.max_steps:
        raise APIError(400, f"num_inference_steps: {steps} is over this server's limit of {options.max_steps} "
                       "(dtc serve --max-steps)", param="num_inference_steps")  # fmt: skip
    check_work(req, frames, width, height, steps, options.max_video_work)
    try:
        model.session.request(req.prompt, steps=1, height=height, width=width, frames=frames,
                              guidance=req.guidance_scale, negative_prompt=req.negative_prompt, image=image,
                              names=REQUEST_NAMES)  # fmt: skip
    except DtcError as exc:
        message = str(exc)
        param = _param_of(message, req)
        if param == "size":
            message = f"size {width}x{height}: {message.removeprefix('image ')}"
        elif param == "seconds":
            message = f"seconds {req.seconds:g} at {fps:g} fps ({message})"
        elif param == "input_reference":
            message = f"input_reference{message.removeprefix(REQUEST_NAMES.image)}"
        raise APIError(400, message, param=param) from None
    seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
    job = Job(name, req.prompt, 1, width, height, steps, req.guidance_scale, seed, req.negative_prompt, image,
              frames=frames)  # fmt: skip
    return job, fps


def _no_reference(model: ServedModel) -> APIError:
    return APIError(
        400,
        f"input_reference: model {model.name} ({model.manifest.source.pipeline_class}) makes video from text only "
        "and takes no reference image (serve an image-to-video artifact for that)",
        param="input_reference",
    )


def _decode_reference(data: bytes | None, max_pixels: int) -> Any:
    if data is None:
        return None
    from dtcompile.serve.protocol import read_reference

    try:
        return read_reference(data, "input_reference", max_pixels)
    except APIError as exc:  # worded for /v1/images/edits' "image"
        raise APIError(400, f"input_reference{exc.message.removeprefix('image')}", param="input_reference") from None


async def _submit(request: Request, s: ServerState) -> tuple[VideoRecord, concurrent.futures.Future]:
    """Read, check and queue one video; (its record, a future set once its MP4 is stored or it failed)."""
    if not s.ready:
        raise APIError(503, s.not_ready())
    req, reference = await read_video_request(request, s.options.max_body_bytes, s.options.body_timeout)
    model = s.model(req.model)
    store = _store(s)
    if store is None or not model.adapter.video:
        raise APIError(400, f"model {model.name} ({model.manifest.source.pipeline_class}) makes images: use "
                       "/v1/images/generations", param="model")  # fmt: skip
    if reference is not None and not model.adapter.reference_image:  # refused before any decoding
        raise _no_reference(model)
    image = (
        await asyncio.to_thread(_decode_reference, reference, s.options.max_image_pixels)
        if reference is not None
        else None
    )
    job, fps = make_video_job(s, model, req, image)
    record = VideoRecord(store.new_id(), model.name, req.prompt, job.width, job.height, job.frames or 0, fps,
                         job.steps, job.seed, job=job)  # fmt: skip
    store.add(record)
    try:
        s.scheduler.submit(job)
    except APIError:
        store.delete(record.id)
        raise
    stored: concurrent.futures.Future = concurrent.futures.Future()
    job.future.add_done_callback(lambda fut: _finish(store, record, fps, fut, stored))
    log.info("video %s queued: %s, %d frames %dx%d, %d steps", record.id, model.name, record.frames, job.width,
             job.height, job.steps)  # fmt: skip
    return record, stored


def _finish(store: VideoStore, record: VideoRecord, fps: float, fut: concurrent.futures.Future,
            stored: concurrent.futures.Future) -> None:  # fmt: skip
    """The job's end (in the thread that ended it: the worker, or the drain): its MP4 written into the store, or
    the failure recorded with its reason."""
    try:
        if fut.cancelled():  # deleted while queued
            store.delete(record.id)
        elif (exc := fut.exception()) is not None:  # the store reads it from the future (VideoRecord.settle)
            record.ended = time.time()
            log.info("video %s failed: %s", record.id, getattr(exc, "message", None) or type(exc).__name__)
        else:
            from dtcompile.runtime.media import write_mp4

            path = store.path_for(record.id)
            write_mp4(fut.result()[0], path, fps)
            nbytes = path.stat().st_size
            store.complete(record.id, path)
            log.info("video %s completed (%d bytes)", record.id, nbytes)
    except Exception:
        log.exception("video %s: storing the result failed", record.id)
        store.fail(record.id, "internal_error", "encoding or storing the video failed (see the server log)")
    finally:
        stored.set_result(None)


def _count(s: ServerState, name: str, status: int) -> None:
    s.metrics.requests.labels(name, str(status)).inc()


# --- routes ---------------------------------------------------------------------------------------------------


@router.post("/videos")
async def create_video(request: Request) -> JSONResponse:
    """Queue a video; answered at once with its Video object (status ``queued``)."""
    s = _state(request)
    try:
        record, _ = await _submit(request, s)
    except APIError as exc:
        _count(s, "-", exc.status)
        raise
    _count(s, record.model, 200)
    return JSONResponse(record.body())


@router.post("/videos/generations")
async def generate_video(request: Request) -> Response:
    """The same request, answered with the MP4 once it is made (``x-dtc-video-id`` names the job; it is listed
    and downloadable like any other). Past ``--request-timeout``: 504, and the job goes on."""
    s = _state(request)
    t0 = time.monotonic()
    try:
        record, stored = await _submit(request, s)
        left = max(0.0, s.options.request_timeout - (time.monotonic() - t0))
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(stored)), timeout=left)
        except asyncio.TimeoutError:
            raise APIError(
                504,
                f"the video did not finish within the server's request timeout ({s.options.request_timeout:g} s); "
                f"it goes on: GET /v1/videos/{record.id}",
                code="timeout",
            ) from None
        if _get(_store(s), record.id).status == "failed":
            error = record.error or {}
            status = 503 if error.get("code") == "service_unavailable" else 500
            raise APIError(status, str(error.get("message", "generation failed")), code=error.get("code"))
        data = await asyncio.to_thread(_read_all, _store(s), record.id)
    except APIError as exc:
        _count(s, "-", exc.status)
        raise
    _count(s, record.model, 200)
    s.metrics.request_seconds.labels(record.model).observe(time.monotonic() - t0)
    return Response(data, media_type="video/mp4", headers={"x-dtc-video-id": record.id})


def _read_all(store: VideoStore | None, video_id: str) -> bytes:
    assert store is not None
    record = _get(store, video_id)
    try:
        f, _ = store.open_content(video_id)
    except KeyError:
        raise _not_ready(record) from None
    with f:
        return f.read()


@router.get("/videos")
async def list_videos(request: Request) -> dict[str, Any]:
    """OpenAI's cursor page of Video objects (newest first unless ``order=asc``); ``limit`` 1..100, ``after``
    an id. Query values are read here, so a bad one is OpenAI's 400, not FastAPI's validation error."""
    query = request.query_params
    unknown = sorted(set(query) - {"after", "limit", "order"})
    if unknown:
        raise APIError(400, f"{unknown[0]}: unknown query parameter (after, limit, order)", param=unknown[0])
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise APIError(400, f"limit {raw!r}: expected a whole number from 1 to 100", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order {order!r}: expected 'asc' or 'desc'", param="order")
    limit, after = int(raw), query.get("after")
    store = _store(_state(request))
    records, more = store.list(after=after, limit=limit, order=order) if store is not None else ([], False)
    data = [r.body() for r in records]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}  # fmt: skip


def _get(store: VideoStore | None, video_id: str) -> VideoRecord:
    """The record, or 404 (never existed or deleted) / 410 (evicted or expired)."""
    try:
        record = store.get(video_id) if store is not None else None
    except VideoGone as exc:
        raise _error(410, str(exc), code="video_expired") from None
    if record is None:
        raise _error(404, f"no video {video_id!r} on this server", code="not_found")
    return record


def _not_ready(record: VideoRecord) -> APIError:
    status, progress = record.current()
    if status == "failed":
        return _error(409, f"video {record.id} failed and has no content: {(record.error or {}).get('message')}",
                      code="video_failed")  # fmt: skip
    return _error(409, f"video {record.id} is not ready ({status}, {progress}%): poll GET /v1/videos/{record.id} "
                  "until its status is completed", code="video_not_ready")  # fmt: skip


@router.get("/videos/{video_id}")
async def retrieve_video(request: Request, video_id: str) -> JSONResponse:
    """A job's Video object; while it is queued or running, ``openai-poll-after-ms`` says when to ask again."""
    record = _get(_store(_state(request)), video_id)
    body = record.body()
    headers = {} if record.finished else {"openai-poll-after-ms": "500"}
    return JSONResponse(body, headers=headers)


@router.delete("/videos/{video_id}")
async def delete_video(request: Request, video_id: str) -> dict[str, Any]:
    """Delete a finished video (its MP4 too) or cancel a queued one; a running one cannot be deleted (409)."""
    store = _store(_state(request))
    record = _get(store, video_id)
    assert store is not None
    status, progress = record.current()
    if status == "in_progress":
        raise _error(409, f"video {video_id} is being generated ({progress}%); delete it once it completes or "
                     "fails", code="video_in_progress")  # fmt: skip
    if status == "queued" and record.job is not None and not record.job.future.cancel():
        raise _error(409, f"video {video_id} has just started; delete it once it completes or fails",
                     code="video_in_progress")  # fmt: skip
    store.delete(video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}


RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a ``Range`` header for a ``size``-byte file; None to send it all
    (no header, or several ranges, which a server may answer in full); APIError 416 when unsatisfiable or
    malformed."""
    if header is None or "," in header:
        return None
    m = RANGE_RE.match(header.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise _range_error(f"Range {header!r}: expected 'bytes=FIRST-LAST', 'bytes=FIRST-' or 'bytes=-SUFFIX'", size)
    if not m.group(1):  # the last N bytes
        suffix = int(m.group(2))
        if suffix == 0:
            raise _range_error(f"Range {header!r}: an empty suffix range", size)
        return max(0, size - suffix), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        raise _range_error(f"Range {header!r}: outside the video's {size} bytes", size)
    return first, min(last, size - 1)


def _range_error(message: str, size: int) -> APIError:
    err = _error(416, message, code="range_not_satisfiable")
    err.headers = {"Content-Range": f"bytes */{size}"}
    return err


@router.get("/videos/{video_id}/content")
async def video_content(request: Request, video_id: str) -> Response:
    """The MP4 (``variant=video``, the only one made here); ``Range: bytes=...`` gets 206 with Content-Range."""
    variant = request.query_params.get("variant", "video")
    if variant != "video":
        raise APIError(400, f"variant {variant!r}: only 'video' is made here (no thumbnail or spritesheet)",
                       param="variant")  # fmt: skip
    store = _store(_state(request))
    record = _get(store, video_id)
    assert store is not None
    try:
        f, size = store.open_content(video_id)
    except KeyError:
        raise _not_ready(record) from None
    try:
        span = byte_range(request.headers.get("range"), size)
    except APIError:
        f.close()
        raise
    first, last = span if span is not None else (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(last - first + 1),
               "Content-Disposition": f'attachment; filename="{video_id}.mp4"'}  # fmt: skip
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(_chunks(f, first, last - first + 1), status_code=206 if span else 200,
                             media_type="video/mp4", headers=headers)  # fmt: skip


async def _chunks(f: Any, start: int, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes of open file ``f`` from ``start``, read off the event loop; closes ``f``."""
    try:
        await asyncio.to_thread(f.seek, start)
        left = length
        while left > 0:
            block = await asyncio.to_thread(f.read, min(CHUNK, left))
            if not block:
                return
            left -= len(block)
            yield block
    finally:
        f.close()


__all__ = ["DEFAULT_FPS", "VideoRequest", "byte_range", "make_video_job", "router"]
