"""Small ASGI helpers for the completion endpoints, which run as raw ASGI handlers.

The completion path skips Litestar's request parsing: it reads the body itself
(so ``max_request_bytes`` is enforced while reading, and a 1 GB upload is
refused at the limit instead of buffered), decodes JSON once with msgspec, and
writes its own responses. A disconnect watcher cancels the handler the moment
the client leaves, so the upstream call is closed at once on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from gateway.errors import GatewayError
from gateway.shaping import encode

Headers = list[tuple[bytes, bytes]]
JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


async def read_body(receive: Any, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise GatewayError(
                    "request_too_large",
                    f"The body is larger than the gateway's limit of {limit} bytes ({limit / 1048576:.0f} MiB).",
                )
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _extra(headers: Mapping[str, str] | None) -> Headers:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]


async def send_bytes(send: Any, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Any, error: GatewayError, extra: Headers | None = None) -> None:
    await send_bytes(send, error.status, encode(error.envelope()), [*JSON_HEADERS, *_extra(error.headers), *(extra or [])])


async def send_stream(send: Any, events: AsyncIterator[bytes], headers: Headers) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
    async for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(receive: Any) -> AsyncIterator[None]:
    """Cancel the current task when the client disconnects; the body must already be read."""
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if disconnected:
            task.uncancel()
            return  # the client is gone: nothing to answer, and the upstream is already closed
        raise
    finally:
        watcher.cancel()
