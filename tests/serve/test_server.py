"""`dtc serve` for real: a server process on 127.0.0.1, the official openai client, the load script, SIGTERM.

Every server here serves the session's tiny-flux artifact on the CPU (onnxruntime).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DTC = [str(Path(sys.executable).parent / "dtc")]
KEY = "test-key-123"
sys.path.insert(0, str(ROOT / "scripts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), data

    def generate(self, body: dict, key: str | None = KEY, timeout: float = 120) -> tuple[int, dict, dict]:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        status, h, data = self.request("POST", "/v1/images/generations", json.dumps(body), headers, timeout)
        return status, h, json.loads(data) if data else {}

    def metric(self, name: str) -> float:
        from serve_load import scrape

        return scrape(self.url).get(name, 0.0)


def _wait_ready(server: Server, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited {server.proc.returncode}: {server.log.read_text()[-2000:]}")
        try:
            if server.request("GET", "/ready", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready in {timeout} s: {server.log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL (and fail) if the server has not exited within ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@contextmanager
def serving(artifact: Path, tmp: Path, *args: str, ready: bool = True, env: dict | None = None) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    out = log.open("w")
    proc = subprocess.Popen(
        [*DTC, "serve", str(artifact), "--port", str(port), *args],
        stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    server = Server(proc, port, log)
    try:
        if ready:
            _wait_ready(server)
        yield server
    finally:
        if proc.poll() is None:
            stop(proc, 60)
        out.close()


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Auth on, a short queue (so load gets 429s), batches of 2, prompts of at most 200 characters."""
    tmp = tmp_path_factory.mktemp("serve")
    args = ("--api-key-env", "DTC_TEST_KEY", "--max-queue", "4", "--max-batch", "2", "--max-prompt-chars", "200",
            "--max-body-bytes", "65536", "--default-steps", "4", "--max-steps", "1000", "--max-work", "100")  # fmt: skip
    with serving(tiny_artifact, tmp, *args, env={"DTC_TEST_KEY": KEY}) as s:
        yield s


def client(server: Server, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def reference(tiny_artifact: Path) -> np.ndarray:
    """`dtc run`'s image for the prompt, seed and size the client asks for below."""
    from dtcompile.runtime.session import run_artifact

    r = run_artifact(tiny_artifact, "a red fox in the snow", steps=4, seed=7, height=64, width=96)
    buf = io.BytesIO()
    r.image.save(buf, format="PNG")
    return decode(buf.getvalue())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from dtcompile.core.metrics import psnr as metric

    return metric(a / 255.0, b / 255.0, cap=100.0)


def test_openai_client_lists_models_and_generates_what_dtc_run_does(server: Server, reference: np.ndarray) -> None:
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny-flux"]
    r = c.images.generate(
        model="tiny-flux", prompt="a red fox in the snow", size="96x64", response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 4},
    )  # fmt: skip
    assert len(r.data) == 1 and r.size == "96x64"
    image = decode(base64.b64decode(r.data[0].b64_json))
    assert image.shape == (64, 96, 3)
    assert psnr(image, reference) >= 40


def test_url_responses_are_unguessable_expiring_links_to_the_same_image(server: Server, reference: np.ndarray) -> None:
    import urllib.request

    c = client(server)
    r = c.images.generate(
        model="tiny-flux", prompt="a red fox in the snow", size="96x64", response_format="url", n=2,
        extra_body={"seed": 7, "num_inference_steps": 4},
    )  # fmt: skip
    urls = [d.url for d in r.data]
    assert len(set(urls)) == 2 and all(u.startswith(f"{server.url}/v1/images/files/") for u in urls)
    assert all(len(u.rsplit("/", 1)[1]) >= 32 for u in urls)
    with urllib.request.urlopen(urls[0]) as resp:  # image i of a request is seeded seed + i: the first is seed 7
        assert resp.headers["Content-Type"] == "image/png"
        assert psnr(decode(resp.read()), reference) >= 40
    status, _, body = server.request("GET", "/v1/images/files/" + "A" * 32)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


