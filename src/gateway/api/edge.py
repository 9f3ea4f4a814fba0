"""Small ASGI helpers for the completion endpoints, which run as raw ASGI handlers.

The completion path skips Litestar's request parsing: it reads the body itself
(so ``max_request_bytes`` is enforced while reading, and a 1 GB upload is
refused at the limit instead of buffered), decodes JSON once with msgspec, and
writes its own responses. A disconnect watcher cancels the handler the moment
the client leaves, so the upstream call is closed at once on every path.

Under granian (2.8), ``receive()`` after the body has been read blocks until the
client goes away and then returns ``http.disconnect`` within milliseconds,
before the first byte and mid-stream alike (tests/test_disconnect.py holds it
to a second). A ``send`` to a client that has gone, on the other hand, does not
raise there: the bytes are silently dropped, so without the watcher a stream
would run to its end for nobody. Servers whose ``send`` does raise get
``ClientGone``, which ends the handler just as quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any, Self

from gateway.chunks import Chunks
from gateway.errors import GatewayError
from gateway.shaping import encode

log = logging.getLogger("gateway.edge")

Headers = list[tuple[bytes, bytes]]
JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The field's value; a field sent more than once is its values joined by ", " (RFC 9110 §5.3).

    Joined, not the first: of two ``Authorization`` headers, a proxy in front may
    read the other one, so a repeated single-valued field is made invalid.
    """
    found: bytes | None = None
    for key, value in scope["headers"]:  # runs for every request: no list for the one match there usually is
        if key == name:
            found = value if found is None else found + b", " + value
    return found.decode("latin-1") if found is not None else None


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        "request_too_large",
        f"The body is larger than the gateway's limit of {limit} bytes ({limit / 1048576:.1f} MiB). "
        "Send fewer or smaller images.",
    )


