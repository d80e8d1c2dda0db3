"""The six fault classes a hostile client found in `dtc serve` (issue 28), each reproduced against a real server
process (tiny FLUX and tiny FLUX Kontext, onnxruntime on the CPU), and schemathesis over the served
/openapi.json.

1. edit images: size checked from the header before decoding, decoded off the event loop, pixels bounded;
2. a chunked upload without Content-Length stops at the size limit (413), not after spooling it all;
3. a client gone mid-upload is one log line (no 500, no traceback); 50k-deep JSON is a 400;
4. steps x size x n bounded per model (400 naming the parameter); a timed-out job stops between steps;
5. url images: never the Host header's host, a store sized by bytes, 410 with a reason once released;
6. OpenAI's fields by the field rule, streaming with partial images, 405 with Allow, HEAD, /openapi.json,
   png/jpeg/webp only, stalled uploads time out, a second Ctrl-C exits without SIGABRT.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import select
import signal
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from tests.fixtures.builds import ORT_ONLY, build_recipe
from tests.serve.test_server import KEY, Server, serving

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json", **AUTH}


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-faults")
    args = ("--api-key-env", "DTC_TEST_KEY", "--max-batch", "2", "--max-body-bytes", "65536", "--default-steps",
            "4", "--max-steps", "50", "--body-timeout", "2", "--url-ttl", "2", "--public-url",
            "https://images.example.test/dtc", "--max-work", "tiny-flux=0.3")  # fmt: skip
    with serving(tiny_artifact, tmp, *args, env={"DTC_TEST_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def kontext_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-flux-kontext.yaml", *ORT_ONLY)


@pytest.fixture(scope="module")
def kontext(kontext_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-kontext")
    args = ("--max-body-bytes", str(4 << 20), "--max-image-pixels", str(1024 * 1024), "--default-steps", "2")
    with serving(kontext_artifact, tmp, *args) as s:
        yield s


def png_bomb(width: int, height: int) -> bytes:
    """A grayscale PNG of ``width`` x ``height`` zeros: a few hundred KB that decode to width x height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def multipart(fields: dict[str, str], image: bytes, filename: str = "ref.png") -> tuple[bytes, str]:
    boundary = "dtcboundary7e3"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]  # fmt: skip
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")  # fmt: skip
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def health_latency(server: Server, until: threading.Event) -> float:
    """The worst /health latency while ``until`` is unset."""
    worst = 0.0
    while not until.is_set():
        t0 = time.monotonic()
        assert server.request("GET", "/health", timeout=30)[0] == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.02)
    return worst


def _scrape(server: Server) -> dict[str, float]:
    from serve_load import scrape  # scripts/ (tests.serve.test_server puts it on sys.path)

    return scrape(server.url)


def rss_mb(server: Server) -> float:
    return server.metric("process_resident_memory_bytes{}") / 2**20


# --- 1. edit images -----------------------------------------------------------------------------------------------


def test_edit_image_size_is_checked_from_the_header_and_decoded_off_the_loop(kontext: Server) -> None:
    """A 6000x6000 PNG of ~110 KB (36 MP, under the library's 67 MP) over --max-image-pixels (1 MP) is refused
    from its header, at once; a 3000x3000 one the server must not take either, six at a time, while /health keeps
    answering and memory stays flat."""
    bomb = png_bomb(6000, 6000)
    assert len(bomb) < 200_000
    body, ctype = multipart({"prompt": "x", "size": "64x64"}, bomb)
    t0 = time.monotonic()
    status, _, data = kontext.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
    err = json.loads(data)["error"]
    assert status == 400 and err["param"] == "image" and "6000x6000" in err["message"], err
    assert "1048576 pixels" in err["message"] and time.monotonic() - t0 < 2

    before = rss_mb(kontext)
    stop = threading.Event()
    worst: list[float] = []
    probe = threading.Thread(target=lambda: worst.append(health_latency(kontext, stop)))
    probe.start()
    ok = multipart({"prompt": "x", "size": "64x64", "num_inference_steps": "1"}, png_bomb(1000, 1000))
    statuses: list[int] = []
    posts = [threading.Thread(target=lambda: statuses.append(
        kontext.request("POST", "/v1/images/edits", ok[0], {"Content-Type": ok[1]})[0])) for _ in range(6)]  # fmt: skip
    for t in posts:
        t.start()
    for t in posts:
        t.join(120)
    stop.set()
    probe.join(30)
    assert statuses.count(200) + statuses.count(429) == 6 and 200 in statuses, statuses
    assert worst[0] < 1.0, f"/health took {worst[0]:.2f} s while edits decoded"
    assert rss_mb(kontext) - before < 150  # six 1000x1000 decodes, kept as 64x64 copies


