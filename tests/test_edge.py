"""The disconnect watch of the completion endpoints (api.edge.cancelled_on_disconnect), both ways it listens.

granian's ``receive()`` returns a future (watched by a callback); other servers'
return coroutines (watched by a task). Both must behave the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.api.edge import ClientGone, cancelled_on_disconnect


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
