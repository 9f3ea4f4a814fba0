"""A lean HTTP/1.1 client: keep-alive connection pools over asyncio protocols, parsed by httptools.

The gateway sends one kind of request (a POST with a body in memory, headers
prepared per target) and reads one kind of answer (a JSON body or an SSE
stream), hundreds at a time. A general client pays for what it does not need
here on every call: measured against a local stand-in, aiohttp's client cost
60 µs of CPU per request at 64 concurrent (145 µs one at a time) and httpx's
layer over it another ~50 µs; this one costs about 11 µs (38 µs), which was a
quarter of the gateway's whole cost per small request.

What it does, and no more:
- one pool of idle connections per origin (scheme, host, port), reused newest
  first, closed once idle for ``keepalive_s`` (under uvicorn's default of 5 s,
  so a reused connection is not one the server is about to close), and at
  most ``max_connections`` open in all, later callers queueing for a slot;
- a request is written in one piece when small, head then body when large (a
  20 MB image body is not copied to prepend a head);
- the answer's body is delivered as the socket yields it; reading pauses once
  ``BUFFER_BYTES`` are waiting unread, so a slow consumer is not a memory leak;
- a body the upstream compressed although asked not to (gzip, deflate) is
  decoded; another encoding is refused as a protocol error;
- a connection goes back to its pool only after a complete answer that allows
  keep-alive; one closed before its answer was read is aborted, which is how an
  upstream learns that nobody is listening any more;
- an origin that ``proxies`` (``gateway.proxies``) sends through a proxy is
  reached through a ``CONNECT`` tunnel, TLS running inside it end to end.

Failures are ``H1Error`` with a ``kind``: ``connect`` (refused, unreachable:
``errno`` set; a proxy that refuses the tunnel), ``connect_timeout``,
``closed`` (the connection ended before or during the answer; ``partial`` says
which), ``protocol`` (not HTTP/1.x).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import socket
import ssl
import time
import zlib
from typing import Any, NamedTuple

import httptools

from gateway.proxies import Proxies, Proxy, authority

# Unread body bytes held per answer before reading from the socket pauses.
BUFFER_BYTES = 1 << 20
# An answer whose headers pass this size is refused: a head is a few hundred bytes.
MAX_HEAD_BYTES = 64 * 1024
# A request up to this size goes out as one write: head and body joined.
JOIN_LIMIT = 64 * 1024
# A reused connection closed this soon after the request, with no byte of answer, was closed by
# the upstream as it sat idle, not because of the request: the request goes again on a new one.
STALE_CLOSE_S = 0.5

# A request body: bytes, or pieces written one after the other (a large body with
# one value spliced in, sent without copying the megabytes around it).
RequestBody = bytes | tuple[bytes | memoryview, ...]


def body_length(body: RequestBody) -> int:
    return len(body) if isinstance(body, bytes) else sum(len(part) for part in body)


class H1Error(Exception):
    def __init__(
        self, kind: str, detail: str, *, errno: int | None = None, partial: bool = False, quietly: bool = False, lasting: bool = False
    ) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.errno = errno
        self.partial = partial
        # "closed" by the upstream's orderly close (no reset), before any byte of answer.
        self.quietly = quietly
        # A refusal that calling again at once cannot change: a certificate refused, a proxy's no.
        self.lasting = lasting

    def again(self) -> H1Error:
        """The same error, as a new exception without a traceback."""
        return H1Error(self.kind, self.detail, errno=self.errno, partial=self.partial, quietly=self.quietly, lasting=self.lasting)


def errno_words(number: object) -> str:
    """An OS error number in its own words ("connection refused"): the OS message names the host and port."""
    return os.strerror(number).lower() if isinstance(number, int) and number > 0 else "cannot connect"


# Why a certificate was refused, by OpenSSL's verify code (X509_V_ERR_*), in fixed words: the reason
# is CERTIFICATE_VERIFY_FAILED for all of them, which leaves an operator guessing, and OpenSSL's own
# message names the host, which must not reach clients.
_VERIFY_WORDS = {
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed and not trusted",
    19: "the certificate's chain ends in a self-signed authority that is not trusted",
    20: "the certificate's issuer is not trusted",
    21: "the certificate cannot be verified up to a trusted authority",
    62: "the certificate does not name this host",
    64: "the certificate does not name this host",  # the host given as an IP address
}


def tls_failure_words(exc: ssl.SSLError) -> str:
    """Why a TLS handshake failed, in words that name no host."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in _VERIFY_WORDS:
        return _VERIFY_WORDS[exc.verify_code]
    return exc.reason or "ssl error"


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