def test_edit_reference_is_queued_at_the_generation_size_and_edits_as_dtc_run(kontext: Server,
                                                                               kontext_artifact: Path) -> None:  # fmt: skip
    from PIL import Image

    from dtcompile.runtime.session import run_artifact
    from dtcompile.serve.protocol import read_reference

    rng = np.random.default_rng(1)
    ref = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    ref.save(buf, format="PNG")
    small = read_reference(buf.getvalue(), "ref.png", 1 << 20, fit=(64, 48))
    assert small.size == (64, 48)  # what a queued edit holds: the generation size, not the upload
    body, ctype = multipart({"prompt": "snow", "size": "64x48", "seed": "5", "num_inference_steps": "2"},
                            buf.getvalue())  # fmt: skip
    status, _, data = kontext.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
    assert status == 200, data
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(json.loads(data)["data"][0]["b64_json"]))))
    want = run_artifact(kontext_artifact, "snow", steps=2, seed=5, height=48, width=64, image=ref).image
    assert np.array_equal(got, np.asarray(want))


def test_an_edit_streams_image_edit_events_with_a_preview(kontext: Server) -> None:
    import openai
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    c = openai.OpenAI(base_url=f"{kontext.url}/v1", api_key="none", max_retries=0)
    events = list(c.images.edit(model="tiny-flux-kontext", image=("ref.png", buf.getvalue(), "image/png"),
                                prompt="snow", size="64x48", stream=True, partial_images=1,
                                extra_body={"seed": 2, "num_inference_steps": 4}))  # fmt: skip
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    for e in events:
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (64, 48)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "ICO", "PPM", "TGA", "CMYK"])
def test_edit_images_are_png_jpeg_or_webp_only(kontext: Server, fmt: str) -> None:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "CMYK":
        Image.new("CMYK", (64, 64), (0, 50, 100, 0)).save(buf, format="JPEG")
    else:
        Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format=fmt)
    body, ctype = multipart({"prompt": "x", "size": "64x64"}, buf.getvalue())
    status, _, data = kontext.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
    err = json.loads(data)["error"]
    assert status == 400 and err["param"] == "image", err
    assert ("CMYK" if fmt == "CMYK" else "PNG, JPEG or WebP") in err["message"]


# --- 2. chunked uploads -------------------------------------------------------------------------------------------


def test_a_chunked_upload_without_content_length_stops_at_the_limit(server: Server) -> None:
    body, ctype = multipart({"prompt": "x"}, b"\0" * (64 << 20))  # 64 MiB against a 64 KiB limit
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
        step = 64 << 10
        while sent < len(body):
            if select.select([sock], [], [], 0)[0]:
                break
            piece = body[sent : sent + step]
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except OSError:  # the server answered and closed
                break
            sent += len(piece)
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 16 << 20, f"{sent >> 20} MiB sent before the 413"


# --- 3. clients gone, deep JSON -----------------------------------------------------------------------------------


