"""`dtc serve`'s video routes for real: a server process over the tiny Wan2.1 artifact (onnxruntime, CPU), the
unmodified openai client's `client.videos`, range requests, the bounded store (410 on eviction), SIGTERM; and the
store and the Range parser on their own."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.builds import ORT_ONLY, build_recipe
from tests.serve.test_server import KEY, Server, serving

PROMPT = "a cat playing piano"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-wan21.yaml", *ORT_ONLY)


@pytest.fixture(scope="module")
def server(wan: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Auth on, 2 steps unless asked, at most 2 finished videos kept, a small work bound; the last test stops it
    with SIGTERM."""
    tmp = tmp_path_factory.mktemp("serve-video")
    args = ("--api-key-env", "DTC_TEST_KEY", "--default-steps", "2", "--video-dir", str(tmp / "videos"),
            "--video-store-items", "2", "--no-warmup", "--max-video-work", str(17 * 96 * 96 * 50), "--max-body-bytes", "65536",
            "--max-prompt-chars", "200")  # fmt: skip
    with serving(wan, tmp, *args, env={"DTC_TEST_KEY": KEY}) as s:
        yield s


def client(server: Server):
    from openai import OpenAI

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the client marks client.videos deprecated
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def frames_of(mp4: bytes) -> np.ndarray:
    """Every frame of an MP4, decoded with PyAV, as frames x H x W x 3 uint8."""
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from dtcompile.core.metrics import psnr as metric

    return metric(a / 255.0, b / 255.0, cap=100.0)


def post(server: Server, path: str, body: dict) -> tuple[int, dict, bytes]:
    return server.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **AUTH})


def make(server: Server, **fields) -> str:
    """A finished video through the synchronous route; its id."""
    status, headers, data = post(server, "/v1/videos/generations", {"prompt": PROMPT, "size": "64x64",
                                                                      "num_frames": 5, **fields})  # fmt: skip
    assert status == 200, data[:300]
    assert headers["content-type"] == "video/mp4" and data[4:8] == b"ftyp"
    return headers["x-dtc-video-id"]


def test_openai_client_creates_polls_downloads_lists_deletes_what_dtc_run_makes(server: Server, wan: Path,
                                                                                tmp_path: Path) -> None:  # fmt: skip
    import openai

    from dtcompile.runtime.media import video_uint8, write_mp4
    from dtcompile.runtime.session import run_artifact

    c = client(server)
    video = c.videos.create(model="tiny-wan21", prompt=PROMPT, size="64x64",
                            extra_body={"num_frames": 9, "seed": 7, "num_inference_steps": 3, "fps": 8})  # fmt: skip
    assert video.object == "video" and video.id.startswith("video_") and video.status in ("queued", "in_progress")
    assert (video.model, video.size, video.seconds, video.prompt) == ("tiny-wan21", "64x64", "1.125", PROMPT)
    progress = [video.progress]
    deadline = time.monotonic() + 120
    while video.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        video = c.videos.retrieve(video.id)
        progress.append(video.progress)
    assert video.status == "completed" and video.error is None, video
    assert progress == sorted(progress) and progress[-1] == 100 and video.completed_at >= video.created_at
    assert video.expires_at > video.completed_at
    mp4 = c.videos.download_content(video.id).read()
    served = frames_of(mp4)
    assert served.shape == (9, 64, 64, 3)

    # `dtc run` for the same request: the same session call, written by the same MP4 writer
    ran = run_artifact(wan, PROMPT, steps=3, seed=7, height=64, width=64, frames=9, backend="onnxruntime")
    write_mp4(ran.image, tmp_path / "run.mp4", 8)
    same = psnr(served, frames_of((tmp_path / "run.mp4").read_bytes()))
    assert same >= 40
    print(f"PSNR served MP4 vs dtc run's MP4: {same:.1f} dB (100: identical); vs dtc run's frames before H.264: "
          f"{psnr(served, video_uint8(ran.image)):.1f} dB")  # fmt: skip

    assert video.id in [v.id for v in c.videos.list()]
    assert [v.id for v in c.videos.list(order="asc", limit=100)][-1] == video.id
    deleted = c.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        c.videos.retrieve(video.id)
    assert video.id not in [v.id for v in c.videos.list()]


