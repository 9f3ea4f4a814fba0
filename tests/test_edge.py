"""The completion endpoints' ASGI helpers: the disconnect watch and the body reader.

The disconnect watch (``cancelled_on_disconnect``): granian's ``receive()``
returns a future (watched by a callback); other servers' return coroutines
(watched by a task). Both must behave the same.

The body reader (``read_body``): whatever pieces the server delivers the body
in, and whatever length was declared, it returns exactly the bytes that
arrived (a large body as those very pieces, unjoined), and refuses a body over
the limit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.edge import CHUNKED_MIN_BYTES, ClientGone, StalledBodies, cancelled_on_disconnect, read_body
from gateway.chunks import Chunks
from gateway.errors import GatewayError


class FutureChannel:
    """receive() as granian has it: each call returns a future the server resolves."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Future[dict[str, Any]]] = []

    def receive(self) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.calls.append(future)
        return future

    def deliver(self, message: dict[str, Any]) -> None:
        self.calls[-1].set_result(message)

    def pending(self) -> bool:
        return bool(self.calls) and not self.calls[-1].done()


class CoroutineChannel:
    """receive() as most ASGI servers have it: a coroutine function."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.waiting = 0

    async def receive(self) -> dict[str, Any]:
        self.waiting += 1
        try:
            return await self.queue.get()
        finally:
            self.waiting -= 1

    def deliver(self, message: dict[str, Any]) -> None:
        self.queue.put_nowait(message)

    def pending(self) -> bool:
        return self.waiting > 0


CHANNELS = [FutureChannel, CoroutineChannel]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


@pytest.mark.parametrize("channel_type", CHANNELS)
def test_a_disconnect_cancels_the_work_and_the_block_ends_quietly(channel_type: type) -> None:
    async def scenario() -> tuple[str, bool]:
        channel = channel_type()
        reached = "start"
        async with cancelled_on_disconnect(channel.receive):
            await asyncio.sleep(0)
            channel.deliver({"type": "http.request", "body": b"", "more_body": False})  # not a disconnect: keeps listening
            await asyncio.sleep(0.01)
            channel.deliver({"type": "http.disconnect"})
            reached = "waiting"
            await asyncio.sleep(5)
            reached = "never"
        return reached, asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    assert run(scenario()) == ("waiting", True)


@pytest.mark.parametrize("channel_type", CHANNELS)
def test_a_finished_block_stops_listening(channel_type: type) -> None:
    async def scenario() -> tuple[int, bool]:
        channel = channel_type()
        async with cancelled_on_disconnect(channel.receive):
            await asyncio.sleep(0.01)
            assert channel.pending()
            value = 42
        await asyncio.sleep(0.01)
        channel_still_listened = channel.pending()
        # A disconnect after the block must not cancel what runs next.
        if isinstance(channel, CoroutineChannel):
            channel.deliver({"type": "http.disconnect"})
        await asyncio.sleep(0.01)
        return value, channel_still_listened

    assert run(scenario()) == (42, False)


@pytest.mark.parametrize("channel_type", CHANNELS)
def test_client_gone_inside_is_swallowed_and_other_errors_are_not(channel_type: type) -> None:
    async def gone() -> str:
        async with cancelled_on_disconnect(channel_type().receive):
            raise ClientGone("broken pipe")
        return "quiet"

    async def failing() -> None:
        async with cancelled_on_disconnect(channel_type().receive):
            raise ValueError("a bug")

    assert run(gone()) == "quiet"
    with pytest.raises(ValueError, match="a bug"):
        run(failing())


@pytest.mark.parametrize("channel_type", CHANNELS)
def test_a_cancellation_from_elsewhere_goes_on(channel_type: type) -> None:
    async def scenario() -> str:
        async def inner() -> None:
            async with cancelled_on_disconnect(channel_type().receive):
                await asyncio.sleep(5)

        task = asyncio.create_task(inner())
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "swallowed"

    assert run(scenario()) == "cancelled"


def test_a_broken_receive_counts_as_a_disconnect() -> None:
    async def scenario() -> str:
        channel = FutureChannel()
        async with cancelled_on_disconnect(channel.receive):
            await asyncio.sleep(0)
            channel.calls[-1].set_exception(RuntimeError("transport closed"))
            await asyncio.sleep(5)
            return "never"
        return "ended"

    assert run(scenario()) == "ended"



# ---------------------------------------------------------------- read_body


def read(receive: Any, limit: int, declared: int | None, idle_s: float = 60.0) -> Any:
    return read_body(receive, limit, declared, StalledBodies(), idle_s)


def body_messages(pieces: list[bytes]) -> Any:
    """receive() delivering ``pieces`` as granian does: each but the last with more_body."""
    messages = [{"type": "http.request", "body": piece, "more_body": True} for piece in pieces]
    messages.append({"type": "http.request", "body": b"", "more_body": False})
    queue = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(queue)

    return receive


@st.composite
def delivered_bodies(draw: st.DrawFn) -> tuple[bytes, list[bytes], int | None]:
    """A body, the pieces it arrives in, and the length the client declared (maybe another)."""
    # Sizes around the point where the reader stops joining the pieces.
    size = draw(st.sampled_from([0, 1, 100, CHUNKED_MIN_BYTES - 1, CHUNKED_MIN_BYTES, 3 * CHUNKED_MIN_BYTES + 7]))
    seed = draw(st.binary(min_size=1, max_size=64))
    body = (seed * (size // len(seed) + 1))[:size]
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=6)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
    declared = draw(st.sampled_from([size, None, max(0, size - 5), size + 5]))
    return body, pieces, declared


@settings(max_examples=150, deadline=None)
@given(delivered_bodies())
def test_read_body_returns_exactly_the_bytes_that_arrived(case: tuple[bytes, list[bytes], int | None]) -> None:
    """Declared or not, right or wrong, the body read is the pieces joined: no byte lost, none invented.

    From CHUNKED_MIN_BYTES up it is the pieces themselves, not a copy.
    """
    body, pieces, declared = case
    got = run(read(body_messages(pieces), limit=1 << 30, declared=declared))
    if len(body) >= CHUNKED_MIN_BYTES:
        assert type(got) is Chunks
        assert all(kept is piece for kept, piece in zip(got.pieces, [p for p in pieces if p], strict=True))
        got = got.tobytes()
    else:
        assert type(got) is bytes
    assert got == body


def test_read_body_refuses_a_declared_length_over_the_limit_before_reading() -> None:
    async def never() -> dict[str, Any]:
        raise AssertionError("read a body it should have refused")

    with pytest.raises(GatewayError) as refused:
        run(read(never, limit=1000, declared=1001))
    assert refused.value.code == "request_too_large"


@pytest.mark.parametrize("declared", [None, 10])
def test_read_body_refuses_a_body_that_grows_over_the_limit(declared: int | None) -> None:
    with pytest.raises(GatewayError) as refused:
        run(read(body_messages([b"x" * 600, b"x" * 600]), limit=1000, declared=declared))
    assert refused.value.code == "request_too_large"


def test_a_body_cut_short_is_incomplete_body() -> None:
    """granian ends a body in broken chunked framing as if the client had left: the answer says what happened."""
    messages = iter([{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    with pytest.raises(GatewayError) as info:
        run(read(receive, limit=1000, declared=10))
    assert (info.value.code, info.value.status) == ("incomplete_body", 400)
    assert "after 3 bytes" in info.value.message and info.value.headers == {"Connection": "close"}


def paced(pieces: list[bytes], gaps_s: list[float]) -> Any:
    """receive() delivering ``pieces`` (the last ends the body), each after its gap; past them, nothing ever."""
    pending = list(zip(pieces, gaps_s, strict=True))

    async def receive() -> dict[str, Any]:
        if not pending:
            await asyncio.sleep(3600)
        piece, gap_s = pending.pop(0)
        await asyncio.sleep(gap_s)
        return {"type": "http.request", "body": piece, "more_body": bool(pending)}

    return receive


@pytest.mark.parametrize(
    ("pieces", "gaps_s"),
    [([b"{}"], [5.0]), ([b"{", b"}"], [0.0, 5.0]), ([b"{", b" ", b"}"], [0.1, 0.1, 5.0])],
    ids=["no-first-piece", "stalls-after-one", "stalls-after-two"],
)
def test_a_body_that_stops_arriving_is_408_within_the_idle_time(pieces: list[bytes], gaps_s: list[float]) -> None:
    """The wait for each piece, the first included, is bounded by idle_s (to within the sweep)."""
    started = time.monotonic()
    with pytest.raises(GatewayError) as refused:
        run(read(paced(pieces, gaps_s), limit=1000, declared=100, idle_s=0.3))
    waited_s = time.monotonic() - started
    assert refused.value.code == "request_timeout" and refused.value.status == 408
    assert "nothing for 0.3 s" in refused.value.message
    assert sum(gaps_s[:-1]) + 0.3 <= waited_s < sum(gaps_s[:-1]) + 0.3 + StalledBodies.SWEEP_S + 0.3


def test_a_slow_but_steady_body_is_read_whole() -> None:
    """idle_s bounds the gap between pieces, not the whole upload."""
    pieces = [b'{"a": ', b"1", b"2", b"}"]
    assert run(read(paced(pieces, [0.2] * 4), limit=1000, declared=None, idle_s=0.4)) == b'{"a": 12}'


def test_a_read_cancelled_from_outside_stays_cancelled() -> None:
    """A cancellation that is not the sweep's (the client left) is not turned into a 408."""
    stalls = StalledBodies()

    async def scenario() -> None:
        reading = asyncio.ensure_future(read_body(paced([b"{}"], [5.0]), 1000, None, stalls, 60.0))
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert not stalls._deadlines and not stalls._expired

    run(scenario())