def test_a_client_gone_mid_upload_is_one_log_line_not_a_500(server: Server) -> None:
    errors = server.metric("dtc_requests_total{model=-,status=500}")
    log_before = server.log.read_text()
    body, ctype = multipart({"prompt": "x"}, b"\x89PNG" + b"\0" * 30000)
    for path, ctype_, declared in (("/v1/images/edits", ctype, len(body)),
                                   ("/v1/images/generations", "application/json", 60000)):  # fmt: skip
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                             f"{ctype_}\r\nContent-Length: {declared}\r\n\r\n".encode() + body[:5000])  # fmt: skip
                time.sleep(0.05)
    time.sleep(0.5)
    assert server.request("GET", "/health")[0] == 200
    new = server.log.read_text()[len(log_before) :]
    assert "Traceback" not in new and "internal error" not in new, new[-3000:]
    assert 1 <= new.count("client gone") <= 10, new
    assert server.metric("dtc_requests_total{model=-,status=500}") == errors


def test_deeply_nested_json_is_a_400(server: Server) -> None:
    # under the 64 KiB body limit: 50k-deep (not closed) and 30k-deep (closed) nesting
    for body in ("[" * 50_000, '{"prompt": ' + "[" * 30_000 + "]" * 30_000 + "}"):
        status, _, data = server.request("POST", "/v1/images/generations", body, JSON)
        assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error", data[:300]


# --- 4. bounded work, cancelled timeouts --------------------------------------------------------------------------


def test_steps_and_work_are_bounded_per_request(server: Server) -> None:
    status, _, body = server.generate({"prompt": "x", "num_inference_steps": 1000})
    err = body["error"]
    assert status == 400 and err["param"] == "num_inference_steps" and "--max-steps" in err["message"], err
    # --max-work tiny-flux=0.3 megapixel-steps: 20 x 128x128 is 0.33
    status, _, body = server.generate({"prompt": "x", "num_inference_steps": 20, "size": "128x128"})
    err = body["error"]
    assert status == 400 and err["param"] == "num_inference_steps" and "--max-work" in err["message"], err
    assert "0.3 for model tiny-flux" in err["message"]
    assert server.generate({"prompt": "x", "num_inference_steps": 12, "size": "128x128"})[0] == 200


def test_the_work_limit_names_what_the_request_chose(tiny_artifact: Path) -> None:
    from dtcompile.serve.models import ServedModel, ServeOptions
    from dtcompile.serve.protocol import APIError, parse_request

    model, options = ServedModel.open(tiny_artifact), ServeOptions(max_work=0.01, default_steps=28)
    for body, param in (({"n": 2, "size": "32x32"}, "n"), ({"size": "64x64"}, "size"),
                        ({"num_inference_steps": 3, "size": "64x64"}, "num_inference_steps")):  # fmt: skip
        with pytest.raises(APIError) as err:
            model.make_job(parse_request({"prompt": "x", **body}), options, capacity=2)
        assert err.value.status == 400 and err.value.param == param and "megapixel-steps" in err.value.message
    assert model.make_job(parse_request({"prompt": "x", "size": "32x32", "num_inference_steps": 4}), options, 2)


def test_the_default_work_limit_is_max_steps_at_the_opt_size_and_full_batch() -> None:
    from dtcompile.serve.models import ServeOptions

    assert ServeOptions(max_steps=50).work_limit("m", 64 * 64, 2) == pytest.approx(50 * 64 * 64 * 2 / 1e6)
    assert ServeOptions(max_work={"m": 0.5}).work_limit("m", 64 * 64, 2) == 0.5
    assert ServeOptions(max_work={"m": 0.5}, max_steps=10).work_limit("other", 100, 1) == pytest.approx(1e-3)


@pytest.fixture(scope="module")
def slow_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """--request-timeout 2 and long jobs allowed; the last test here stops it with two SIGINTs."""
    tmp = tmp_path_factory.mktemp("serve-slow")
    with serving(tiny_artifact, tmp, "--request-timeout", "2", "--max-steps", "5000", "--max-work", "1000",
                 "--no-warmup") as s:  # fmt: skip
        yield s


