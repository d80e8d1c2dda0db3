"""Load client for `dtc serve`: N concurrent clients for T seconds against a running server.

    python scripts/serve_load.py --url http://127.0.0.1:8000 --model tiny-flux --clients 8 --seconds 20 \
        --size 64x64 --steps 4 [--api-key-env DTC_API_KEY] [--json report.json]

Reports requests/s, images/s, p50/p90/p99 latency of answered requests, answers by HTTP status, and checks the
server's own counters (``/metrics``) against the client's: every accepted request got exactly one answer.
Also reads the server's RSS before and after (memory growth) and its batch-size histogram.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {sample name with labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _client(url: str, body: dict[str, Any], headers: dict[str, str], deadline: float, backoff: float,
            results: list[tuple[int, float, int]], samples: dict[int, Any], lock: threading.Lock) -> None:  # fmt: skip
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    rng = random.Random()
    while time.monotonic() < deadline:
        payload = json.dumps({**body, "seed": rng.randrange(2**31)})
        t0 = time.monotonic()
        try:
            conn.request("POST", "/v1/images/generations", payload, headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            images = len(json.loads(data).get("data", [])) if status == 200 else 0
            if status != 200:
                with lock:
                    samples.setdefault(status, {"body": json.loads(data), "retry_after": resp.getheader("Retry-After")})
        except (OSError, http.client.HTTPException):
            status, images = -1, 0  # connection error: a lost answer
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        with lock:
            results.append((status, time.monotonic() - t0, images))
        if status == 429:
            time.sleep(backoff)
    conn.close()


def run_load(url: str, model: str, *, clients: int, seconds: float, size: str, steps: int, n: int = 1,
             api_key: str | None = None, backoff: float = 0.05) -> dict[str, Any]:  # fmt: skip
    """Run the load and return the report (see the module docstring)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = {"model": model, "prompt": "a lighthouse at dusk", "size": size, "num_inference_steps": steps, "n": n}
    before = scrape(url)
    results: list[tuple[int, float, int]] = []
    samples: dict[int, Any] = {}  # the first answer of each non-200 status
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=_client, args=(url, body, headers, deadline, backoff, results, samples, lock))
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    after = scrape(url)
    report = _report(results, wall, before, after, model, clients, seconds)
    report["first_error_answers"] = {str(k): v for k, v in sorted(samples.items())}
    return report


def _report(results: list[tuple[int, float, int]], wall: float, before: dict[str, float], after: dict[str, float],
            model: str, clients: int, seconds: float) -> dict[str, Any]:  # fmt: skip
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    by_status = Counter(status for status, _, _ in results)
    ok = sorted(lat for status, lat, _ in results if status == 200)
    images = sum(i for _, _, i in results)
    prefix = f"dtc_requests_total{{model={model},status="
    codes = {k.removeprefix(prefix).rstrip("}") for k in after if k.startswith(prefix)}
    codes |= {str(s) for s in by_status if s > 0}  # every status either side saw
    server = {code: int(delta(f"{prefix}{code}}}")) for code in sorted(codes)}
    mismatches = {code: (by_status.get(int(code), 0), count) for code, count in server.items()
                  if by_status.get(int(code), 0) != count}  # fmt: skip
    batches = delta(f"dtc_batch_size_count{{model={model}}}")
    batch_images = delta(f"dtc_batch_size_sum{{model={model}}}")
    multi = batches - delta(f"dtc_batch_size_bucket{{le=1.0,model={model}}}")
    rss0, rss1 = before.get("process_resident_memory_bytes{}", 0.0), after.get("process_resident_memory_bytes{}", 0.0)

    def pct(q: float) -> float | None:
        return round(ok[min(len(ok) - 1, int(q * len(ok)))] * 1000, 1) if ok else None

    return {
        "clients": clients,
        "seconds": seconds,
        "wall_s": round(wall, 2),
        "requests": len(results),
        "answers_by_status": {str(k): v for k, v in sorted(by_status.items())},
        "connection_errors": by_status.get(-1, 0),
        "server_answers_by_status": server,
        "client_server_mismatch": mismatches,
        "requests_per_s": round(by_status.get(200, 0) / wall, 2),
        "images_per_s": round(images / wall, 2),
        "latency_ms": {
            "p50": pct(0.5),
            "p90": pct(0.9),
            "p99": pct(0.99),
            "mean": round(statistics.fmean(ok) * 1000, 1) if ok else None,
        },  # fmt: skip
        "batches": int(batches),
        "batches_over_1_image": int(multi),
        "mean_batch_images": round(batch_images / batches, 2) if batches else None,
        "server_rss_mb": {
            "before": round(rss0 / 2**20, 1),
            "after": round(rss1 / 2**20, 1),
            "growth": round((rss1 - rss0) / 2**20, 1),
        },  # fmt: skip
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--api-key-env")
    p.add_argument("--backoff", type=float, default=0.05, help="seconds a client waits after a 429")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args()
    key = os.environ.get(a.api_key_env) if a.api_key_env else None
    report = run_load(a.url, a.model, clients=a.clients, seconds=a.seconds, size=a.size, steps=a.steps, n=a.n,
                      api_key=key, backoff=a.backoff)  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    lost = report["connection_errors"] or report["client_server_mismatch"]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
