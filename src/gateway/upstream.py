"""The one place that speaks HTTP to upstreams.

httpx is the client API; underneath it runs aiohttp's connection pool (through
``httpx_aiohttp.AiohttpTransport``), because httpx's own transport cannot hold
hundreds of concurrent streams: measured on a bare pass-through it served 48 of
197 possible one-second streams per second at 200 concurrent, aiohttp's 191.

Every transport failure leaves this module as an ``UpstreamFault`` with a short
``kind`` the dispatcher classifies: ``connect`` (refused, unreachable),
``reset`` (cut before or during the answer), ``first_byte_timeout``,
``idle_timeout``, ``timeout`` (the total ran out). ``httpx_aiohttp`` maps
aiohttp's errors to httpx types loosely (a server that closes the connection
becomes ``ConnectTimeout``), so the original aiohttp cause decides the kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
import aiohttp
import attrs
import httpx
from httpx_aiohttp import AiohttpTransport

from gateway.snapshot import ResolvedTimeouts, Target

# Loopback upstreams answer uncompressed: gzip would cost CPU on both sides for nothing,
# and remote ones send small JSON whose size does not matter next to generation time.
BASE_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


class UpstreamFault(Exception):
    """The upstream gave no usable HTTP answer; ``kind`` says how it failed."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def _fault_kind(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, (aiohttp.ClientConnectorError, httpx.ConnectError)):
        return "connect"
    if isinstance(cause, (aiohttp.ServerTimeoutError, asyncio.TimeoutError, httpx.TimeoutException)):
        return "timeout"
    return "reset"


def _short(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(cause) or type(cause).__name__
    return text if len(text) <= 120 else text[:117] + "..."


@attrs.define
class UpstreamReply:
    """A whole (non-streaming) answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class UpstreamStream:
    """An open answer, read chunk by chunk; the owner must ``aclose()`` it on every path."""

    def __init__(self, response: httpx.Response, idle_s: float) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self._response = response
        self._idle_s = idle_s
        # One iterator for the stream's whole life: the dispatcher reads the first
        # chunks, the relay the rest, and httpx allows a body to be iterated once.
        self._chunks = response.aiter_raw().__aiter__()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end; a gap over the idle timeout is a fault."""
        try:
            async with asyncio.timeout(self._idle_s):
                return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise UpstreamFault("idle_timeout", f"no data for {self._idle_s:g} s") from None
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFault(_fault_kind(exc), _short(exc)) from exc

    async def read(self, limit: int | None = None) -> bytes:
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                break
        return b"".join(parts)

    async def aclose(self) -> None:
        await self._response.aclose()


class UpstreamClient:
    """One long-lived client per process, shared by every backend, closed at shutdown."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 4096) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(
            transport=transport or AiohttpTransport(limits=limits),
            timeout=None,  # every call sets its own deadlines from the target's config
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _request(self, target: Target, body: bytes) -> httpx.Request:
        headers = dict(BASE_HEADERS)
        headers.update(target.headers)
        if target.api_key:
            headers["authorization"] = f"Bearer {target.api_key}"
        timeouts = target.timeouts
        return self._client.build_request(
            "POST",
            f"{target.base_url}/chat/completions",
            content=body,
            headers=headers,
            timeout=httpx.Timeout(timeouts.total_s, connect=timeouts.connect_s, pool=timeouts.connect_s),
        )

    async def open(self, target: Target, body: bytes, *, first_byte_s: float | None = None) -> UpstreamStream:
        """Send the request and wait for the response headers (the upstream's first byte)."""
        timeouts: ResolvedTimeouts = target.timeouts
        wait_s = first_byte_s if first_byte_s is not None else timeouts.first_byte_s
        request = self._request(target, body)
        try:
            async with asyncio.timeout(wait_s):
                response = await self._client.send(request, stream=True)
        except TimeoutError:
            raise UpstreamFault("first_byte_timeout", f"no answer within {wait_s:g} s") from None
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFault(_fault_kind(exc), _short(exc)) from exc
        return UpstreamStream(response, timeouts.idle_s)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (only the delta form: HTTP dates from LLM APIs are rare)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
