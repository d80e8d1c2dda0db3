"""Issue 28's hostile-client faults, measured against a `dtc serve` whose code is SERVER_CODE (the server's
PYTHONPATH: a checkout of this tree or an older one), with only the options every version has.

    SERVER_CODE=/path/to/checkout python scripts/serve_faults_repro.py FLUX_ARTIFACT KONTEXT_ARTIFACT TMP_DIR

Prints one line per fault (docs/serving.md, "Faults found by a hostile client").
"""

import contextlib
import io
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.serve.test_server import serving
from tests.test_serve_faults import health_latency, multipart, png_bomb

code = os.environ["SERVER_CODE"]
env = {"PYTHONPATH": code}
flux = Path(sys.argv[1])
kontext = Path(sys.argv[2])
tmp = Path(sys.argv[3])
tmp.mkdir(exist_ok=True)
out = {}
with serving(flux, tmp, "--max-body-bytes", "65536", "--request-timeout", "3", env=env) as s:
    H = {"Content-Type": "application/json"}
    # 2 chunked
    body, ctype = multipart({"prompt": "x"}, b"\0" * (64 << 20))
    sent = 0
    answer = b""
    import select

    with socket.create_connection(("127.0.0.1", s.port), timeout=120) as sock:
        sock.sendall(
            f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        while sent < len(body):
            if select.select([sock], [], [], 0)[0]:
                break
            piece = body[sent : sent + (64 << 10)]
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except OSError:
                break
            sent += len(piece)
        if sent >= len(body):
            sock.sendall(b"0\r\n\r\n")
        sock.settimeout(60)
        while b"\r\n\r\n" not in answer:
            m = sock.recv(65536)
            if not m:
                break
            answer += m
    out["2 chunked: MiB sent before answer"] = (sent >> 20, answer[:12].decode(errors="replace"))
    # 3 disconnect + deep json
    before = s.log.read_text()
    body, ctype = multipart({"prompt": "x"}, b"\x89PNG" + b"\0" * 30000)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(
                f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body[:5000]
            )
            time.sleep(0.05)
    time.sleep(0.5)
    new = s.log.read_text()[len(before) :]
    out["3 disconnects x5: tracebacks in log, log lines"] = (new.count("Traceback"), new.count("\n"))
    st, _, d = s.request("POST", "/v1/images/generations", "[" * 50000, H)
    out["3 50k-deep JSON status"] = st
    # 5 host header
    time.sleep(0.1)
    st, _, d = s.request(
        "POST",
        "/v1/images/generations",
        json.dumps({"prompt": "x", "size": "32x32", "response_format": "url", "num_inference_steps": 2}),
        {**H, "Host": "evil.example"},
    )
    out["5 url with Host: evil.example"] = json.loads(d)["data"][0]["url"][:40] if st == 200 else st
    # 4 steps
    st, _, d = s.request(
        "POST", "/v1/images/generations", json.dumps({"prompt": "x", "size": "128x128", "num_inference_steps": 1000}), H
    )
    t0 = time.monotonic()
    st2, _, d2 = s.request(
        "POST", "/v1/images/generations", json.dumps({"prompt": "y", "size": "32x32", "num_inference_steps": 2}), H
    )
    out["4 1000 steps status, next request status and seconds"] = (st, st2, round(time.monotonic() - t0, 1))
    st, _, d = s.request(
        "POST", "/v1/images/generations", json.dumps({"prompt": "a fox", "size": "64x64", "num_inference_steps": 4}), H
    )
    import base64

    time.sleep(8)  # let a job nobody waits for run out (old code)
    st, _, d = s.request(
        "POST", "/v1/images/generations", json.dumps({"prompt": "a fox", "size": "64x64", "num_inference_steps": 4}), H
    )
    out["64x64 PNG bytes"] = len(base64.b64decode(json.loads(d)["data"][0]["b64_json"])) if st == 200 else st
    # 6
    st, _, d = s.request(
        "POST",
        "/v1/images/generations",
        json.dumps({"prompt": "x", "quality": "auto", "moderation": "auto", "size": "32x32", "num_inference_steps": 2}),
        H,
    )
    out["6 quality/moderation auto status"] = st
    st, h, _ = s.request("POST", "/health")
    out["6 POST /health status, Allow"] = (st, {k.lower(): v for k, v in h.items()}.get("allow"))
    out["6 HEAD /health, /ready"] = (s.request("HEAD", "/health")[0], s.request("HEAD", "/ready")[0])
    out["6 GET /openapi.json"] = s.request("GET", "/openapi.json")[0]
    with socket.create_connection(("127.0.0.1", s.port), timeout=8) as sock:
        sock.sendall(
            b'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": '
        )
        try:
            a = sock.recv(100)
            out["6 stalled upload"] = a[:12].decode()
        except TimeoutError:
            out["6 stalled upload"] = "no answer in 8 s"

    # second ctrl-c
    def ask():
        with contextlib.suppress(OSError):
            s.request(
                "POST",
                "/v1/images/generations",
                json.dumps({"prompt": "x", "size": "128x128", "num_inference_steps": 3000}),
                H,
                60,
            )

    threading.Thread(target=ask, daemon=True).start()
    time.sleep(3)
    s.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGINT)
    out["6 second Ctrl-C exit code"] = s.proc.wait(60)
    out["6 second Ctrl-C: Traceback/terminate in log"] = (
        "Traceback" in s.log.read_text()[-5000:],
        "terminate" in s.log.read_text(),
    )
with serving(kontext, tmp, "--max-body-bytes", str(4 << 20), "--default-steps", "1", env=env) as s:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(b, format="TIFF")
    body, ctype = multipart({"prompt": "x", "size": "64x64"}, b.getvalue())
    out["6 TIFF edit status"] = s.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})[0]
    rss0 = s.metric("process_resident_memory_bytes{}") / 2**20
    stop = threading.Event()
    worst = []
    probe = threading.Thread(target=lambda: worst.append(health_latency(s, stop)))
    probe.start()
    bomb = png_bomb(6000, 6000)
    body, ctype = multipart({"prompt": "x", "size": "64x64", "num_inference_steps": "1"}, bomb)
    res = []
    ts = [
        threading.Thread(
            target=lambda: res.append(s.request("POST", "/v1/images/edits", body, {"Content-Type": ctype}, 300)[0])
        )
        for _ in range(3)
    ]
    [t.start() for t in ts]
    [t.join() for t in ts]
    stop.set()
    probe.join()
    out[f"1 three 6000x6000 PNG edits ({len(bomb) // 1024} KB): statuses, worst /health s, RSS MB before/after"] = (
        res,
        round(worst[0], 2),
        round(rss0),
        round(s.metric("process_resident_memory_bytes{}") / 2**20),
    )
for k, v in out.items():
    print(f"{k}: {v}")