def declared_length(scope: Mapping[str, Any]) -> int | None:
    value = header(scope, b"content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


# A body at least this long is kept as the pieces it came in (``gateway.chunks``).
CHUNKED_MIN_BYTES = 64 * 1024


class StalledBodies:
    """Ends the body reads whose next piece is overdue, as 408 ``request_timeout``.

    One timer per worker sweeps every read in progress, instead of a timer per
    request: a bare ``call_at`` measured 2.5 µs per request and ``asyncio.timeout``
    6.7 µs, against ~180 µs of CPU for the whole of a small request. A deadline is
    thus kept to within ``SWEEP_S``.
    """

    SWEEP_S = 0.25

    def __init__(self) -> None:
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweep: asyncio.TimerHandle | None = None

    def arm(self, task: asyncio.Task[Any], deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        self._deadlines[task] = deadline
        if self._sweep is None:
            self._sweep = loop.call_later(self.SWEEP_S, self._run, loop)

    def disarm(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; whether its read had run out of time (and was cancelled for it)."""
        self._deadlines.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        now = loop.time()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()
        if self._deadlines:
            self._sweep = loop.call_later(self.SWEEP_S, self._run, loop)


async def read_body(receive: Any, limit: int, declared: int | None, stalls: StalledBodies, idle_s: float) -> bytes | Chunks:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes, and
    with 408 once a piece takes more than ``idle_s`` to come.

    A declared length over the limit is refused before a byte is read. A body
    of ``CHUNKED_MIN_BYTES`` or more comes back as ``Chunks``, the pieces as
    the server delivered them: joining them would copy every byte of a 20 MB
    image once more, and hold it twice while doing so.
    """
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    try:
        while True:
            # granian hands the app a piece only once its buffer is full or the body ends,
            # so the first piece is waited for like any other.
            stalls.arm(task, loop.time() + idle_s, loop)
            message = await receive()
            size = _add_piece(message, chunks, size, limit)
            if not message.get("more_body", False):
                break
    except asyncio.CancelledError:
        if stalls.disarm(task):
            task.uncancel()
            # The rest of the body may still come, and would be read as the next request: close.
            # Said in the head, as RFC 9110 asks; the server closes on its own too, but not always says so.
            raise GatewayError(
                "request_timeout", f"The body stopped arriving: nothing for {idle_s:g} s after {size} bytes.", headers={"Connection": "close"}
            ) from None
        raise
    finally:
        stalls.disarm(task)
    if size >= CHUNKED_MIN_BYTES:
        return Chunks(chunks)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _add_piece(message: Mapping[str, Any], chunks: list[bytes], size: int, limit: int) -> int:
    """Keep one ``http.request`` message's bytes; the body's size so far."""
    if message["type"] == "http.disconnect":
        # granian says this for a client that left and for broken chunked framing alike, and
        # can still answer the latter: say why (nginx counts a cut body as 400 too).
        raise GatewayError(
            "incomplete_body",
            f"The body ended after {size} bytes, before it was whole: the connection closed, or its chunked framing is broken.",
            headers={"Connection": "close"},
        )
    chunk = message.get("body", b"")
    if chunk:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return size


class ClientGone(Exception):
    """The client went away while its answer was being sent."""


async def _send_or_gone(send: Any, message: dict[str, Any]) -> None:
    try:
        await send(message)
    except (OSError, RuntimeError) as exc:  # granian: "transport closed"; others: broken pipe
        raise ClientGone(str(exc)) from exc


def _extra(headers: Mapping[str, str] | None) -> Headers:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]


async def send_bytes(send: Any, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Send a whole answer; raises ``ClientGone`` if the client left."""
    await _send_or_gone(send, {"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await _send_or_gone(send, {"type": "http.response.body", "body": body})


async def send_error(send: Any, error: GatewayError, extra: Headers | None = None) -> None:
    await send_bytes(send, error.status, encode(error.envelope()), [*JSON_HEADERS, *_extra(error.headers), *(extra or [])])


async def send_stream(send: Any, events: AsyncGenerator[bytes, None], headers: Headers) -> None:
    """Send an SSE answer; raises ``ClientGone`` if the client left (the caller closes the upstream)."""
    async with contextlib.aclosing(events):
        await _send_or_gone(send, {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
        async for event in events:
            try:  # _send_or_gone inlined: this runs for every chunk
                await send({"type": "http.response.body", "body": event, "more_body": True})
            except (OSError, RuntimeError) as exc:
                raise ClientGone(str(exc)) from exc
        await _send_or_gone(send, {"type": "http.response.body", "body": b"", "more_body": False})


class OverdueCutoff:
    """Within its block, the current task is cancelled if it still runs ``after_s`` from now, and the
    block ends in ``ClientGone``: the answer is cut off, and each ``finally`` closes what it opened.

    A stream's relay bounds the upstream's side by the total time; this bounds the
    client's. One that stops reading without leaving (a suspended process, a slow
    or hostile reader) leaves ``send`` waiting with no end, and with it the
    upstream call and its backend's concurrency slot. One timer per stream, not a
    timeout around each write.
    """

    __slots__ = ("_after_s", "_fired", "_handle", "_task")

    def __init__(self, after_s: float) -> None:
        self._after_s = after_s

    def __enter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._fired = False
        self._handle = asyncio.get_running_loop().call_later(max(0.0, self._after_s), self._fire)

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        self._handle.cancel()
        # The timer can only fire while the block awaits, so its cancellation ends the block.
        if self._fired and kind is not None and issubclass(kind, asyncio.CancelledError) and self._task.uncancel() == 0:
            log.warning("an answer was cut off %.3g s after it began: the client stopped reading it", self._after_s)
            raise ClientGone("the client stopped reading") from None


class cancelled_on_disconnect:  # a class named as the function it replaced: ``async with cancelled_on_disconnect(receive)``
    """Cancel the current task when the client disconnects; the body must already be read.

    Everything inside (waiting for the upstream, backoff sleeps, relaying a
    stream) is cancelled at once, and each ``finally`` on the way out closes what
    it opened: that is what closes the upstream connection. The block then ends
    quietly: there is nobody left to answer.

    Under granian ``receive()`` returns a future: a done-callback watches it, so
    a request costs no watcher task (a task per request measured ~4% of the CPU
    of a small request). Other servers' coroutines get a task.
    """

    __slots__ = ("_disconnected", "_pending", "_receive", "_task", "_watcher")

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._pending: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._disconnected = False

    async def __aenter__(self) -> Self:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._listen()
        return self

    def answered(self) -> None:
        """The whole answer is sent: stop watching. Once an answer has ended, granian reports a
        disconnect, which must not cancel what is left to do (the accounting, keeping the upstream
        connection for the next call)."""
        self._stop_listening()

    def _listen(self) -> None:
        awaitable = self._receive()
        if asyncio.isfuture(awaitable):
            self._pending = awaitable
            awaitable.add_done_callback(self._on_message)
            return
        if asyncio.iscoroutine(awaitable):
            awaitable.close()  # not started, so nothing lost: the task below listens instead
        self._watcher = asyncio.ensure_future(self._watch())

    def _on_message(self, future: Any) -> None:
        if future is not self._pending or future.cancelled():
            return  # the block has ended
        try:
            message = future.result()
        except Exception as exc:  # noqa: BLE001 - a broken receive channel means the client is gone too
            log.debug("receive() failed, taking the client as gone: %r", exc)
            message = {"type": "http.disconnect"}
        if message.get("type") == "http.disconnect":
            self._gone()
        else:
            self._listen()

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:  # noqa: BLE001 - as above
            log.debug("receive() failed, taking the client as gone: %r", exc)
        self._gone()

    def _gone(self) -> None:
        self._disconnected = True
        assert self._task is not None
        self._task.cancel()

    def _stop_listening(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            # Let go of it too: its frame holds this object, and the cancelled task will hold that frame.
            watcher.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> bool:
        self._stop_listening()
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            assert self._task is not None
            # The client is gone: nothing to answer, and the upstream is already closed.
            return self._disconnected and self._task.uncancel() == 0
        return kind is not None and issubclass(kind, ClientGone)
