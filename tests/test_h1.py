"""The lean HTTP/1.1 pool (gateway.h1) against scripted servers on real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import gc
import os
import socket
import ssl
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

import pytest
import uvloop

from gateway import h1
from gateway.h1 import H1Error, H1Pool, H1Response, Origin, body_length, request_head
from gateway.upstream import UpstreamClient, UpstreamFault, UpstreamStream
from harness import cyclic_garbage_now
from test_upstream_prepare import target


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, bounded in time."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 20))

    return run


def in_each_loop(test: Callable[[], Awaitable[None]]) -> Callable[..., None]:
    """Run an async test once in asyncio's own event loop and once in uvloop's, the one served in
    production: the two report some closes differently."""

    @pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
    def run(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(asyncio.wait_for(test(), 20))

    run.__name__, run.__qualname__, run.__doc__ = test.__name__, test.__qualname__, test.__doc__
    return run


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A loopback server whose every connection runs ``handler``; it counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.bodies: list[bytes] = []
        self.closed_by_client = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def origin(self) -> Origin:
        assert self._server is not None
        return Origin("http", "127.0.0.1", self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request's body, or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.bodies.append(body)
        return body


OK_BODY = b'{"ok":true}'


def ok(body: bytes = OK_BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def head_for(origin: Origin, body: bytes) -> bytes:
    host = f"{origin.host}:{origin.port}"
    return request_head("POST", "/v1/chat/completions", [("host", host)]) + b"content-length: %d\r\n\r\n" % len(body)


async def call(pool: H1Pool, origin: Origin, body: bytes = b"{}") -> H1Response:
    return await pool.send(origin, head_for(origin, body), body, connect_timeout_s=2)


async def read_all(response: H1Response, timeout_s: float = 2) -> bytes:
    parts = []
    while (chunk := await response.next_chunk(timeout_s)) is not None:
        parts.append(chunk)
    response.close()
    return b"".join(parts)


def answering(answer: Callable[[bytes], bytes] = lambda body: ok(), *, once: bool = False, gate: asyncio.Event | None = None) -> Handler:
    """A handler that writes ``answer(body)`` to each request (to the first only, with ``once``),
    after ``gate`` is set when one is given."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while (body := await server.read_request(reader)) is not None:
            if gate is not None:
                await gate.wait()
            writer.write(answer(body))
            await writer.drain()
            if once:
                return

    return handler


answer_each_request = answering()


async def unanswered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    """Reads a request, never answers, and records the client's close."""
    await server.read_request(reader)
    await server.read_request(reader)


@contextlib.asynccontextmanager
async def pool_and_server(handler: Handler, **options: Any) -> AsyncIterator[tuple[H1Pool, Server]]:
    async with Server(handler) as server:
        pool = H1Pool(**options)
        try:
            yield pool, server
        finally:
            await pool.aclose()


@in_loop
async def test_a_connection_is_kept_alive_and_reused() -> None:
    async with pool_and_server(answer_each_request) as (pool, server):
        for _ in range(5):
            response = await call(pool, server.origin)
            assert response.status == 200
            assert response.headers["content-type"] == "application/json"
            assert await read_all(response) == b'{"ok":true}'
        assert server.connections == 1
        assert pool.open_connections == 1