@pytest.mark.parametrize(("fmt", "magic"), [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_formats(server: Server, fmt: str, magic: bytes) -> None:
    r = client(server).images.generate(
        model="tiny-flux", prompt="a fox", size="64x64", output_format=fmt, output_compression=80,
        extra_body={"num_inference_steps": 2},
    )  # fmt: skip
    assert base64.b64decode(r.data[0].b64_json).startswith(magic)


ERRORS = [
    # body, headers (None: the right key), status, param, code
    ({"model": "tiny-flux", "prompt": "x", "size": "64by64"}, None, 400, "size", None),
    ({"model": "tiny-flux", "prompt": "x", "size": "256x256"}, None, 400, "size", None),
    ({"model": "tiny-flux", "prompt": "x", "size": "66x64"}, None, 400, "size", None),
    ({"model": "tiny-flux", "prompt": "x", "quality": "hd"}, None, 400, "quality", None),
    ({"model": "tiny-flux", "prompt": "x", "n": 3}, None, 400, "n", None),
    ({"model": "tiny-flux", "prompt": "x", "negative_prompt": "blur"}, None, 400, "negative_prompt", None),
    ({"model": "tiny-flux", "prompt": "x" * 201}, None, 400, "prompt", None),
    ({"model": "tiny-flux", "prompt": "x", "guidance_scale": "nan"}, None, 400, "guidance_scale", None),
    ({"model": "sdxl", "prompt": "x"}, None, 404, "model", "model_not_found"),
    ({"model": "tiny-flux", "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, None, "invalid_api_key"),
    ({"model": "tiny-flux", "prompt": "x"}, {}, 401, None, "invalid_api_key"),
]


@pytest.mark.parametrize(("body", "headers", "status", "param", "code"), ERRORS)
def test_errors_have_openai_bodies(server: Server, tiny_artifact: Path, body, headers, status, param, code) -> None:
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"} if headers is None else headers
    got, _, data = server.request("POST", "/v1/images/generations", json.dumps(body), h)
    err = json.loads(data)["error"]
    assert (got, err["param"], err["code"]) == (status, param, code), err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert str(tiny_artifact) not in err["message"] and str(ROOT) not in err["message"]


def test_body_limit_bad_json_and_unknown_routes(server: Server) -> None:
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    big = json.dumps({"model": "tiny-flux", "prompt": "x" * 70000})
    status, _, data = server.request("POST", "/v1/images/generations", big, h)
    assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
    status, _, data = server.request("POST", "/v1/images/generations", "{not json", h)
    assert status == 400 and "JSON" in json.loads(data)["error"]["message"]
    status, _, data = server.request("GET", "/v1/nothing", headers=h)
    assert status == 404 and json.loads(data)["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_its_own_error_types(server: Server) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="size"):
        client(server).images.generate(model="tiny-flux", prompt="x", size="1x1")
    with pytest.raises(openai.NotFoundError):
        client(server).images.generate(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()


def test_load_no_lost_answers_429_batching_flat_memory(server: Server) -> None:
    from serve_load import run_load

    report = run_load(server.url, "tiny-flux", clients=8, seconds=12, size="64x64", steps=4, api_key=KEY)
    print(json.dumps(report, indent=2))
    assert report["connection_errors"] == 0 and report["client_server_mismatch"] == {}
    assert report["answers_by_status"].get("200", 0) > 10
    assert report["answers_by_status"].get("429", 0) > 0  # 8 clients, 2 running + 4 queued
    assert set(report["answers_by_status"]) <= {"200", "429"}
    full = report["first_error_answers"]["429"]
    assert full["body"]["error"]["code"] == "rate_limit_exceeded" and int(full["retry_after"]) >= 1
    assert report["batches_over_1_image"] > 0  # batching observed in /metrics
    assert report["latency_ms"]["p50"] and report["latency_ms"]["p99"] >= report["latency_ms"]["p50"]
    assert report["server_rss_mb"]["growth"] < 200, report["server_rss_mb"]


def test_a_client_gone_before_its_job_started_is_dropped(server: Server) -> None:
    dropped = server.metric("dtc_dropped_total{model=tiny-flux}")
    images = server.metric("dtc_images_total{model=tiny-flux}")
    long_job = threading.Thread(
        target=server.generate,
        args=({"model": "tiny-flux", "prompt": "slow", "size": "128x128", "num_inference_steps": 150},),  # fmt: skip
    )
    long_job.start()
    deadline = time.monotonic() + 30
    while server.metric("dtc_batch_size_count{model=tiny-flux}") == 0 or server.metric("dtc_queue_depth{}") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    body = json.dumps({"model": "tiny-flux", "prompt": "never", "size": "32x32", "num_inference_steps": 2})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # send, then hang up while it is queued
        sock.sendall(
            f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        time.sleep(0.5)
        assert server.metric("dtc_queue_depth{}") == 1
    long_job.join(120)
    time.sleep(0.5)
    assert server.metric("dtc_dropped_total{model=tiny-flux}") == dropped + 1
    assert server.metric("dtc_images_total{model=tiny-flux}") == images + 1  # only the long job ran


def test_health_before_ready_then_503_until_loaded(tiny_artifact: Path, tmp_path: Path) -> None:
    with serving(tiny_artifact, tmp_path, ready=False) as s:
        deadline = time.monotonic() + 60
        while True:
            try:
                if s.request("GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        status, _, data = s.request("GET", "/ready")
        assert status == 503 and json.loads(data)["error"]["code"] == "service_unavailable"
        status, _, body = s.generate({"prompt": "x"}, key=None)
        assert status == 503 and body["error"]["code"] == "service_unavailable"
        _wait_ready(s)
        assert s.generate({"prompt": "x", "num_inference_steps": 1}, key=None)[0] == 200


def test_request_timeout_is_504(tiny_artifact: Path, tmp_path: Path) -> None:
    with serving(tiny_artifact, tmp_path, "--request-timeout", "1", "--no-warmup", "--max-steps", "1000",
                 "--max-work", "100") as s:  # fmt: skip
        t0 = time.monotonic()
        status, _, body = s.generate({"prompt": "x", "size": "128x128", "num_inference_steps": 400}, key=None)
        assert status == 504 and body["error"]["code"] == "timeout"
        assert time.monotonic() - t0 < 10


def test_sigterm_finishes_running_answers_queued_503_and_exits(tiny_artifact: Path, tmp_path: Path) -> None:
    with serving(tiny_artifact, tmp_path, "--max-batch", "1", "--max-steps", "1000", "--max-work", "100") as s:
        answers: list[tuple[int, dict]] = []
        lock = threading.Lock()

        def ask(i: int) -> None:
            status, _, body = s.generate({"prompt": f"p{i}", "size": "128x128", "num_inference_steps": 120}, None)
            with lock:
                answers.append((status, body))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while s.metric("dtc_queue_depth{}") < 3:  # one running, three queued
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert s.proc.wait(60) == 0
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200, 503, 503, 503], answers
        assert all(b["error"]["code"] == "service_unavailable" for status, b in answers if status == 503)
        assert "stopped" in s.log.read_text()


def test_bad_artifacts_and_unset_key_fail_before_binding(tiny_artifact: Path, tmp_path: Path) -> None:
    r = subprocess.run([*DTC, "serve", str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "artifact" in r.stderr
    r = subprocess.run([*DTC, "serve", str(tiny_artifact), str(tiny_artifact)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2 and "unique" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "DTC_UNSET_KEY"}
    r = subprocess.run([*DTC, "serve", str(tiny_artifact), "--api-key-env", "DTC_UNSET_KEY"], capture_output=True,
                       text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode == 2 and "DTC_UNSET_KEY" in r.stderr


def test_ray_serve_two_replicas_answer_the_same_client(tiny_artifact: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'dtcompile[ray]')")
    port = free_port()
    log = tmp_path / "ray.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*DTC, "serve", "--ray", "2", str(tiny_artifact), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    s = Server(proc, port, log)
    try:
        _wait_ready(s, timeout=240)
        c = client(s)
        servers: set[str] = set()
        lock = threading.Lock()

        def ask(seed: int) -> None:
            r = c.images.with_raw_response.generate(
                model="tiny-flux", prompt="a fox", size="64x64", extra_body={"seed": seed, "num_inference_steps": 30}
            )
            assert len(r.parse().data) == 1
            with lock:
                servers.add(r.headers["x-dtc-server"])

        for _ in range(3):
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            if len(servers) == 2:
                break
        assert len(servers) == 2, servers
        assert [m.id for m in c.models.list().data] == ["tiny-flux"]
    finally:
        stop(proc, 90)
