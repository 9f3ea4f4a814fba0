"""The one place that speaks HTTP to upstreams.

httpx is the client API; underneath it runs aiohttp's connection pool (through
``httpx_aiohttp.AiohttpTransport``), because httpx's own transport cannot hold
hundreds of concurrent streams: measured on a bare pass-through it served 48 of
197 possible one-second streams per second at 200 concurrent, aiohttp's 191.

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
``idle_timeout``, ``timeout`` (the total ran out). ``httpx_aiohttp`` maps
aiohttp's errors to httpx types loosely (a server that closes the connection
becomes ``ConnectTimeout``), so the original aiohttp cause decides the kind.
A fault's ``detail`` is our own short wording, never the library's message:
those name the backend's host and port, and clients must not see backends.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from collections.abc import Mapping

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

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
    """Map an httpx/aiohttp/OS error to a fault, in words that name no host."""
    cause = exc.__cause__ or exc
    if isinstance(cause, (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout)):
        return UpstreamFault("connect_timeout", "no connection in time")
    if isinstance(cause, (aiohttp.ClientConnectorError, httpx.ConnectError, ConnectionRefusedError)):
        # The errno's own words: aiohttp's message and strerror name the host and port.
        number = getattr(getattr(cause, "os_error", cause), "errno", None)
        reason = os.strerror(number) if isinstance(number, int) and number > 0 else "cannot connect"
        return UpstreamFault("connect", reason.lower())
    if isinstance(cause, (aiohttp.ServerTimeoutError, asyncio.TimeoutError, httpx.TimeoutException)):
        return UpstreamFault("timeout", "the transport timed out")
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return UpstreamFault("reset", "the upstream closed the connection")
    if isinstance(cause, aiohttp.ClientPayloadError):
        return UpstreamFault("reset", "the answer was cut off")
    if isinstance(cause, (ConnectionResetError, aiohttp.ClientOSError)):
        return UpstreamFault("reset", "connection reset")
    return UpstreamFault("reset", f"transport error ({type(cause).__name__})")


class UpstreamStream:
    """An open answer, read chunk by chunk; the owner must ``aclose()`` it on every path."""

    def __init__(self, response: httpx.Response, idle_s: float, ends_at: float) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self.ends_at = ends_at
        self._response = response
        self._idle_s = idle_s
        self._closed = False
        # One iterator for the stream's whole life: the dispatcher reads the first
        # chunks, the relay the rest, and httpx allows a body to be iterated once.
        # aiter_bytes, not aiter_raw: it undoes a content-encoding an upstream used
        # despite our "identity", and serves a body already read (MockTransport).
        self._chunks = response.aiter_bytes().__aiter__()

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
            async with asyncio.timeout(max(min(window_s, left_s), 0.0)):
                return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if left_s <= window_s:
                raise UpstreamFault("timeout", "the attempt's total time ran out") from None
            if within_s is not None:
                raise UpstreamFault("first_byte_timeout", "no answer began in time") from None
            raise UpstreamFault("idle_timeout", f"no data for {self._idle_s:g} s") from None
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
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
        return b"".join(parts)

    async def aclose(self) -> None:
        """Close once; a body not read to its end closes the connection, telling the upstream to stop."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._response.aclose()
        except (httpx.HTTPError, aiohttp.ClientError, OSError):
            pass  # the connection is broken already: nothing left to close


class UpstreamClient:
    """One long-lived client per process, shared by every backend, closed at shutdown.

    Requests go straight to the transport: httpx's ``AsyncClient.send`` wraps each
    call in auth, redirect and cookie handling the gateway never uses (no
    redirects are followed, no cookies kept, the key is a header), and that
    wrapping measured about a tenth of the gateway's CPU per small request.
    The URL and headers of each target are built once and reused.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 4096) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=256)
        self._transport = transport or AiohttpTransport(limits=limits, trust_env=False)
        self._prepared: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], tuple[httpx.URL, list[tuple[bytes, bytes]]]] = {}

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _prepare(self, target: Target) -> tuple[httpx.URL, list[tuple[bytes, bytes]]]:
        key = (target.base_url, target.api_key, tuple(target.headers.items()))
        prepared = self._prepared.get(key)
        if prepared is None:
            url = httpx.URL(f"{target.base_url}/chat/completions")
            if target.api_key and (url.username or url.password):
                # The backend's key header wins: credentials in its URL must not become Basic auth.
                url = url.copy_with(username=None, password=None)
            headers = dict(BASE_HEADERS)
            headers.update({name.lower(): value for name, value in target.headers.items()})
            if target.api_key:
                headers["authorization"] = f"Bearer {target.api_key}"
            headers["host"] = url.netloc.decode("ascii")
            raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
            prepared = self._prepared[key] = (url, raw)
            if len(self._prepared) > 1024:  # reloads with ever-new backends must not grow it without end
                self._prepared.pop(next(iter(self._prepared)))
        return prepared

    def _request(self, target: Target, body: bytes) -> httpx.Request:
        url, headers = self._prepare(target)
        timeouts = target.timeouts
        # Reads are bounded by UpstreamStream's idle gap and the attempt's end;
        # the transport only needs the connect bound.
        timeout = {"connect": timeouts.connect_s, "read": None, "write": timeouts.total_s, "pool": timeouts.connect_s}
        return httpx.Request("POST", url, headers=[*headers, (b"content-length", str(len(body)).encode())], content=body, extensions={"timeout": timeout})

    async def open(self, target: Target, body: bytes, *, wait_s: float, ends_at: float) -> UpstreamStream:
        """Send the request and wait at most ``wait_s`` for the response headers."""
        request = self._request(target, body)
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                response = await self._transport.handle_async_request(request)
        except TimeoutError:
            raise UpstreamFault("first_byte_timeout", f"no answer within {wait_s:.3g} s") from None
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            raise _transport_fault(exc) from exc
        response.request = request
        return UpstreamStream(response, target.timeouts.idle_s, ends_at)


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