@in_loop
async def test_concurrent_requests_open_connections_up_to_the_limit_then_queue() -> None:
    release = asyncio.Event()
    async with pool_and_server(answering(gate=release), max_connections=2) as (pool, server):

        async def one() -> bytes:
            return await read_all(await call(pool, server.origin))

        calls = [asyncio.create_task(one()) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert server.connections == 2  # the other three wait for a slot
        release.set()
        assert await asyncio.gather(*calls) == [b'{"ok":true}'] * 5
        assert server.connections == 2


@in_loop
async def test_a_caller_cancelled_while_queued_for_a_slot_leaks_nothing() -> None:
    release = asyncio.Event()
    async with pool_and_server(answering(gate=release), max_connections=1) as (pool, server):
        first = asyncio.create_task(call(pool, server.origin))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(call(pool, server.origin))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await read_all(await first) == b'{"ok":true}'
        assert await read_all(await call(pool, server.origin)) == b'{"ok":true}'
        assert pool.open_connections == 1


@in_loop
async def test_waiting_for_a_slot_is_bounded_by_the_connect_timeout() -> None:
    async with pool_and_server(answering(gate=asyncio.Event()), max_connections=1) as (pool, server):
        held = asyncio.create_task(call(pool, server.origin))
        await asyncio.sleep(0.05)
        with pytest.raises(H1Error) as caught:
            await pool.send(server.origin, head_for(server.origin, b"{}"), b"{}", connect_timeout_s=0.1)
        assert caught.value.kind == "connect_timeout"
        held.cancel()


def answering_chunked(pieces: tuple[bytes, ...], *, pause_s: float) -> Handler:
    """A handler that answers each request with ``pieces`` as chunks, each write ``pause_s`` apart (the
    chunked end included: a write of its own)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(pause_s)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return handler


@in_loop
async def test_chunked_and_split_bodies_arrive_whole() -> None:
    chunked = answering_chunked((b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"), pause_s=0.01)
    async with pool_and_server(chunked) as (pool, server):
        for _ in range(2):
            response = await call(pool, server.origin)
            assert await read_all(response) == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
        assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "connections"),
    [
        # No length and no chunks: the body ends with the connection, which cannot be reused.
        (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n" + OK_BODY, 2),
        (ok(extra=b"connection: close\r\n"), 2),
        # Keep-alive implied, and the server closes anyway once idle: not reused either.
        (ok(), 2),
    ],
    ids=["until EOF", "connection: close", "closed when idle"],
)
@in_loop
async def test_a_connection_the_server_ends_is_not_reused(answer: bytes, connections: int) -> None:
    async with pool_and_server(answering(lambda body: answer, once=True)) as (pool, server):
        for _ in range(2):
            assert await read_all(await call(pool, server.origin)) == OK_BODY
            await asyncio.sleep(0.05)
        assert server.connections == connections
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0  # their slots are free


def answer_first_then(then: str) -> Handler:
    """Answers a connection's first request; at its second it closes in order ("close"), drops the socket
    ("drop": over TLS, a close without close_notify) or resets ("reset"), answering nothing: what an
    upstream whose idle timeout fires as the request arrives does."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        if await server.read_request(reader) is None:
            return
        writer.write(ok())
        await writer.drain()
        if await server.read_request(reader) is None:
            return
        if then == "reset":
            writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif then == "drop":
            writer.transport.abort()  # the request was read whole: the socket closes with a FIN, not a reset
        else:
            writer.close()

    return handler


@in_loop
async def test_a_reused_connection_closed_as_it_is_reused_sends_the_request_again_on_a_new_one() -> None:
    """A kept-alive connection the upstream closes in order as the next request arrives, answering nothing,
    was closed as idle, not for the request: the request goes again once, on a new connection."""
    async with pool_and_server(answer_first_then("close")) as (pool, server):
        assert await read_all(await call(pool, server.origin)) == OK_BODY
        assert await read_all(await call(pool, server.origin, b'{"n":2}')) == OK_BODY
        assert server.connections == 2 and server.bodies == [b"{}", b'{"n":2}', b'{"n":2}']


@in_loop
async def test_a_reset_is_the_upstreams_fault_and_is_not_sent_again() -> None:
    async with pool_and_server(answer_first_then("reset")) as (pool, server):
        assert await read_all(await call(pool, server.origin)) == OK_BODY
        with pytest.raises(H1Error) as failed:
            await call(pool, server.origin)
        assert failed.value.kind == "closed" and not failed.value.quietly
        assert server.connections == 1


@in_loop
async def test_a_connection_whose_request_is_still_being_written_is_not_reused() -> None:
    """An upstream that answers (413) before reading a large body and then stops reading: the rest of the
    body would go out ahead of the next request, which would wait behind it until its time ran out."""

    async def early_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(min(length, 64 * 1024))
        if length <= 64 * 1024:
            writer.write(ok())
            return
        writer.write(ok(b'{"error":"too large"}').replace(b"200 OK", b"413 Payload Too Large"))
        await writer.drain()
        await asyncio.sleep(5)  # reads nothing more

    async with pool_and_server(early_answer) as (pool, server):
        big = b"x" * (16 << 20)
        response = await pool.send(server.origin, head_for(server.origin, big), big, connect_timeout_s=2)
        assert response.status == 413 and await read_all(response)
        await asyncio.wait_for(call(pool, server.origin), 2)
        assert server.connections == 2


@in_loop
async def test_an_idle_connection_the_upstream_closed_is_not_handed_out() -> None:
    """A connection the upstream closed while idle (its FIN read, the close not yet complete) is not reused."""
    async with pool_and_server(answering(once=True)) as (pool, server):
        assert await read_all(await call(pool, server.origin)) == OK_BODY
        await asyncio.sleep(0.05)
        assert await read_all(await call(pool, server.origin)) == OK_BODY
        assert server.connections == 2 and len(server.bodies) == 2


@in_loop
async def test_a_stream_whose_end_follows_its_done_keeps_its_connection() -> None:
    """An SSE answer whose chunked end comes in a later write than its [DONE]: finishing it for a moment
    lets the connection be kept; closed at [DONE], each stream cost the next call a new connection."""
    async with pool_and_server(answering_chunked((b"data: [DONE]\n\n",), pause_s=0.05)) as (pool, server):
        for _ in range(3):
            response = await call(pool, server.origin)
            stream = UpstreamStream(response.status, response.headers, response, idle_s=2, ends_at=asyncio.get_running_loop().time() + 5)
            assert await stream.next_chunk() == b"data: [DONE]\n\n"
            await stream.finish(within_s=0.25)
            await stream.aclose()
        assert server.connections == 1


@in_loop
async def test_idle_connections_are_closed_once_expired_without_traffic() -> None:
    """A burst's connections, idle past keepalive_s, are closed even if no call comes to find them
    (and with calls that only ever reuse the newest)."""
    async with pool_and_server(answer_each_request, keepalive_s=0.1) as (pool, server):
        responses = await asyncio.gather(*(call(pool, server.origin) for _ in range(5)))
        for response in responses:
            await read_all(response)
        assert pool.open_connections == 5
        for _ in range(4):  # one call at a time: the newest is reused, the rest only age
            await asyncio.sleep(0.06)
            await read_all(await call(pool, server.origin))
        await asyncio.sleep(0.35)
        assert pool.open_connections == 0


@in_loop
async def test_idle_connections_expire() -> None:
    async with pool_and_server(answer_each_request, keepalive_s=0.05) as (pool, server):
        assert await read_all(await call(pool, server.origin)) == OK_BODY
        await asyncio.sleep(0.1)
        assert await read_all(await call(pool, server.origin)) == OK_BODY
        assert server.connections == 2


@in_loop
async def test_an_interim_answer_is_skipped() -> None:
    early_hints = answering(lambda body: b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + ok())
    async with pool_and_server(early_hints) as (pool, server):
        response = await call(pool, server.origin)
        assert response.status == 200
        assert "link" not in response.headers
        assert await read_all(response) == OK_BODY
        assert await read_all(await call(pool, server.origin)) == OK_BODY
        assert server.connections == 1


@in_loop
async def test_repeated_headers_are_joined() -> None:
    async with pool_and_server(answering(lambda body: ok(extra=b"X-Thing: a\r\nx-thing: b\r\n"))) as (pool, server):
        response = await call(pool, server.origin)
        assert response.headers["x-thing"] == "a, b"
        await read_all(response)


@pytest.mark.parametrize(
    ("answer", "kind", "partial"),
    [
        (b"", "closed", False),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", "closed", True),
        (b"SMTP ready\r\n\r\n", "protocol", True),
        (b"HTTP/1.1 200 OK\r\n" + b"x-filler: %s\r\n" % (b"f" * 1000) * 80 + b"content-length: 0\r\n\r\n", "protocol", True),
    ],
    ids=["closed before the answer", "cut mid-body", "not HTTP", "endless headers"],
)
@in_loop
async def test_broken_answers_fail_with_a_kind(answer: bytes, kind: str, partial: bool) -> None:
    async with pool_and_server(answering(lambda body: answer, once=True)) as (pool, server):
        with pytest.raises(H1Error) as caught:
            response = await call(pool, server.origin)
            await read_all(response)
        assert (caught.value.kind, caught.value.partial) == (kind, partial)
        assert "127.0.0.1" not in str(caught.value)
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0


@in_loop
async def test_an_answer_cut_off_and_its_connection_are_freed_without_a_garbage_collection() -> None:
    """The error an answer keeps is raised anew each time: the kept one would hold, through its traceback,
    the answer. The lost connection lets go of its parser, which calls back into it."""
    async with pool_and_server(answering(lambda body: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", once=True)) as (pool, server):
        gc.disable()
        try:
            response = await call(pool, server.origin)
            for _ in range(2):
                with pytest.raises(H1Error, match="cut off"):
                    await read_all(response)
            response.close()
            await asyncio.sleep(0.05)  # the connection is lost
            kept = {id(response), id(response._connection)}
            del response
            left = [type(thing).__name__ for thing in cyclic_garbage_now() if id(thing) in kept]
            assert not [name for name in left if name in ("H1Response", "_Connection")]
        finally:
            gc.enable()


@in_loop
async def test_refused_connections_say_so_without_naming_the_host() -> None:
    async with Server(answer_each_request) as server:
        origin = server.origin
    pool = H1Pool()
    with pytest.raises(H1Error) as caught:
        await call(pool, origin)
    assert caught.value.kind == "connect"
    assert caught.value.detail == "connection refused"
    assert str(origin.port) not in str(caught.value)
    assert pool.open_connections == 0


@in_loop
async def test_closing_an_unfinished_answer_aborts_its_connection() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with pool_and_server(endless) as (pool, server):
        response = await call(pool, server.origin)
        assert await response.next_chunk(2)
        response.close()
        await asyncio.sleep(0.1)
        assert pool.open_connections == 0


@in_loop
async def test_a_caller_cancelled_before_the_answer_aborts_the_request() -> None:
    async with pool_and_server(unanswered) as (pool, server):
        pending = asyncio.create_task(call(pool, server.origin))
        await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
        assert pool.open_connections == 0


@in_loop
async def test_a_silent_body_times_out_and_the_connection_is_not_reused() -> None:
    async with pool_and_server(answering(lambda body: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")) as (pool, server):
        response = await call(pool, server.origin)
        assert await response.next_chunk(1) == b"half"
        with pytest.raises(TimeoutError):
            await response.next_chunk(0.05)
        response.close()
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0


@in_loop
async def test_large_bodies_both_ways_arrive_intact_with_reading_paused_between() -> None:
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB: over JOIN_LIMIT and BUFFER_BYTES
    async with pool_and_server(answering(ok)) as (pool, server):
        for _ in range(2):
            response = await call(pool, server.origin, payload)
            await asyncio.sleep(0.2)  # let the socket fill our buffer and reading pause
            assert await read_all(response) == payload
        assert server.bodies == [payload, payload]
        assert server.connections == 1  # reading resumed: the connection was reusable


@in_loop
async def test_a_released_connection_of_another_origin_is_closed_to_make_room() -> None:
    release = asyncio.Event()
    async with Server(answering(gate=release)) as first, Server(answer_each_request) as second:
        pool = H1Pool(max_connections=1)
        held = asyncio.create_task(call(pool, first.origin))
        await asyncio.sleep(0.05)
        other = asyncio.create_task(call(pool, second.origin))
        await asyncio.sleep(0.05)
        assert not other.done()
        release.set()
        assert await read_all(await held) == OK_BODY
        assert await read_all(await other) == OK_BODY
        assert (first.connections, second.connections, pool.open_connections) == (1, 1, 1)
        await pool.aclose()


@contextlib.asynccontextmanager
async def tls_server(
    name: str, helper: Server | None = None, **certificate: Any
) -> AsyncIterator[tuple[int, ssl.SSLContext]]:
    """A loopback server over TLS with a certificate for ``name`` (``certificate``: more of trustme's
    ``issue_cert`` options), running ``helper``'s handler on each connection (answering each request
    when none is given): its port, and a client context that trusts its authority."""
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(name, **certificate).configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    helper = helper or Server(answer_each_request)
    server = await asyncio.start_server(helper._serve, "127.0.0.1", 0, ssl=server_context)
    try:
        yield server.sockets[0].getsockname()[1], client_context
    finally:
        server.close()


@in_loop
async def test_https_origins_are_reached_over_verified_tls() -> None:
    async with tls_server("127.0.0.1") as (port, client_context):
        origin = Origin("https", "127.0.0.1", port)
        pool = H1Pool(ssl_context=client_context)
        for _ in range(2):
            assert await read_all(await call(pool, origin)) == OK_BODY
        assert pool.open_connections == 1
        await pool.aclose()

        untrusting = H1Pool()  # the system's roots do not know this authority
        with pytest.raises(H1Error) as caught:
            await call(untrusting, origin)
        assert caught.value.kind == "connect"
        assert caught.value.detail.startswith("TLS handshake failed")
        assert caught.value.lasting  # a refused certificate is refused again: not worth a retry
        assert untrusting.open_connections == 0


def valid_for_a_day_from(year: int) -> dict[str, datetime.datetime]:
    start = datetime.datetime(year, 1, 1, tzinfo=datetime.UTC)
    return {"not_before": start, "not_after": start + datetime.timedelta(days=1)}


@pytest.mark.parametrize(
    ("name", "certificate", "trusted", "words"),
    [
        ("spark-cloud.test", {}, True, "the certificate does not name this host"),
        ("127.0.0.1", {}, False, "the certificate's issuer is not trusted"),
        ("127.0.0.1", valid_for_a_day_from(2001), True, "the certificate has expired"),
        ("127.0.0.1", valid_for_a_day_from(2090), True, "the certificate is not yet valid"),
    ],
    ids=["another address", "untrusted issuer", "expired", "not yet valid"],
)
@in_loop
async def test_a_refused_certificate_says_why_without_naming_the_host(
    name: str, certificate: dict[str, Any], trusted: bool, words: str
) -> None:
    """Every refused certificate was "CERTIFICATE_VERIFY_FAILED", which left an operator guessing whether
    the name, the dates or the authority was wrong."""
    async with tls_server(name, **certificate) as (port, client_context):
        pool = H1Pool(ssl_context=client_context if trusted else None)
        with pytest.raises(H1Error) as caught:
            await call(pool, Origin("https", "127.0.0.1", port))
    assert caught.value.kind == "connect"
    assert caught.value.detail == f"TLS handshake failed ({words})"
    assert "127.0.0.1" not in str(caught.value) and name not in str(caught.value)
    assert pool.open_connections == 0


@contextlib.asynccontextmanager
async def tls_pool_answering_first_then(behaviour: str) -> AsyncIterator[tuple[H1Pool, Origin, Server]]:
    """A TLS upstream that answers its first request, then meets the next with ``behaviour``, and a pool for it."""
    helper = Server(answer_first_then(behaviour))
    async with tls_server("127.0.0.1", helper) as (port, client_context):
        pool = H1Pool(ssl_context=client_context)
        try:
            yield pool, Origin("https", "127.0.0.1", port), helper
        finally:
            await pool.aclose()


@in_each_loop
async def test_a_reused_tls_connection_closed_without_close_notify_sends_the_request_again_on_a_new_one() -> None:
    """A TLS upstream that drops a kept-alive connection as the next request arrives, without close_notify,
    closed it as idle, as over plain TCP: the request goes again once, on a new connection. uvloop reports
    that close with no eof_received, and it was taken for the upstream's fault."""
    async with tls_pool_answering_first_then("drop") as (pool, origin, helper):
        assert await read_all(await call(pool, origin)) == OK_BODY
        assert await read_all(await call(pool, origin, b'{"n":2}')) == OK_BODY
    assert helper.connections == 2 and helper.bodies == [b"{}", b'{"n":2}', b'{"n":2}']


@in_each_loop
async def test_a_reset_tls_connection_is_the_upstreams_fault_and_is_not_sent_again() -> None:
    async with tls_pool_answering_first_then("reset") as (pool, origin, helper):
        assert await read_all(await call(pool, origin)) == OK_BODY
        with pytest.raises(H1Error) as failed:
            await call(pool, origin)
    assert failed.value.kind == "closed" and not failed.value.quietly
    assert helper.connections == 1


@in_loop
async def test_a_body_in_pieces_arrives_as_one() -> None:
    payload = bytearray(b"x" * (3 << 20))
    view = memoryview(payload)
    pieces = (view[:1000], b'"spliced"', view[1000:])
    joined = b"".join(pieces)
    async with pool_and_server(answering(lambda body: ok(str(len(body)).encode()))) as (pool, server):
        head = request_head("POST", "/", [("host", "x")]) + b"content-length: %d\r\n\r\n" % body_length(pieces)
        response = await pool.send(server.origin, head, pieces, connect_timeout_s=2)
        assert await read_all(response) == str(len(joined)).encode()
        assert server.bodies == [joined]


@pytest.mark.parametrize(
    ("encoding", "wbits"),
    [("gzip", 16 + zlib.MAX_WBITS), ("deflate", zlib.MAX_WBITS), ("deflate", -zlib.MAX_WBITS)],
    ids=["gzip", "deflate-zlib", "deflate-raw"],
)
@in_loop
async def test_a_compressed_answer_is_decoded(encoding: str, wbits: int) -> None:
    """deflate as RFC 9110 has it (zlib-wrapped) and as many servers send it (raw), as httpx reads both."""
    text = b'{"choices":[{"message":{"content":"' + b"squeeze " * 2000 + b'"}}]}'
    packer = zlib.compressobj(wbits=wbits)
    packed = packer.compress(text) + packer.flush()
    extra = b"content-encoding: %s\r\n" % encoding.encode()
    async with pool_and_server(answering(lambda body: ok(packed, extra=extra))) as (pool, server):
        for _ in range(2):
            assert await read_all(await call(pool, server.origin)) == text
        assert server.connections == 1


@pytest.mark.parametrize(("unpacked_mib", "refused"), [(3, False), (16, True)])
@in_loop
async def test_a_compressed_answer_is_refused_once_it_unpacks_past_the_bound(unpacked_mib: int, refused: bool) -> None:
    """A gzip bomb is unpacked a step at a time and given up at the bound, not unpacked whole in one call."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    packed = b"".join([*(packer.compress(b" " * (1 << 20)) for _ in range(unpacked_mib)), packer.flush()])
    extra = b"content-encoding: gzip\r\n"
    async with pool_and_server(answering(lambda body: ok(packed, extra=extra))) as (pool, server):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(h1, "MAX_DECODED_BYTES", 8 << 20)
            if not refused:
                assert len(await read_all(await call(pool, server.origin))) == unpacked_mib << 20
                return
            with pytest.raises(H1Error) as caught:
                await read_all(await call(pool, server.origin))
        assert caught.value.kind == "protocol" and "unpacks to more than 8 MiB" in caught.value.detail


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("damage", ["broken", "cut"])
@in_loop
async def test_a_damaged_compressed_answer_is_a_protocol_error(encoding: str, damage: str) -> None:
    """Compressed data that does not unpack, or ends early, is the upstream's fault, said as such: zlib's
    error escaped the parser's callback (the answer read as not HTTP/1.1 at all), and a cut one was
    served as the text it held so far."""
    gzip = encoding == "gzip"
    packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
    packed = packer.compress(os.urandom(3000).hex().encode()) + packer.flush()
    header = 10 if gzip else 2
    packed = packed[:header] + b"\xff" * 20 if damage == "broken" else packed[: len(packed) // 2]
    extra = b"content-encoding: %s\r\n" % encoding.encode()
    async with pool_and_server(answering(lambda body: ok(packed, extra=extra))) as (pool, server):
        with pytest.raises(H1Error) as caught:
            await read_all(await call(pool, server.origin))
        assert caught.value.kind == "protocol"
        assert caught.value.detail == f"the answer's compressed body is {'broken' if damage == 'broken' else 'cut short'}"


@in_loop
async def test_an_encoding_it_cannot_decode_is_refused() -> None:
    async with pool_and_server(answering(lambda body: ok(b"\x8b\x00", extra=b"content-encoding: br\r\n"))) as (pool, server):
        with pytest.raises(H1Error) as caught:
            await call(pool, server.origin)
        assert caught.value.kind == "protocol"
        assert "content-encoding (br)" in caught.value.detail


@in_loop
async def test_an_answer_that_does_not_begin_in_time_is_given_up_and_its_request_dropped() -> None:
    async with pool_and_server(unanswered) as (pool, server):
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await pool.send(server.origin, head_for(server.origin, b"{}"), b"{}", connect_timeout_s=2, answer_timeout_s=0.1)
        assert 0.09 <= asyncio.get_running_loop().time() - started < 1
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
        assert pool.open_connections == 0


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (b"SMTP ready\r\n\r\n", "not valid HTTP"),
        (b"", "closed the connection"),
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", "switched protocols"),
    ],
    ids=["not HTTP", "closed", "switched protocols"],
)
@in_loop
async def test_the_upstream_client_turns_a_broken_answer_into_a_reset_fault_naming_no_host(answer: bytes, detail: str) -> None:
    async with Server(answering(lambda body: answer, once=True)) as server:
        client = UpstreamClient()
        port = server.origin.port
        base_url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(UpstreamFault) as caught:
            await client.open(target(base_url), b"{}", wait_s=2, ends_at=asyncio.get_running_loop().time() + 5)
        await client.aclose()
    assert caught.value.kind == "reset"
    assert detail in caught.value.detail
    assert "127.0.0.1" not in str(caught.value) and str(port) not in str(caught.value)
