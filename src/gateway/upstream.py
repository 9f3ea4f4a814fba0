"""The one place that speaks HTTP to upstreams.

Upstream calls go through ``gateway.h1``, a lean HTTP/1.1 keep-alive pool on
asyncio protocols: measured against a local stand-in it costs ~11 µs of CPU per
request where aiohttp's client cost ~60 µs and httpx's layer over aiohttp
another ~50 µs, and it holds thousands of concurrent streams (httpx's own
transport served 48 of 197 possible one-second streams per second at 200
concurrent). httpx stays the client API for everything else: any
``httpx.AsyncBaseTransport`` can be given instead (tests give an
``httpx.MockTransport``), and ``gateway.h1`` is reached only through here.

How a call goes:
1. ``UpstreamClient.open`` sends the request and waits for the response headers,
   at most ``wait_s`` (the caller's first-byte window, or for a non-streaming
   call the whole budget: there the headers come with the finished answer).
2. The caller reads the body through ``UpstreamStream.next_chunk``: each read
   waits at most the target's idle gap, and never past the attempt's end
   (``ends_at``), so a stalled stream is caught by the idle gap and a trickling
   one by the total.
3. The owner calls ``aclose()`` on every path; closing a body that is not fully
   read closes its connection, which is how the upstream learns to stop.

Every transport failure leaves this module as an ``UpstreamFault`` whose
``kind`` the dispatcher classifies: ``connect`` (refused, unreachable),
``connect_timeout``, ``reset`` (cut before or during the answer), ``first_byte_timeout``,
``idle_timeout``, ``timeout`` (the total ran out). A fault's ``detail`` is our
own short wording, never a library's message: those name the backend's host
and port, and clients must not see backends.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import os
import time
from collections.abc import Mapping
from typing import Protocol

import attrs
import httpx

from gateway.h1 import H1Error, H1Pool, Origin, request_head
from gateway.snapshot import Target

# Loopback upstreams answer uncompressed: gzip would cost CPU on both sides for nothing,
# and remote ones send small JSON whose size does not matter next to generation time.
BASE_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}

# httpx logs every request's full URL at INFO; a backend URL may carry credentials,
# and which backend served belongs in our own structured logs, not in httpx's.
logging.getLogger("httpx").setLevel(logging.WARNING)


class UpstreamFault(Exception):
    """The upstream gave no usable HTTP answer; ``kind`` says how it failed."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def _transport_fault(exc: BaseException) -> UpstreamFault:
    """Map a pool, httpx or OS error to a fault, in words that name no host."""
    if isinstance(exc, H1Error):
        # The pool words its details without hosts or ports.
        return UpstreamFault("reset" if exc.kind in ("closed", "protocol") else exc.kind, exc.detail)
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamFault("connect_timeout", "no connection in time")
    if isinstance(exc, (httpx.ConnectError, ConnectionRefusedError)):
        # The errno's own words: library messages name the host and port.
        number = getattr(exc.__cause__ or exc, "errno", None)
        return UpstreamFault("connect", os.strerror(number).lower() if isinstance(number, int) and number > 0 else "cannot connect")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFault("timeout", "the transport timed out")
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamFault("reset", "the upstream closed the connection")
    if isinstance(exc, (ConnectionResetError, httpx.ReadError)):
        return UpstreamFault("reset", "connection reset")
    return UpstreamFault("reset", f"transport error ({type(exc).__name__})")


class _Body(Protocol):
    """An answer's body as the pool (``h1.H1Response``) or the httpx seam delivers it."""

    async def next_chunk(self, timeout_s: float) -> bytes | None: ...

    async def aclose(self) -> None: ...


class _HttpxBody:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        # aiter_bytes, not aiter_raw: it undoes a content-encoding an upstream used
        # despite our "identity", and serves a body already read (MockTransport).
        self._chunks = response.aiter_bytes().__aiter__()

    async def next_chunk(self, timeout_s: float) -> bytes | None:
        try:
            async with asyncio.timeout(timeout_s):
                return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    async def aclose(self) -> None:
        await self._response.aclose()


