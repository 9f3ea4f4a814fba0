"""Concurrency per backend: ``max_concurrency`` calls at once, the next ones wait in line.

How it works:
1. Each backend whose entry sets ``max_concurrency`` gets a ``Gate``: a count of
   calls in flight and a FIFO line of waiters.
2. ``acquire``: a free slot and nobody waiting → go now. Otherwise join the line
   if it holds fewer than ``max_queue``, and wait up to ``queue_timeout_s``; a full
   line or a wait that runs out is 429 ``concurrency_limit_exceeded`` with a
   ``Retry-After`` estimated from how long slots have been held lately.
3. ``release`` hands the slot straight to the first waiter, so a newcomer never
   overtakes the line. A waiter whose client leaves drops out of the line; one
   that was handed a slot just as it left passes the slot on.
4. Limits are read from the serving config on every acquire: a reload changes a
   gate's capacity in place, and calls in flight stay counted across it.
Gates live in one worker process: with several granian workers, each worker
admits ``max_concurrency`` on its own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from gateway.admission import NO_SLOT, Slot
from gateway.config.model import Backend, Config
from gateway.errors import GatewayError
from gateway.snapshot import Target

DEFAULT_MAX_QUEUE = 16
DEFAULT_QUEUE_TIMEOUT_S = 30.0
# How much one finished call moves the estimate of how long a slot is held.
HOLD_SMOOTHING = 0.2
MAX_RETRY_AFTER_S = 60


class GateSlot:
    """One slot of a gate; released once, however many paths try."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._started = time.monotonic()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._gate.release(time.monotonic() - self._started)


class Gate:
    """At most ``capacity`` holders at once; the rest wait in arrival order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.mean_hold_s = 1.0

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._hand_over()

    async def acquire(self, alias: str, max_queue: int, timeout_s: float) -> Slot:
        if self.active < self.capacity and not self.waiters:
            self.active += 1
            return GateSlot(self)
        if len(self.waiters) >= max_queue:
            raise self._busy(alias, f"its queue of {max_queue} is full")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(turn)
        try:
            async with asyncio.timeout(timeout_s):
                await turn
        except TimeoutError:
            if not self._handed(turn):
                self._leave(turn)
                raise self._busy(alias, f"no slot came free within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            if self._handed(turn):
                self.release(None)  # handed a slot as the client left: pass it on
            else:
                self._leave(turn)
            raise
        return GateSlot(self)

    def release(self, held_s: float | None) -> None:
        self.active -= 1
        if held_s is not None:
            self.mean_hold_s += HOLD_SMOOTHING * (held_s - self.mean_hold_s)
        self._hand_over()

    def retry_after_s(self) -> int:
        """A guess at when a slot frees up for a newcomer: the line's length in slot-hold times."""
        rounds = (len(self.waiters) + 1) / max(1, self.capacity)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.mean_hold_s * rounds)))

    @staticmethod
    def _handed(turn: asyncio.Future[None]) -> bool:
        return turn.done() and not turn.cancelled()

    def _leave(self, turn: asyncio.Future[None]) -> None:
        try:
            self.waiters.remove(turn)
        except ValueError:
            pass  # already taken off the line
        # Leaving may unblock the next waiter when capacity grew meanwhile.
        self._hand_over()

    def _hand_over(self) -> None:
        while self.waiters and self.active < self.capacity:
            turn = self.waiters.popleft()
            if turn.done():
                continue  # its waiter left already
            self.active += 1
            turn.set_result(None)

    def _busy(self, alias: str, why: str) -> GatewayError:
        retry_after = self.retry_after_s()
        return GatewayError(
            "concurrency_limit_exceeded",
            f"Model '{alias}' is serving {self.capacity} requests at once and {why}. Retry after {retry_after} s.",
            headers={"retry-after": str(retry_after)},
        )


class BackendGates:
    """The app's ``BackendSlots``: one gate per backend that declares ``max_concurrency``."""

    def __init__(self, config: Callable[[], Config | None]) -> None:
        self._config = config
        self._gates: dict[str, Gate] = {}

    async def acquire(self, target: Target) -> Slot:
        config = self._config()
        backend: Backend | None = config.backends.get(target.backend_name) if config is not None else None
        if backend is None or backend.max_concurrency is None:
            return NO_SLOT
        gate = self._gates.get(target.backend_name)
        if gate is None:
            gate = self._gates[target.backend_name] = Gate(backend.max_concurrency)
        elif gate.capacity != backend.max_concurrency:
            gate.resize(backend.max_concurrency)
        max_queue = backend.max_queue if backend.max_queue is not None else DEFAULT_MAX_QUEUE
        timeout_s = backend.queue_timeout_s if backend.queue_timeout_s is not None else DEFAULT_QUEUE_TIMEOUT_S
        return await gate.acquire(target.alias, max_queue, timeout_s)

    def gate(self, backend: str) -> Gate | None:
        """The gate of a backend, if it has one yet (for status pages and tests)."""
        return self._gates.get(backend)