def test_a_timed_out_job_stops_between_steps_and_the_next_is_not_delayed(slow_server: Server) -> None:
    s = slow_server
    status, _, body = s.generate({"prompt": "x", "size": "128x128", "num_inference_steps": 2000}, key=None)
    assert status == 504 and body["error"]["code"] == "timeout"
    t0 = time.monotonic()
    status, _, body = s.generate({"prompt": "y", "size": "32x32", "num_inference_steps": 2}, key=None)
    assert status == 200, body
    assert time.monotonic() - t0 < 2
    assert "stopped: nobody waits for it any more" in s.log.read_text()


# --- 5. url images ------------------------------------------------------------------------------------------------


def test_urls_use_the_public_url_never_the_host_header_and_answer_410_once_gone(server: Server) -> None:
    status, _, body = server.generate({"prompt": "x", "response_format": "url", "size": "32x32"})
    url = body["data"][0]["url"]
    assert url.startswith("https://images.example.test/dtc/v1/images/files/")
    h = {**JSON, "Host": "evil.example"}
    status, _, data = server.request("POST", "/v1/images/generations",
                                     json.dumps({"prompt": "x", "response_format": "url", "size": "32x32"}), h)  # fmt: skip
    assert status == 200 and "evil" not in data.decode()
    path = "/v1/images/files/" + url.rsplit("/", 1)[1]
    status, headers, data = server.request("GET", path)
    assert status == 200 and data.startswith(b"\x89PNG")
    status, headers, data = server.request("HEAD", path)
    assert status == 200 and data == b"" and headers["content-type"] == "image/png"
    time.sleep(2.2)  # --url-ttl 2
    status, _, data = server.request("GET", path)
    err = json.loads(data)["error"]
    assert status == 410 and err["code"] == "gone" and "expired" in err["message"], err