def test_range_requests(server: Server) -> None:
    video_id = make(server)
    path = f"/v1/videos/{video_id}/content"
    status, headers, full = server.request("GET", path, headers=AUTH)
    size = len(full)
    assert status == 200 and headers["accept-ranges"] == "bytes" and int(headers["content-length"]) == size
    for spec, first, last in (("bytes=0-99", 0, 99), ("bytes=100-", 100, size - 1), ("bytes=-10", size - 10, size - 1),
                              (f"bytes=5-{size + 50}", 5, size - 1)):  # fmt: skip
        status, headers, part = server.request("GET", path, headers={**AUTH, "Range": spec})
        assert status == 206, spec
        assert headers["content-range"] == f"bytes {first}-{last}/{size}" and part == full[first : last + 1]
    for spec in (f"bytes={size}-", "bytes=9-3", "bytes=-0", "items=0-1", "bytes=x-"):
        status, headers, data = server.request("GET", path, headers={**AUTH, "Range": spec})
        err = json.loads(data)["error"]
        assert status == 416 and headers["content-range"] == f"bytes */{size}", spec
        assert err["code"] == "range_not_satisfiable" and err["type"] == "invalid_request_error"


def test_evicted_videos_answer_410_with_the_reason(server: Server) -> None:
    first = make(server)
    later = [make(server) for _ in range(2)]  # the store keeps 2 finished videos
    for path in (f"/v1/videos/{first}", f"/v1/videos/{first}/content"):
        status, _, data = server.request("GET", path, headers=AUTH)
        err = json.loads(data)["error"]
        assert status == 410 and err["code"] == "video_expired", err
        assert "--video-store-items" in err["message"] and "\n" not in err["message"]
    assert all(server.request("GET", f"/v1/videos/{v}", headers=AUTH)[0] == 200 for v in later)
    assert server.request("GET", "/v1/videos/video_" + "0" * 32, headers=AUTH)[0] == 404


def test_a_synchronous_video_survives_its_client_going_away(server: Server) -> None:
    import socket

    body = json.dumps({"prompt": "left behind", "num_frames": 5, "size": "64x64"}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/videos/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)  # fmt: skip
        deadline = time.monotonic() + 30
        while not [v for v in json.loads(server.request("GET", "/v1/videos", headers=AUTH)[2])["data"]
                   if v["prompt"] == "left behind"]:  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while True:  # the client is gone; the video is made and stored anyway
        (video,) = [v for v in json.loads(server.request("GET", "/v1/videos", headers=AUTH)[2])["data"]
                    if v["prompt"] == "left behind"]  # fmt: skip
        if video["status"] == "completed":
            break
        assert video["status"] in ("queued", "in_progress") and time.monotonic() < deadline, video
        time.sleep(0.1)
    status, _, mp4 = server.request("GET", f"/v1/videos/{video['id']}/content", headers=AUTH)
    assert status == 200 and frames_of(mp4).shape == (5, 64, 64, 3)


