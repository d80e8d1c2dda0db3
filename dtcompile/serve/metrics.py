"""The server's Prometheus metrics, on a registry of its own (``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServerMetrics:
    """Queue depth, requests by status, request/step latency, batch sizes, images, LoRA swaps, device memory."""

    def __init__(self, queue_depth: Callable[[], int], ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        Gauge("dtc_queue_depth", "Requests waiting for the worker", registry=r).set_function(queue_depth)
        Gauge("dtc_ready", "1 once every model is loaded and warmed", registry=r).set_function(lambda: float(ready()))
        self.requests = Counter(
            "dtc_requests", "Answered generation requests by model and HTTP status", ["model", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "dtc_request_seconds", "Request latency, queue wait included", ["model"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "dtc_queue_wait_seconds", "Time from accepted to started", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "dtc_step_seconds", "One denoising step of a batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "dtc_batch_size", "Images per engine batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("dtc_images", "Images generated", ["model"], registry=r)
        self.dropped = Counter(
            "dtc_dropped", "Queued requests dropped before they started (client gone or timed out)", ["model"],
            registry=r,
        )  # fmt: skip
        self.lora_swaps = Counter("dtc_lora_swaps", "Per-request LoRA adapter-set swaps", ["model"], registry=r)
        self.lora_swap_seconds = Histogram(
            "dtc_lora_swap_seconds", "One LoRA swap (weights recomputed from the base and loaded)", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.device_memory = Gauge(
            "dtc_device_memory_bytes", "CUDA memory allocated by this process (torch)", ["device"], registry=r
        )

    def render(self) -> bytes:
        self._read_device_memory()
        return generate_latest(self.registry)

    def _read_device_memory(self) -> None:
        import sys

        torch = sys.modules.get("torch")  # only where a model loaded it
        if torch is None or not torch.cuda.is_available():
            return
        for i in range(torch.cuda.device_count()):
            self.device_memory.labels(str(i)).set(torch.cuda.memory_allocated(i))
