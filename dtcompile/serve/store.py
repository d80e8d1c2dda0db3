"""Images answered by ``url``: a store bounded by bytes, with expiry, keyed by unguessable ids.

An image lives ``ttl`` seconds unless the byte budget evicts it first (oldest first). The store remembers the
ids it let go (a bounded record), so a late fetch is told why (``Gone``: expired or evicted), not "no such image".
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

ID_LENGTH = 32  # characters of secrets.token_urlsafe(24)
#: How many released ids are remembered for the 410 answer (about 100 bytes each).
GONE_RECORD = 100_000


class Gone(Exception):
    """A url whose image the store no longer holds; the message says why (expired, or evicted when full)."""


class ImageStore:
    """Images for ``ttl`` seconds within ``max_bytes`` bytes (and at most ``max_items``, a guard on the bookkeeping,
    not the budget); when full, the oldest go first."""

    def __init__(self, ttl: float, max_bytes: int, max_items: int = 1_000_000) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0  # images released before their ttl because the store was full

    def put(self, data: bytes, mime: str) -> str:
        image_id = secrets.token_urlsafe(24)
        with self._lock:
            self._items[image_id] = (time.monotonic() + self.ttl, data, mime)
            self._bytes += len(data)
            self._evict()
        return image_id

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        """(bytes, MIME type); None for an id never given out; ``Gone`` for one released (the reason said)."""
        with self._lock:
            self._evict()
            item = self._items.get(image_id)
            reason = self._gone.get(image_id)
        if reason is not None:
            raise Gone(reason)
        return None if item is None else (item[1], item[2])

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        now = time.monotonic()
        while self._items:
            first_id, (expires, data, _) = next(iter(self._items.items()))
            if expires <= now:
                why = f"the image expired ({self.ttl:g} s after it was made)"
            elif len(self._items) > self.max_items or self._bytes > self.max_bytes:
                self.evicted += 1
                why = (
                    f"the image was evicted before its {self.ttl:g} s expiry: the server's url store is full "
                    f"({self.max_bytes >> 20} MiB, --url-store-mb); fetch urls sooner or ask for b64_json"
                )
            else:
                break
            del self._items[first_id]
            self._bytes -= len(data)
            self._gone[first_id] = why
            if len(self._gone) > GONE_RECORD:
                self._gone.popitem(last=False)
