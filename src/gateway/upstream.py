"""The one place that speaks HTTP to upstreams.

Upstream calls go through ``gateway.h1``, a lean HTTP/1.1 keep-alive pool on
asyncio protocols: measured against a local stand-in it costs ~11 µs of CPU per
request where aiohttp's client cost ~60 µs and httpx's layer over aiohttp
another ~50 µs, and it holds thousands of concurrent streams (httpx's own
transport served 48 of 197 possible one-second streams per second at 200
concurrent). httpx stays the seam for everything else: any ``httpx.AsyncBaseTransport``
can be given instead (tests give an ``httpx.MockTransport``; see
``gateway.upstream_httpx``), and ``gateway.h1`` is reached only through here.

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
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import attrs

from gateway.h1 import H1Error, H1Pool, Origin, RequestBody, body_length, errno_words, request_head
from gateway.proxies import Proxies
from gateway.snapshot import Target

if TYPE_CHECKING:
    import httpx

    from gateway.upstream_httpx import HttpxSender

log = logging.getLogger(__name__)

# Loopback upstreams answer uncompressed: gzip would cost CPU on both sides for nothing,
# and remote ones send small JSON whose size does not matter next to generation time.
# A User-Agent too: some providers' firewalls refuse a request without one. A backend's
# `headers` may set another.
BASE_HEADERS = {"content-type": "application/json", "accept-encoding": "identity", "user-agent": "dgx-llm-gateway/0.1"}


# The most of one answer the gateway reads: a whole non-streaming answer, or one event of
# a stream. A chat answer, images and all, stays far below it; an upstream past it (a
# runaway, or a small gzip body that unpacks to gigabytes) must not take the worker's memory.
MAX_ANSWER_BYTES = 64 << 20


class UpstreamFault(Exception):
    """The upstream gave no usable HTTP answer; ``kind`` says how it failed."""

    def __init__(self, kind: str, detail: str, *, lasting: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.lasting = lasting  # calling again at once would fail the same way (``H1Error.lasting``)


def transport_fault(exc: BaseException) -> UpstreamFault:
    """Map a pool or OS error to a fault, in words that name no host."""
    if isinstance(exc, H1Error):
        # The pool words its details without hosts or ports.
        return UpstreamFault("reset" if exc.kind in ("closed", "protocol") else exc.kind, exc.detail, lasting=exc.lasting)
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamFault("connect", errno_words(exc.errno))
    if isinstance(exc, ConnectionResetError):
        return UpstreamFault("reset", "connection reset")
    return UpstreamFault("reset", f"transport error ({type(exc).__name__})")


class Body(Protocol):
    """An answer's body as the pool (``h1.H1Response``) or the httpx seam delivers it.

    ``next_chunk`` raises ``TimeoutError`` when nothing arrives in time.
    """

    async def next_chunk(self, timeout_s: float) -> bytes | None: ...

    async def aclose(self) -> None: ...


class UpstreamStream:
    """An open answer, read chunk by chunk; the owner must ``aclose()`` it on every path."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Body, idle_s: float, ends_at: float) -> None:
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
        except (H1Error, OSError) as exc:
            raise transport_fault(exc) from exc

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

    async def finish(self, within_s: float, max_bytes: int = 64 * 1024) -> None:
        """Read what is left of a finished answer, for at most ``within_s`` and ``max_bytes``, so its
        connection can be kept: an answer that does not end in that time closes as ``aclose`` says."""
        ends_at = time.monotonic() + within_s
        read = 0
        try:
            while read <= max_bytes and (left_s := ends_at - time.monotonic()) > 0:
                chunk = await self._body.next_chunk(left_s)
                if chunk is None:
                    return
                read += len(chunk)
        except (TimeoutError, H1Error, OSError):
            pass

    async def aclose(self) -> None:
        """Close once; a body not read to its end closes the connection, telling the upstream to stop."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._body.aclose()
        except OSError:
            pass  # the connection is broken already: nothing left to close


@attrs.frozen
class Prepared:
    """What a target's requests share, built once."""

    origin: Origin
    head: bytes  # request line and headers, up to the content-length
    url: str  # without credentials: they went into ``headers``
    headers: list[tuple[bytes, bytes]]


class UpstreamClient:
    """One long-lived client per process, shared by every backend, closed at shutdown.

    ``transport`` replaces the pool by any httpx transport (the unit tests' seam);
    httpx is imported only then (it costs each worker ~7 MiB).
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 4096) -> None:
        self._httpx: HttpxSender | None = None
        self._pool: H1Pool | None = None
        if transport is not None:
            from gateway.upstream_httpx import HttpxSender

            self._httpx = HttpxSender(transport)
        else:
            proxies = Proxies.from_environment()
            if proxies:
                log.info("upstream proxy: %s", proxies.describe())
            self._pool = H1Pool(max_connections=max_connections, proxies=proxies)
        self._prepared: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], Prepared] = {}

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        if self._httpx is not None:
            await self._httpx.aclose()

    def _prepare(self, target: Target) -> Prepared:
        key = (target.base_url, target.api_key, tuple(target.headers.items()))
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = prepare(target)
            if len(self._prepared) > 1024:  # reloads with ever-new backends must not grow it without end
                self._prepared.pop(next(iter(self._prepared)))
        return prepared

    async def open(self, target: Target, body: RequestBody, *, wait_s: float, ends_at: float) -> UpstreamStream:
        """Send the request and wait at most ``wait_s`` for the response headers."""
        prepared = self._prepare(target)
        timeouts = target.timeouts
        try:
            if self._pool is not None:
                head = prepared.head + b"content-length: %d\r\n\r\n" % body_length(body)
                answer = await self._pool.send(prepared.origin, head, body, timeouts.connect_s, max(wait_s, 0.0))
                return UpstreamStream(answer.status, answer.headers, answer, timeouts.idle_s, ends_at)
            assert self._httpx is not None
            async with asyncio.timeout(max(wait_s, 0.0)):
                status, headers, reader = await self._httpx.send(prepared, timeouts, body)
        except TimeoutError:
            raise UpstreamFault("first_byte_timeout", f"no answer within {wait_s:.3g} s") from None
        except (H1Error, OSError) as exc:
            raise transport_fault(exc) from exc
        return UpstreamStream(status, headers, reader, timeouts.idle_s, ends_at)


def prepare(target: Target) -> Prepared:
    """The origin, request head and headers of ``target``'s requests."""
    base = urllib.parse.urlsplit(target.base_url)
    # The endpoint goes after the base path, before a query (Azure-style "?api-version=...").
    parts = base._replace(path=base.path.rstrip("/") + "/chat/completions", fragment="")
    headers = dict(BASE_HEADERS)
    headers.update({name.lower(): value for name, value in target.headers.items()})
    if target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    elif parts.username is not None or parts.password is not None:
        # Credentials in the backend's URL, and no key: HTTP Basic, as clients do with such URLs.
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        headers["authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    # The key header (or the Basic one) carries the credentials: never the URL.
    netloc = parts.netloc.rpartition("@")[2]
    headers["host"] = netloc
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Prepared(
        origin=Origin(parts.scheme, host, port),
        head=request_head("POST", path, list(headers.items())),
        url=urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")),
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
