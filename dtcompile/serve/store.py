"""Images answered by ``url``: a bounded store with expiry, keyed by unguessable ids."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

ID_LENGTH = 32  # characters of secrets.token_urlsafe(24)


class ImageStore:
    """At most ``max_items`` images and ``max_bytes`` bytes, each for ``ttl`` seconds; oldest go first."""

    def __init__(self, ttl: float, max_items: int, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, mime: str) -> str:
        image_id = secrets.token_urlsafe(24)
        with self._lock:
            self._items[image_id] = (time.monotonic() + self.ttl, data, mime)
            self._bytes += len(data)
            self._evict()
        return image_id

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._evict()
            item = self._items.get(image_id)
        return None if item is None else (item[1], item[2])

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        now = time.monotonic()
        while self._items:
            first_id, (expires, data, _) = next(iter(self._items.items()))
            if expires > now and len(self._items) <= self.max_items and self._bytes <= self.max_bytes:
                break
            del self._items[first_id]
            self._bytes -= len(data)
