"""The scheduler and the url store on their own: batching by key, order, capacity, drops, drain, eviction."""

from __future__ import annotations

import threading
import time

import pytest

from dtcompile.serve.protocol import APIError, parse_request
from dtcompile.serve.scheduler import Job, Scheduler
from dtcompile.serve.store import ImageStore


def job(model: str = "m", n: int = 1, size: int = 64, steps: int = 4, seed: int = 0) -> Job:
    return Job(model, "p", n, size, size, steps, None, seed)


class Recorder:
    """run_batch that records each batch; ``gate`` holds the first batch until released."""

    def __init__(self) -> None:
        self.batches: list[list[Job]] = []
        self.gate = threading.Event()

    def __call__(self, jobs: list[Job]) -> list[list[str]]:
        self.gate.wait(10)
        self.batches.append(jobs)
        return [[f"img-{j.seed}-{i}" for i in range(j.n)] for j in jobs]


def started(capacity: int = 4, max_queue: int = 8) -> tuple[Scheduler, Recorder]:
    rec = Recorder()
    s = Scheduler(rec, lambda model: capacity, max_queue)
    s.start()
    return s, rec


def test_same_key_jobs_share_a_batch_others_wait_in_order() -> None:
    s, rec = started(capacity=4)
    first = job(seed=0)
    s.submit(first)
    time.sleep(0.1)  # the worker holds `first` at the gate
    queued = [job(seed=1), job(size=32, seed=2), job(seed=3, n=2), job(seed=4, n=2)]
    for j in queued:
        s.submit(j)
    rec.gate.set()
    assert [img for img in queued[2].future.result(5)] == ["img-3-0", "img-3-1"]
    queued[-1].future.result(5)
    s.drain()
    s.join(5)
    seeds = [[j.seed for j in b] for b in rec.batches]
    # seed 1 and seed 3 (n=2) fill 3 of 4; seed 4 (n=2) no longer fits; 32 px runs alone, in its turn
    assert seeds == [[0], [1, 3], [2], [4]]


def test_full_queue_is_429_with_retry_after_and_drain_answers_queued_503() -> None:
    s, rec = started(max_queue=2)
    s.submit(job(seed=0))
    time.sleep(0.1)
    waiting = [job(seed=1), job(seed=2, size=32)]
    for j in waiting:
        s.submit(j)
    with pytest.raises(APIError) as full:
        s.submit(job(seed=9))
    assert full.value.status == 429 and int(full.value.headers["Retry-After"]) >= 1
    assert s.drain() == 2
    rec.gate.set()
    for j in waiting:
        with pytest.raises(APIError) as gone:
            j.future.result(5)
        assert gone.value.status == 503
    with pytest.raises(APIError) as closed:
        s.submit(job())
    assert closed.value.status == 503
    s.join(5)
    assert [[j.seed for j in b] for b in rec.batches] == [[0]]  # the running batch finished


def test_cancelled_jobs_never_run_and_are_counted() -> None:
    dropped: list[Job] = []
    rec = Recorder()
    s = Scheduler(rec, lambda model: 1, 8, on_drop=dropped.append)
    s.start()
    s.submit(job(seed=0))
    time.sleep(0.1)
    gone, kept = job(seed=1), job(seed=2)
    s.submit(gone)
    s.submit(kept)
    assert gone.future.cancel()
    rec.gate.set()
    assert kept.future.result(5) == ["img-2-0"]
    s.drain()
    s.join(5)
    assert [[j.seed for j in b] for b in rec.batches] == [[0], [2]]
    assert dropped == [gone]


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on() -> None:
    calls = []

    def run(jobs: list[Job]) -> list[list[str]]:
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [["ok"] for _ in jobs]

    s = Scheduler(run, lambda model: 1, 8)
    s.start()
    bad, good = job(seed=0), job(seed=1)
    s.submit(bad)
    with pytest.raises(RuntimeError):
        bad.future.result(5)
    s.submit(good)
    assert good.future.result(5) == ["ok"]
    s.drain()
    s.join(5)


def test_store_expires_and_bounds_items_and_bytes() -> None:
    from dtcompile.serve.store import Gone

    store = ImageStore(ttl=0.2, max_bytes=10, max_items=2)
    a = store.put(b"aaaa", "image/png")
    assert len(a) == 32 and store.get(a) == (b"aaaa", "image/png")
    b, c = store.put(b"bbbb", "image/png"), store.put(b"cccc", "image/png")
    with pytest.raises(Gone, match="evicted"):  # max_items 2: the oldest went, and the store says so
        store.get(a)
    assert store.get(b) and store.get(c)
    d = store.put(b"dddddddd", "image/png")  # 12 bytes > 10: oldest go until it fits
    for gone in (b, c):
        with pytest.raises(Gone, match="store is full"):
            store.get(gone)
    assert store.get(d) and store.get("x" * 32) is None  # never given out: None (404), not Gone (410)
    time.sleep(0.3)
    with pytest.raises(Gone, match="expired"):
        store.get(d)
    assert len(store) == 0 and store.evicted == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "size": "64"}, "size"),
        ({"prompt": "x", "size": "0x64"}, "size"),
        ({"prompt": "x", "style": "vivid"}, "style"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "response_format": "file"}, "response_format"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": 3}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_requests_name_their_field(body: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_request(body).pixel_size()
    assert err.value.status == 400 and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}
