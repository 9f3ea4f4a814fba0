"""The httpx seam of ``UpstreamClient``: the same calls, over any ``httpx.AsyncBaseTransport``.

Unit tests put an ``httpx.MockTransport`` under the client here; the gateway
itself sends through ``gateway.h1``. Only this module imports httpx, and it is
imported only when a transport is given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import httpx

from gateway.h1 import RequestBody, errno_words
from gateway.snapshot import ResolvedTimeouts
from gateway.upstream import Prepared, UpstreamFault

# httpx logs every request's full URL at INFO; a backend URL may carry credentials,
# and which backend served belongs in our own structured logs, not in httpx's.
logging.getLogger("httpx").setLevel(logging.WARNING)


def httpx_fault(exc: httpx.HTTPError) -> UpstreamFault:
    """Map an httpx error to a fault, in words that name no host."""
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamFault("connect_timeout", "no connection in time")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamFault("connect", errno_words(getattr(exc.__cause__, "errno", None)))
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFault("timeout", "the transport timed out")
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamFault("reset", "the upstream closed the connection")
    if isinstance(exc, httpx.ReadError):
        return UpstreamFault("reset", "connection reset")
    return UpstreamFault("reset", f"transport error ({type(exc).__name__})")


class HttpxBody:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        # aiter_bytes, not aiter_raw: it undoes a content-encoding, and serves a body
        # already read (MockTransport).
        self._chunks = response.aiter_bytes().__aiter__()

    async def next_chunk(self, timeout_s: float) -> bytes | None:
        try:
            async with asyncio.timeout(timeout_s):
                return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except httpx.HTTPError as exc:
            raise httpx_fault(exc) from exc

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        except httpx.HTTPError:
            pass  # the connection is broken already: nothing left to close


class HttpxSender:
    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def send(self, prepared: Prepared, timeouts: ResolvedTimeouts, body: RequestBody) -> tuple[int, Mapping[str, str], HttpxBody]:
        body = body if isinstance(body, bytes) else b"".join(body)
        timeout = {"connect": timeouts.connect_s, "read": None, "write": timeouts.total_s, "pool": timeouts.connect_s}
        headers = [*prepared.headers, (b"content-length", str(len(body)).encode())]
        request = httpx.Request("POST", prepared.url, headers=headers, content=body, extensions={"timeout": timeout})
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise httpx_fault(exc) from exc
        response.request = request
        return response.status_code, response.headers, HttpxBody(response)
