"""Mixed image + video load for `dtc serve`: image clients and video clients at once against one server.

    dtc serve engines/tiny-flux engines/tiny-wan21 --port 8000 --max-queue 64 &
    python scripts/serve_mixed_load.py --url http://127.0.0.1:8000 --image-model tiny-flux --video-model tiny-wan21 \
        --image-clients 4 --video-clients 2 --seconds 60 [--json report.json]

Image clients post to /v1/images/generations; video clients alternate between the synchronous
/v1/videos/generations and the async POST /v1/videos + polling + /content download. Reports per route:
answers by status, p50/p99 latency; checks that every accepted request was answered once (the server's
``dtc_requests_total`` per model against the client's counts, every async id downloaded once and its MP4
valid) and the server's RSS before and after. Exits 1 on a lost or duplicated answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from serve_load import scrape  # noqa: E402


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> tuple[int,
                                                                                                        bytes]:  # fmt: skip
    conn.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def _image_client(url: str, model: str, deadline: float, record: Any) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    i = 0
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        body = {"model": model, "prompt": f"a fox {i}", "size": "64x64", "num_inference_steps": 4, "seed": i}
        status, _ = _request(conn, "POST", "/v1/images/generations", body)
        record("images", model, status, time.monotonic() - t0, None)
        i += 1
        if status == 429:
            time.sleep(0.5)


def _video_client(url: str, model: str, deadline: float, record: Any, k: int) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    i = 0
    while time.monotonic() < deadline:
        body = {"model": model, "prompt": f"a cat {k}.{i}", "size": "64x64", "num_frames": 9,
                "num_inference_steps": 4, "seed": i}  # fmt: skip
        t0 = time.monotonic()
        if i % 2 == 0:
            status, data = _request(conn, "POST", "/v1/videos/generations", body)
            ok = status != 200 or data[4:8] == b"ftyp"
            record("videos/generations", model, status, time.monotonic() - t0, None if ok else "bad mp4")
        else:
            status, data = _request(conn, "POST", "/v1/videos", body)
            if status == 200:
                vid = json.loads(data)["id"]
                while True:
                    s, d = _request(conn, "GET", f"/v1/videos/{vid}")
                    state = json.loads(d)["status"] if s == 200 else f"http {s}"
                    if state not in ("queued", "in_progress"):
                        break
                    time.sleep(0.2)
                s, mp4 = _request(conn, "GET", f"/v1/videos/{vid}/content")
                ok = s == 200 and mp4[4:8] == b"ftyp"
                record("videos", model, status, time.monotonic() - t0, None if ok else f"{state}, content {s}")
                _request(conn, "DELETE", f"/v1/videos/{vid}")
            else:
                record("videos", model, status, time.monotonic() - t0, None)
        i += 1
        if status == 429:
            time.sleep(0.5)


def _rss(url: str) -> float:
    return scrape(url).get("process_resident_memory_bytes{}", 0.0) / 2**20


def run(url: str, image_model: str, video_model: str, image_clients: int, video_clients: int,
        seconds: float) -> dict[str, Any]:  # fmt: skip
    lock = threading.Lock()
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    per_model: Counter = Counter()
    problems: list[str] = []

    def record(route: str, model: str, status: int, seconds: float, problem: str | None) -> None:
        with lock:
            statuses[route][str(status)] += 1
            per_model[(model, status)] += 1
            if status == 200:
                latencies[route].append(seconds)
            if problem:
                problems.append(f"{route}: {problem}")

    before = scrape(url)
    rss0 = _rss(url)
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_image_client, args=(url, image_model, deadline, record))
               for _ in range(image_clients)]  # fmt: skip
    threads += [threading.Thread(target=_video_client, args=(url, video_model, deadline, record, k))
                for k in range(video_clients)]  # fmt: skip
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    after = scrape(url)
    mismatch = {}
    for (model, status), n in per_model.items():
        key = f"dtc_requests_total{{model={model},status={status}}}"
        served = after.get(key, 0.0) - before.get(key, 0.0)
        if status == 200 and served != n:
            mismatch[key] = {"client": n, "server": served}
    routes = {}
    for route, values in latencies.items():
        q = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
        routes[route] = {"answers": dict(statuses[route]), "per_s": round(len(values) / wall, 3),
                         "p50_ms": round(1000 * statistics.median(values)), "p99_ms": round(1000 * q[98])}  # fmt: skip
    return {
        "seconds": round(wall, 1),
        "routes": routes,
        "client_server_mismatch": mismatch,
        "problems": problems,
        "server_rss_mb": {"before": round(rss0), "after": round(_rss(url)), "growth": round(_rss(url) - rss0, 1)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--image-model", required=True)
    p.add_argument("--video-model", required=True)
    p.add_argument("--image-clients", type=int, default=4)
    p.add_argument("--video-clients", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--json")
    a = p.parse_args()
    report = run(a.url, a.image_model, a.video_model, a.image_clients, a.video_clients, a.seconds)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    sys.exit(1 if report["client_server_mismatch"] or report["problems"] else 0)


if __name__ == "__main__":
    main()