class H1Response:
    """An answer being received: status and headers known, the body read with ``next_chunk``.

    ``headers`` has lower-case names; a repeated header's values are joined by ", ".
    The owner must ``close()`` it on every path.
    """

    __slots__ = ("_buffered", "_chunks", "_closed", "_complete", "_connection", "_error", "_waiter", "headers", "status")

    def __init__(self, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: H1Error | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    async def next_chunk(self, timeout_s: float) -> bytes | None:
        """The body's next bytes (everything received so far), or None at its end.

        Raises ``TimeoutError`` when nothing arrives within ``timeout_s``, and
        ``H1Error`` when the connection ends before the body does.
        """
        if not self._chunks and not self._complete and self._error is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _expire, waiter) if timeout_s != math.inf else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
                # A timed-out future holds its TimeoutError, whose traceback holds this frame: a
                # cycle, keeping the request until a garbage collection, unless the frame lets go.
                del waiter
        if self._chunks:
            chunk = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            if self._buffered >= BUFFER_BYTES:
                self._connection.resume_reading()
            self._buffered = 0
            return chunk
        if self._error is not None:
            # Raising the one this object keeps would give it a traceback holding this frame, which
            # holds this object: a cycle, freed only by a garbage collection.
            raise self._error.again()
        return None

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Done with the answer: its connection goes back to the pool if it may, else it is aborted."""
        if self._closed:
            return
        self._closed = True
        self._connection.release(reusable=self._complete and self._error is None)

    # Called by the connection.

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= BUFFER_BYTES:
            self._connection.pause_reading()
        self._wake()

    def _finish(self, error: H1Error | None = None) -> None:
        if self._complete or self._error is not None:
            return
        if error is None:
            self._complete = True
        else:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# A compressed answer is unpacked this much at a time, and refused once its unpacked size
# passes MAX_DECODED_BYTES: 1 MB of gzip can unpack to 1 GB, in one call if not held back.
# Twice what the gateway reads of one answer (upstream.MAX_ANSWER_BYTES): this bounds what
# one read from the socket can unpack to before the reader's own bound is reached.
DECODE_STEP_BYTES = 1 << 20
MAX_DECODED_BYTES = 128 << 20



class _Deflate:
    """``Content-Encoding: deflate`` as servers send it: zlib-wrapped as RFC 9110 says, or raw deflate
    (as many do). Which one is told by the first bytes; a ``zlib.decompressobj`` otherwise."""

    def __init__(self) -> None:
        self._decoder: Any = zlib.decompressobj()
        self._first: bytes | None = b""  # what was fed before any output, to feed again as raw

    @property
    def unconsumed_tail(self) -> bytes:
        return self._decoder.unconsumed_tail  # type: ignore[no-any-return]

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        if self._first is None:
            return self._decoder.decompress(data, max_length)  # type: ignore[no-any-return]
        self._first += data
        try:
            out: bytes = self._decoder.decompress(data, max_length)
        except zlib.error:
            self._decoder, data, self._first = zlib.decompressobj(-zlib.MAX_WBITS), self._first, None
            return self._decoder.decompress(data, max_length)  # type: ignore[no-any-return]
        if out or len(self._first) >= 2:  # its zlib header passed: it is zlib
            self._first = None
        return out

    @property
    def eof(self) -> bool:
        return self._decoder.eof  # type: ignore[no-any-return]

    def flush(self) -> bytes:
        return self._decoder.flush()  # type: ignore[no-any-return]


_DECODERS: dict[str, Any] = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": _Deflate,
}


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection, carrying one request at a time."""

    def __init__(self, pool: H1Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._reading_paused = False
        self._head_waiter: asyncio.Future[H1Response] | None = None
        self._response: H1Response | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._decoder: Any = None  # a zlib decompressor when the body is gzip or deflate
        self._decoded_bytes = 0
        self._decoded_any = False
        self._body_until_eof = False
        self._received_any = False
        self._keep_alive = False
        self._aborted = False  # closed by this side, not the upstream

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._head_waiter is None and self._response is None:
            self._abort()  # bytes nobody asked for: the connection's state is unknown
            return
        self._received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(H1Error("protocol", "the upstream's answer is not valid HTTP/1.1", partial=True))
            self._abort()
        except httptools.HttpParserUpgrade:  # not a subclass of the above: uncaught, the loop logs a traceback
            self._fail(H1Error("protocol", "the upstream switched protocols, which no chat answer does", partial=True))
            self._abort()

    def eof_received(self) -> bool | None:
        if self._head_waiter is None and self._response is None:
            self.closed = True  # idle: not to be handed out again before connection_lost comes
        return None  # close the transport; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._response is not None and self._body_until_eof and self._status:
            self._end_body()  # a body without length or chunks ends with the connection
        partial = self._received_any
        detail = "the answer was cut off" if partial else "the upstream closed the connection"
        # An orderly close is told by the absence of an error, not by eof_received: uvloop reports a TLS
        # upstream's close without close_notify (a bare FIN, as many servers close) as connection_lost(None)
        # alone. A reset comes with its error; this side's own abort is not the upstream's close at all.
        quietly = exc is None and not self._aborted and not partial
        self._fail(H1Error("closed", detail, partial=partial, quietly=quietly))
        self.pool._lost(self)
        # The parser calls back into this connection: let go of it, or the two would wait for a
        # garbage collection, with whatever the connection still holds.
        del self._parser

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            # Raised out of feed_data by httptools, and handled there as not HTTP.
            raise httptools.HttpParserError("the answer's headers are too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        if self._head_waiter is None:
            # A second answer to one request: the connection cannot be trusted any more.
            self._fail(H1Error("protocol", "the upstream sent an answer nobody asked for", partial=True))
            self._abort()
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = {}  # an interim answer (103 Early Hints): the real one follows
            return
        self._status = status
        headers = self._headers
        self._body_until_eof = (
            "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        self._keep_alive = self._parser.should_keep_alive() and not self._body_until_eof
        encoding = headers.get("content-encoding", "identity").strip().lower()
        # We ask for identity; an upstream that compresses anyway gets decoded, as clients do.
        self._decoder = _DECODERS[encoding]() if encoding in _DECODERS else None
        self._decoded_bytes = 0
        self._decoded_any = False
        if self._decoder is None and encoding != "identity":
            self._fail(H1Error("protocol", f"the answer's content-encoding ({encoding[:20]}) cannot be decoded", partial=True))
            self._abort()
            return
        response = self._response = H1Response(self, status, headers)
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is None or self.closed:
            return
        if self._decoder is None:
            if body:
                self._response._feed(body)
            return
        self._decoded_any = self._decoded_any or bool(body)
        try:
            self._decode(self._decoder, body, self._response)
        except zlib.error:
            self._fail(H1Error("protocol", "the answer's compressed body is broken", partial=True))
            self._abort()

    def _decode(self, decoder: Any, body: bytes, response: H1Response) -> None:
        piece = decoder.decompress(body, DECODE_STEP_BYTES)
        while True:
            if piece:
                self._decoded_bytes += len(piece)
                if self._decoded_bytes > MAX_DECODED_BYTES:
                    self._fail(H1Error("protocol", f"the answer unpacks to more than {MAX_DECODED_BYTES >> 20} MiB", partial=True))
                    self._abort()
                    return
                response._feed(piece)
            if not decoder.unconsumed_tail:
                return
            piece = decoder.decompress(decoder.unconsumed_tail, DECODE_STEP_BYTES)

    def on_message_complete(self) -> None:
        if self._status == 0:
            return  # the end of an interim answer
        self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
        self._end_body()

    def _end_body(self) -> None:
        if self._response is not None:
            if self._decoder is not None:
                decoder, self._decoder = self._decoder, None
                tail = decoder.flush()
                if tail:
                    self._response._feed(tail)
                if self._decoded_any and not decoder.eof:
                    self._response._finish(H1Error("protocol", "the answer's compressed body is cut short", partial=True))
                    return
            self._response._finish()

    # used by the pool and the response

    def send(self, head: bytes, body: RequestBody) -> asyncio.Future[H1Response]:
        assert self.transport is not None
        self._response = None
        self._status = 0
        self._headers = {}
        self._head_bytes = 0
        self._decoder = None
        self._received_any = False
        waiter = self._head_waiter = asyncio.get_running_loop().create_future()
        if not isinstance(body, bytes):
            self.transport.writelines((head, *body))
        elif len(body) <= JOIN_LIMIT:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        return waiter

    def release(self, reusable: bool) -> None:
        self._response = None
        self._head_waiter = None
        # A request still being written (an upstream that answered before reading it all, a 413 say)
        # would go out ahead of the next one: such a connection is not reused.
        if (
            reusable and self._keep_alive and not self.closed and not self._reading_paused
            and self.transport is not None and not self.transport.get_write_buffer_size()
        ):
            self.pool._put(self)
        else:
            self._abort()

    def _fail(self, error: H1Error) -> None:
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self._response is not None:
            self._response._finish(error)

    def _abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self._aborted = True
            self.transport.abort()


class H1Pool:
    """Keep-alive connections per origin; at most ``max_connections`` open at once.

    A caller that finds no idle connection and no free slot queues (first come,
    first served) until a connection of its origin is released to it, or one is
    closed and its slot passes on; idle connections of other origins are closed
    to make room.
    """

    def __init__(
        self,
        max_connections: int = 4096,
        max_idle_per_origin: int = 256,
        keepalive_s: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Proxies | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_s = keepalive_s
        self._ssl_context = ssl_context
        self._proxies = proxies or None
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0
        # Each waiter gets a released connection of its origin, or None: a slot to connect in.
        self._waiters: collections.deque[tuple[Origin, asyncio.Future[_Connection | None]]] = collections.deque()
        self._connections: set[_Connection] = set()
        self._reaper: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        return self._open

    async def send(
        self, origin: Origin, head: bytes, body: RequestBody, connect_timeout_s: float, answer_timeout_s: float = math.inf
    ) -> H1Response:
        """Write the request on a pooled or new connection and wait for the answer's head.

        ``connect_timeout_s`` bounds waiting for a slot and connecting
        (``H1Error`` "connect_timeout"); ``answer_timeout_s`` bounds the whole
        call, connecting included (``TimeoutError``). A timer on the head's
        future does it, not ``asyncio.timeout``: this runs for every request.
        A caller cancelled or timed out while waiting for the head aborts the
        connection: the upstream sees the request dropped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + answer_timeout_s
        connection = self._take_idle(origin)
        if connection is not None:
            sent_at = loop.time()
            try:
                return await self._exchange(connection, head, body, deadline)
            except H1Error as error:
                # An upstream that closes a kept-alive connection as it is reused (its idle timeout
                # firing while the request is on its way) closes it in order, answering nothing, at
                # once: the request goes again, once, on a new connection, instead of failing as a
                # fault of the upstream. A reset, or a close after a while, is the upstream's.
                if not error.quietly or loop.time() - sent_at > STALE_CLOSE_S:
                    raise
        remaining_s = deadline - loop.time()
        try:
            async with asyncio.timeout(min(connect_timeout_s, remaining_s)):
                connection = await self._acquire(origin)
        except TimeoutError:
            if remaining_s <= connect_timeout_s:
                raise
            raise H1Error("connect_timeout", "no connection in time") from None
        return await self._exchange(connection, head, body, deadline)

    @staticmethod
    async def _exchange(connection: _Connection, head: bytes, body: RequestBody, deadline: float) -> H1Response:
        waiter = connection.send(head, body)
        timer = asyncio.get_running_loop().call_at(deadline, _expire, waiter) if deadline != math.inf else None
        try:
            return await waiter
        except BaseException:
            connection._abort()
            # The future holds the error, whose traceback holds this frame: a cycle, keeping
            # the request's body until a garbage collection, unless the frame lets go of it.
            del waiter
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        expired_before = time.monotonic() - self.keepalive_s
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if connection.idle_since < expired_before:
                connection._abort()  # every older one has expired too
                for stale in idle:
                    stale._abort()
                idle.clear()
                return None
            return connection
        return None

    async def _acquire(self, origin: Origin) -> _Connection:
        if self._open < self.max_connections and not self._waiters:
            self._open += 1
            return await self._connect(origin)
        for idle in self._idle.values():  # they hold slots for nothing while we wait
            while idle:
                idle.pop()._abort()
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        entry = (origin, waiter)
        self._waiters.append(entry)
        try:
            handed = await waiter
        except BaseException:
            if not waiter.done() or waiter.cancelled():
                self._waiters.remove(entry)
            elif (connection := waiter.result()) is not None:
                self._put(connection)  # released to us just as we gave up: pass it on
            else:
                self._give_slot()
            raise
        return handed if handed is not None else await self._connect(origin)

    async def _connect(self, origin: Origin) -> _Connection:
        """Open a connection in a slot already counted in ``_open``."""
        loop = asyncio.get_running_loop()
        connection = _Connection(self, origin)
        context = self._tls_context() if origin.scheme == "https" else None
        proxy = self._proxies.for_origin(*origin) if self._proxies is not None else None
        try:
            if proxy is None:
                await loop.create_connection(
                    lambda: connection, origin.host, origin.port, ssl=context,
                    server_hostname=origin.host if context is not None else None,
                )
            else:
                await _open_tunnel(loop, connection, proxy, context)
        except BaseException as exc:
            self._give_slot()
            if isinstance(exc, ssl.SSLError):
                lasting = isinstance(exc, ssl.SSLCertVerificationError)
                raise H1Error("connect", f"TLS handshake failed ({tls_failure_words(exc)})", lasting=lasting) from None
            if isinstance(exc, socket.gaierror):
                raise H1Error("connect", "the host name does not resolve") from None
            if isinstance(exc, OSError):
                number = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else None
                raise H1Error("connect", errno_words(number), errno=number) from None
            raise
        self._connections.add(connection)
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _next_waiter(self) -> tuple[Origin, asyncio.Future[_Connection | None]] | None:
        while self._waiters:
            entry = self._waiters.popleft()
            if not entry[1].done():
                return entry
        return None

    def _give_slot(self) -> None:
        entry = self._next_waiter()
        if entry is None:
            self._open -= 1
        else:
            entry[1].set_result(None)  # the slot passes on; _open is unchanged

    def _put(self, connection: _Connection) -> None:
        if self._waiters:
            entry = self._next_waiter()
            if entry is not None:
                origin, waiter = entry
                if origin == connection.origin:
                    waiter.set_result(connection)
                else:
                    self._waiters.appendleft(entry)
                    connection._abort()  # its slot goes to the waiter when the close completes
                return
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= self.max_idle_per_origin:
            idle[:] = [kept for kept in idle if not kept.closed]
        if len(idle) >= self.max_idle_per_origin:
            connection._abort()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self.keepalive_s, self._reap)

    def _reap(self) -> None:
        """Close the connections idle for ``keepalive_s``: taking one looks at the newest only,
        and an upstream with a long idle timeout of its own would keep the others open for good."""
        self._reaper = None
        expired_before = time.monotonic() - self.keepalive_s
        for idle in self._idle.values():
            # Oldest first, as they were put back.
            while idle and (idle[0].closed or idle[0].idle_since < expired_before):
                idle.pop(0)._abort()
        if any(self._idle.values()):
            self._reaper = asyncio.get_running_loop().call_later(self.keepalive_s, self._reap)

    def _lost(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._give_slot()

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for connection in list(self._connections):
            connection._abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost


class _Tunnel(asyncio.Protocol):
    """A connection to a proxy until the proxy answers its ``CONNECT``; the transport is then handed on."""

    def __init__(self) -> None:
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            return  # the tunnel is being handed on or given up: either way these bytes are not ours
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self.answered.set_exception(H1Error("protocol", "the proxy's answer to CONNECT never ends"))
            return
        status = _proxy_status(bytes(self._head[:end]))
        if status is None:
            self.answered.set_exception(H1Error("protocol", "the proxy's answer to CONNECT is not HTTP/1.x"))
        elif not 200 <= status < 300:
            refusal = "refused the credentials" if status == 407 else "refused the tunnel"
            self.answered.set_exception(H1Error("connect", f"the proxy {refusal} (HTTP {status})", lasting=status in (403, 407)))
        elif end + 4 != len(self._head):
            # Nothing may come before the first request (http) or the TLS hello (https).
            self.answered.set_exception(H1Error("protocol", "the proxy sent bytes before the tunnel was used"))
        else:
            self.answered.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(H1Error("connect", "the proxy closed the connection before the tunnel opened"))


def _proxy_status(head: bytes) -> int | None:
    """The status of a proxy's answer head, or None when it is not an HTTP/1.x status line."""
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit() or len(line[1]) != 3:
        return None
    return int(line[1])


async def _open_tunnel(
    loop: asyncio.AbstractEventLoop, connection: _Connection, proxy: Proxy, context: ssl.SSLContext | None
) -> None:
    """Connect ``connection`` to its origin through a ``CONNECT`` tunnel of ``proxy``, TLS inside when ``context``."""
    origin = connection.origin
    try:
        transport, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
    except socket.gaierror:
        raise H1Error("connect", "the proxy's host name does not resolve") from None
    except OSError as exc:
        number = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else None
        raise H1Error("connect", f"the proxy: {errno_words(number)}", errno=number) from None
    target = authority(origin.host, origin.port)
    head = [("host", target)]
    if proxy.authorization is not None:
        head.append(("proxy-authorization", proxy.authorization.decode("ascii")))
    try:
        transport.write(request_head("CONNECT", target, head) + b"\r\n")
        await tunnel.answered
        if context is not None:
            tls = await loop.start_tls(transport, connection, context, server_hostname=origin.host)
            assert tls is not None  # None only for a transport that is closing
            transport = tls
        else:
            transport.set_protocol(connection)
        connection.connection_made(transport)
    except BaseException:
        transport.abort()
        raise


def request_head(method: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    """The request line and headers, ready to prefix a body's content-length."""
    lines = [f"{method} {path} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")