def test_unfinished_videos_409_queued_ones_can_be_deleted_and_auth_covers_the_routes(server: Server) -> None:
    status, _, data = post(server, "/v1/videos", {"prompt": PROMPT, "num_frames": 5, "size": "64x64",
                                                  "num_inference_steps": 40})  # fmt: skip
    assert status == 200
    video_id = json.loads(data)["id"]
    queued = json.loads(post(server, "/v1/videos", {"prompt": PROMPT, "num_frames": 9, "size": "64x64"})[2])["id"]
    status, _, data = server.request("GET", f"/v1/videos/{video_id}/content", headers=AUTH)
    assert status == 409 and json.loads(data)["error"]["code"] == "video_not_ready"
    deadline = time.monotonic() + 60
    while json.loads(server.request("GET", f"/v1/videos/{video_id}", headers=AUTH)[2])["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, _, data = server.request("DELETE", f"/v1/videos/{video_id}", headers=AUTH)
    assert status == 409 and json.loads(data)["error"]["code"] == "video_in_progress"
    status, _, data = server.request("DELETE", f"/v1/videos/{queued}", headers=AUTH)  # still behind the first
    assert status == 200 and json.loads(data) == {"id": queued, "object": "video.deleted", "deleted": True}
    assert server.request("GET", f"/v1/videos/{queued}", headers=AUTH)[0] == 404
    for method, path in (("GET", "/v1/videos"), ("GET", f"/v1/videos/{video_id}"), ("DELETE", f"/v1/videos/{video_id}"),
                         ("GET", f"/v1/videos/{video_id}/content")):  # fmt: skip
        assert server.request(method, path)[0] == 401


REFERENCE = b"\x89PNG\r\n\x1a\n"  # any upload: a text-to-video model refuses the field before reading it


BAD = [
    # fields, param
    ({"quality": "hd"}, "quality"),
    ({"num_frames": 8}, "num_frames"),  # Wan makes 4k+1 frames
    ({"num_frames": 21}, "num_frames"),  # outside the built 5..17
    ({"size": "63x64"}, "size"),
    ({"size": "64by64"}, "size"),
    ({"size": "128x128"}, "size"),  # outside the built 32..96
    ({"seconds": "4"}, "seconds"),  # 64 frames at 16 fps: more than the model makes
    ({"seconds": 1, "num_frames": 9}, "seconds"),
    ({"fps": 0}, "fps"),
    ({"num_inference_steps": 60, "num_frames": 17, "size": "96x96"}, "num_inference_steps"),  # over --max-video-work
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": "nan"}, "guidance_scale"),
    ({"prompt": "x" * 201}, "prompt"),
    ({"model": "tiny-flux"}, "model"),
]


@pytest.mark.parametrize(
    ("query", "param"), [("limit=abc", "limit"), ("limit=0", "limit"), ("order=up", "order"), ("page=2", "page")]
)
def test_bad_list_queries_are_openai_400s(server: Server, query: str, param: str) -> None:
    status, _, data = server.request("GET", f"/v1/videos?{query}", headers=AUTH)
    assert status == 400 and json.loads(data)["error"]["param"] == param


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_input_is_one_line_400_naming_the_parameter(server: Server, fields: dict, param: str) -> None:
    status, _, data = post(server, "/v1/videos", {"prompt": PROMPT, **fields})
    err = json.loads(data)["error"]
    expected = 404 if param == "model" else 400
    assert (status, err["param"]) == (expected, param), err
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert "\n" not in err["message"] and err["message"]


def test_input_reference_is_refused_for_a_text_to_video_model(server: Server) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="input_reference") as caught:
        client(server).videos.create(prompt=PROMPT, input_reference=("ref.png", REFERENCE, "image/png"))
    assert caught.value.body["param"] == "input_reference"
    # a reference object (this openai client cannot send one in its multipart form: sent as JSON)
    for ref in ({"image_url": "https://example.com/a.png"}, {"image_url": "data:image/png;base64,iVBORw0KGgo="}):
        status, _, data = post(server, "/v1/videos", {"prompt": PROMPT, "input_reference": ref})
        assert status == 400 and json.loads(data)["error"]["param"] == "input_reference"


def test_sigterm_finishes_the_running_video_and_fails_the_queued(server: Server) -> None:
    """Last of the server tests: it stops the module's server."""
    s = server
    auth = {"Content-Type": "application/json", **AUTH}
    body = {"prompt": PROMPT, "num_frames": 9, "size": "64x64", "num_inference_steps": 60}
    running = json.loads(s.request("POST", "/v1/videos", json.dumps(body), auth)[2])["id"]
    small = json.dumps({**body, "num_frames": 5, "size": "64x64"})
    queued = [json.loads(s.request("POST", "/v1/videos", small, auth)[2])["id"] for _ in range(2)]
    deadline = time.monotonic() + 60
    while True:  # until the first is generating and has steps done
        video = json.loads(s.request("GET", f"/v1/videos/{running}", headers=AUTH)[2])
        if video["status"] == "in_progress" and 0 < video["progress"] < 99:
            break
        assert time.monotonic() < deadline, video
        time.sleep(0.05)
    listed = json.loads(s.request("GET", "/v1/videos?order=asc&limit=100", headers=AUTH)[2])["data"]
    assert [(v["id"], v["status"]) for v in listed][-3:] == [(running, "in_progress"), *((q, "queued") for q in queued)]
    folder = s.log.parent / "videos" / f"serve-{s.proc.pid}"
    assert folder.is_dir()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(120) == 0
    log = s.log.read_text()
    assert f"video {running} completed" in log
    for q in queued:
        assert f"video {q} failed: the server is shutting down; the request was not started" in log
    assert not folder.exists()  # the store's folder goes with the process


# --- the store and the Range parser on their own ---------------------------------------------------------------


