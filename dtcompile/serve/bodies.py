"""Reading a request's body within bounds, for every route: 413 past the byte limit (the declared Content-Length
first, then the bytes received, so a chunked upload is never taken in full) and 408 when the whole body has not
arrived within the time limit (a stalled or trickling upload)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request

from dtcompile.serve.protocol import APIError


def bounded(request: Request, limit: int, timeout: float) -> Request:
    """``request`` whose body reads stop with 413 past ``limit`` bytes and with 408 past ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    deadline = time.monotonic() + timeout
    seen = 0

    async def receive() -> Any:
        nonlocal seen
        try:
            message = await asyncio.wait_for(request.receive(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s (dtc serve --body-timeout)",
                           code="request_timeout") from None  # fmt: skip
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes")
        return message

    return Request(request.scope, receive)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body in memory, read through ``bounded``."""
    body = bytearray()
    async for chunk in bounded(request, limit, timeout).stream():
        body += chunk
    return bytes(body)