class UpstreamStream:
    """An open answer, read chunk by chunk; the owner must ``aclose()`` it on every path."""

    def __init__(self, status: int, headers: Mapping[str, str], body: _Body, idle_s: float, ends_at: float) -> None:
        self.status = status
        self.headers = headers  # lower-case names
        self.ends_at = ends_at
        self._body = body
        self._idle_s = idle_s
        self._closed = False

    async def next_chunk(self, within_s: float | None = None) -> bytes | None:
        """The next piece of the body, or None at its end.

        Waits at most the idle gap, or ``within_s`` when given (before a stream's
        first real chunk a silence is the model thinking, not a stall: the caller
        passes what is left of the first-byte window), and never past the
        attempt's end. A longer wait is a fault: ``idle_timeout``,
        ``first_byte_timeout`` or ``timeout`` (the total ran out).
        """
        left_s = self.ends_at - time.monotonic()
        window_s = self._idle_s if within_s is None else within_s
        try:
            return await self._body.next_chunk(max(min(window_s, left_s), 0.0))
        except TimeoutError:
            if left_s <= window_s:
                raise UpstreamFault("timeout", "the attempt's total time ran out") from None
            if within_s is not None:
                raise UpstreamFault("first_byte_timeout", "no answer began in time") from None
            raise UpstreamFault("idle_timeout", f"no data for {self._idle_s:g} s") from None
        except (H1Error, httpx.HTTPError, OSError) as exc:
            raise _transport_fault(exc) from exc

    async def read(self, limit: int | None = None, *, within_s: float | None = None) -> bytes:
        """The rest of the body (at most about ``limit`` bytes), each read waiting as ``next_chunk`` does."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.next_chunk(within_s)) is not None:
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        """Close once; a body not read to its end closes the connection, telling the upstream to stop."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._body.aclose()
        except (httpx.HTTPError, OSError):
            pass  # the connection is broken already: nothing left to close


@attrs.frozen
class _Prepared:
    """What a target's requests share, built once: the pool's origin and head, or the httpx URL and headers."""

    origin: Origin
    head: bytes  # request line and headers, up to the content-length
    url: httpx.URL
    headers: list[tuple[bytes, bytes]]


class UpstreamClient:
    """One long-lived client per process, shared by every backend, closed at shutdown.

    ``transport`` replaces the pool by any httpx transport (the unit tests' seam).
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 4096) -> None:
        self._transport = transport
        self._pool = H1Pool(max_connections=max_connections) if transport is None else None
        self._prepared: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], _Prepared] = {}

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        if self._transport is not None:
            await self._transport.aclose()

    def _prepare(self, target: Target) -> _Prepared:
        key = (target.base_url, target.api_key, tuple(target.headers.items()))
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = _prepare(target)
            if len(self._prepared) > 1024:  # reloads with ever-new backends must not grow it without end
                self._prepared.pop(next(iter(self._prepared)))
        return prepared

    async def open(self, target: Target, body: bytes, *, wait_s: float, ends_at: float) -> UpstreamStream:
        """Send the request and wait at most ``wait_s`` for the response headers."""
        prepared = self._prepare(target)
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                if self._pool is not None:
                    head = prepared.head + b"content-length: %d\r\n\r\n" % len(body)
                    answer = await self._pool.send(prepared.origin, head, body, target.timeouts.connect_s)
                    return UpstreamStream(answer.status, answer.headers, answer, target.timeouts.idle_s, ends_at)
                response = await self._send_httpx(prepared, target, body)
        except TimeoutError:
            raise UpstreamFault("first_byte_timeout", f"no answer within {wait_s:.3g} s") from None
        except (H1Error, httpx.HTTPError, OSError) as exc:
            raise _transport_fault(exc) from exc
        return UpstreamStream(response.status_code, response.headers, _HttpxBody(response), target.timeouts.idle_s, ends_at)

    async def _send_httpx(self, prepared: _Prepared, target: Target, body: bytes) -> httpx.Response:
        assert self._transport is not None
        timeouts = target.timeouts
        timeout = {"connect": timeouts.connect_s, "read": None, "write": timeouts.total_s, "pool": timeouts.connect_s}
        headers = [*prepared.headers, (b"content-length", str(len(body)).encode())]
        request = httpx.Request("POST", prepared.url, headers=headers, content=body, extensions={"timeout": timeout})
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response


def _prepare(target: Target) -> _Prepared:
    url = httpx.URL(f"{target.base_url}/chat/completions")
    headers = dict(BASE_HEADERS)
    headers.update({name.lower(): value for name, value in target.headers.items()})
    if target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    elif url.username or url.password:
        # Credentials in the backend's URL, and no key: HTTP Basic, as clients do with such URLs.
        pair = f"{url.username}:{url.password}".encode()
        headers["authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    # The key header (or the Basic one) carries the credentials: never the URL.
    url = url.copy_with(username=None, password=None)
    headers["host"] = url.netloc.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    path = url.raw_path.decode("ascii")
    return _Prepared(
        origin=Origin(url.scheme, url.host, port),
        head=request_head("POST", path, list(headers.items())),
        url=url,
        headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()],
    )


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long the upstream asked us to wait: ``retry-after-ms``, ``Retry-After`` seconds or HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = -1.0
        if value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(seconds, 0.0)
    return seconds if seconds >= 0 else None