def _finished(store, path_bytes: int = 10):
    from dtcompile.serve.video_store import VideoRecord

    record = VideoRecord(store.new_id(), "m", "p", 64, 64, 5, 16.0, 2, 0)
    store.add(record)
    path = store.path_for(record.id)
    path.write_bytes(b"x" * path_bytes)
    store.complete(record.id, path)
    return record


def test_store_bounds_bytes_count_and_age_and_cleans_dead_servers(tmp_path: Path) -> None:
    from dtcompile.serve.video_store import VideoGone, VideoStore

    dead = tmp_path / "serve-999999999"  # no such process
    (dead / "x.mp4").parent.mkdir()
    (dead / "x.mp4").write_bytes(b"old")
    alive = tmp_path / f"serve-{os.getppid()}"
    alive.mkdir()
    store = VideoStore(tmp_path, ttl=3600, max_items=10, max_bytes=25)
    assert not dead.exists() and alive.exists() and store.folder.is_dir()
    a, b, c = (_finished(store) for _ in range(3))  # 30 bytes > 25: the oldest goes
    with pytest.raises(VideoGone, match="at most 25 bytes"):
        store.get(a.id)
    assert not (store.folder / f"{a.id}.mp4").exists()
    assert store.get(b.id) is b and store.usage() == (2, 20)

    store.max_items = 1
    with pytest.raises(VideoGone, match="at most 1 finished"):
        store.get(b.id)
    store.ttl = 0.05
    d = _finished(store)
    time.sleep(0.1)
    with pytest.raises(VideoGone, match="expired"):
        store.get(d.id)
    with pytest.raises(VideoGone, match="at most 1 finished"):  # d made two
        store.get(c.id)
    assert store.get("video_" + "1" * 32) is None and store.get("../etc/passwd") is None
    assert store.usage() == (0, 0) and not list(store.folder.iterdir())
    store.close()
    assert not store.folder.exists()


def test_a_failure_counts_from_when_it_happened_not_from_when_the_store_saw_it(tmp_path: Path) -> None:
    from dtcompile.serve.protocol import APIError
    from dtcompile.serve.scheduler import Job
    from dtcompile.serve.video_store import VideoGone, VideoRecord, VideoStore

    store = VideoStore(tmp_path, ttl=3600, max_items=1, max_bytes=1 << 20)
    job = Job("m", "p", 1, 64, 64, 2, None, 0, frames=5)
    failed = VideoRecord(store.new_id(), "m", "p", 64, 64, 5, 16.0, 2, 0, job=job)
    store.add(failed)
    job.future.set_exception(APIError(503, "the server is shutting down; the request was not started"))
    failed.ended = time.time()  # what the job's done callback records (it may run in a signal handler: no lock)
    time.sleep(0.01)
    later = _finished(store)  # the store first sees the failure here, after the later video completed
    with pytest.raises(VideoGone, match="at most 1 finished"):
        store.get(failed.id)
    assert store.get(later.id) is later and later.body()["status"] == "completed"
    store.close()


def test_an_unusable_video_dir_is_one_line_naming_the_option(tmp_path: Path) -> None:
    from dtcompile.core.errors import InputError
    from dtcompile.serve.models import ServeOptions
    from dtcompile.serve.video_store import open_video_store

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match="^--video-dir .*file: cannot keep videos there") as caught:
        open_video_store(ServeOptions(video_dir=str(tmp_path / "file")), [True])
    assert "\n" not in str(caught.value)
    assert open_video_store(ServeOptions(video_dir=str(tmp_path / "file")), [False]) is None  # no video model


def test_byte_range() -> None:
    from dtcompile.serve.protocol import APIError
    from dtcompile.serve.videos import byte_range

    assert byte_range(None, 100) is None and byte_range("bytes=0-1,5-6", 100) is None
    assert byte_range("bytes=0-0", 100) == (0, 0) and byte_range("bytes=-200", 100) == (0, 99)
    assert byte_range("bytes=99-", 100) == (99, 99) and byte_range("bytes=10-1000", 100) == (10, 99)
    for bad in ("bytes=100-", "bytes=5-4", "bytes=-0", "bytes=-", "pages=1-2", "bytes=1-2-3"):
        with pytest.raises(APIError) as caught:
            byte_range(bad, 100)
        assert caught.value.status == 416 and caught.value.headers == {"Content-Range": "bytes */100"}