def test_without_public_url_urls_are_the_bound_address_or_relative() -> None:
    from dtcompile.cli.serve import _public_url

    assert _public_url(None, "127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert _public_url(None, "0.0.0.0", 8000) is None  # noqa: S104 - relative urls
    assert _public_url("https://img.example/x/", "0.0.0.0", 8000) == "https://img.example/x"  # noqa: S104
    import click

    with pytest.raises(click.BadParameter, match=r"http\(s\)"):
        _public_url("javascript:alert(1)", "127.0.0.1", 8000)


# --- 6. OpenAI's fields, streaming, HTTP details ------------------------------------------------------------------


def test_openai_fields_follow_the_field_rule(server: Server) -> None:
    from tests.serve.test_server import client

    c = client(server)
    r = c.images.generate(model="tiny-flux", prompt="a fox", size="32x32", quality="auto", moderation="auto",
                          background="auto", extra_body={"safety_identifier": "u1"})  # fmt: skip
    assert len(r.data) == 1
    ok = [{"moderation": "low"}, {"background": "opaque"}, {"stream": False}, {"partial_images": 0}]
    for extra in ok:
        assert server.generate({"prompt": "x", "size": "32x32", **extra})[0] == 200, extra
    refused = [({"quality": "hd"}, "quality"), ({"quality": "high"}, "quality"), ({"style": "vivid"}, "style"),
               ({"background": "transparent"}, "background"), ({"partial_images": 2}, "partial_images"),
               ({"stream": True, "n": 2}, "n"), ({"quality": "ultra"}, "quality")]  # fmt: skip
    for extra, param in refused:
        status, _, body = server.generate({"prompt": "x", "size": "32x32", **extra})
        assert status == 400 and body["error"]["param"] == param, (extra, body)


def test_streaming_sends_partial_images_then_the_image_dtc_run_makes(server: Server) -> None:
    from PIL import Image

    from tests.serve.test_server import client

    c = client(server)
    plain = c.images.generate(model="tiny-flux", prompt="a fox", size="64x64",
                              extra_body={"seed": 9, "num_inference_steps": 6})  # fmt: skip
    events = list(c.images.generate(model="tiny-flux", prompt="a fox", size="64x64", stream=True, partial_images=2,
                                    extra_body={"seed": 9, "num_inference_steps": 6}))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (64, 64) and e.size == "64x64"
    assert events[-1].b64_json == plain.data[0].b64_json  # the stream's image is the plain answer's
    assert events[0].b64_json != events[1].b64_json != events[-1].b64_json  # previews of different steps


def test_405_carries_allow_and_head_works_on_probes(server: Server) -> None:
    status, headers, data = server.request("POST", "/health")
    assert status == 405 and "GET" in headers["allow"] and "HEAD" in headers["allow"]
    assert json.loads(data)["error"]["code"] == "method_not_allowed"
    status, headers, _ = server.request("GET", "/v1/images/generations", headers=AUTH)
    assert status == 405 and headers["allow"] == "POST"
    for path in ("/health", "/ready"):
        status, _, data = server.request("HEAD", path)
        assert status == 200 and data == b""


def test_openapi_json_documents_bodies_and_no_422(server: Server) -> None:
    status, _, data = server.request("GET", "/openapi.json")
    doc = json.loads(data)
    assert status == 200 and doc["openapi"].startswith("3.")
    gen = doc["paths"]["/v1/images/generations"]["post"]
    props = gen["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"prompt", "n", "size", "seed", "quality", "stream", "partial_images"} <= set(props)
    edit = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert edit["properties"]["image"]["format"] == "binary"
    assert "422" not in data.decode() and "HTTPValidationError" not in data.decode()
    assert {"400", "401", "413", "429", "504"} <= set(gen["responses"])


def test_a_stalled_authenticated_upload_times_out(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        t0 = time.monotonic()
        sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ".encode())  # fmt: skip
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert 1.5 < time.monotonic() - t0 < 10  # --body-timeout 2


def test_a_second_ctrl_c_exits_at_once_without_sigabrt(slow_server: Server) -> None:
    s = slow_server
    started = s.metric("dtc_batch_size_count{model=tiny-flux}")
    body = json.dumps({"prompt": "x", "size": "128x128", "num_inference_steps": 3000})

    def ask() -> None:
        with contextlib.suppress(OSError):  # the server exits under it
            s.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"}, 60)

    worker = threading.Thread(target=ask)
    worker.daemon = True
    worker.start()
    deadline = time.monotonic() + 30
    while s.metric("dtc_batch_size_count{model=tiny-flux}") == started:  # the job is running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGINT)
    code = s.proc.wait(30)
    log = s.log.read_text()
    assert code == 128 + signal.SIGINT, (code, log[-2000:])
    assert "second signal" in log and "terminate called" not in log and "Traceback" not in log


# --- schemathesis over the served /openapi.json -------------------------------------------------------------------


def test_served_openapi_holds_under_schemathesis(server: Server) -> None:
    """Every operation of the served /openapi.json under schemathesis: seeded, bounded examples (hypothesis
    settings below); no 5xx, and every status, content type, header and body as the schema documents them."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install "
                                       "'dtcompile[dev]')")  # fmt: skip
    from hypothesis import given

    positive = schemathesis.checks.positive_data_acceptance
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    answered = sum(v for k, v in _scrape(server).items() if k.startswith("dtc_requests_total"))
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        def check(case: object) -> None:
            # positive_data_acceptance is left out: what a model takes (its size range and multiple, n up to its
            # batch, steps x size x n, the field rule's refusals) is no JSON Schema; those are documented 400s
            case.call_and_validate(headers=AUTH, excluded_checks=[positive])  # type: ignore[attr-defined]

        check()
    images = sum(v for k, v in _scrape(server).items() if k.startswith("dtc_requests_total") and "status=200" in k)
    assert sum(v for k, v in _scrape(server).items() if k.startswith("dtc_requests_total")) - answered >= 12
    assert images >= 1  # some generated bodies were valid all the way to an image
