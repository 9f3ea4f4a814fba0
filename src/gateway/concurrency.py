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
4. Limits are read from the serving config on every acquire, and each reload hands
   the new config to the gates (``follow``): a reload changes a gate's capacity in
   place, a raised one starts waiters at once, and calls in flight stay counted
   across it (with several workers, a lowered capacity counts the calls still
   holding slots above it).

Several workers (``gateway serve --workers N``) share each backend's slots
through a slot file (``gateway.shared_slots``): a slot is taken only when no
other worker holds it. Each worker keeps its own line, in arrival order, and
while it waits it looks at the file every ``SHARED_POLL_S``. A released slot is
not handed to the releasing worker's own line: it goes back to the file, for
whichever worker looks first, so no worker's line can keep the slots from
another's.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Protocol

from gateway.admission import NO_SLOT, Slot
from gateway.config.model import Backend, Config
from gateway.errors import GatewayError
from gateway.shared_slots import SlotDirectory
from gateway.snapshot import Target

DEFAULT_MAX_QUEUE = 16
DEFAULT_QUEUE_TIMEOUT_S = 30.0
# How much one finished call moves the estimate of how long a slot is held.
HOLD_SMOOTHING = 0.2
MAX_RETRY_AFTER_S = 60
# The least wait a refusal's retry-after-ms is spread around: a fast backend's hold time is
# milliseconds, which would bring the refused back before anything changed.
MIN_SPREAD_S = 0.25
# How often a worker whose line waits looks for a slot another worker gave back:
# small beside a GPU call's seconds, rare enough to cost nothing measurable.
SHARED_POLL_S = 0.005
# The slot number when the gate counts alone (no slot file).
UNSHARED = 0


class SharedSlots(Protocol):
    """Slots held across processes (``shared_slots.SlotFile``)."""

    def take(self, capacity: int, held: AbstractSet[int], reach: int = 0) -> int | None: ...

    def give_back(self, index: int) -> None: ...


class GateSlot:
    """One slot of a gate; released once, however many paths try."""

    def __init__(self, gate: Gate, index: int) -> None:
        self._gate = gate
        self._index = index
        self._started = time.monotonic()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._gate.release(self._index, time.monotonic() - self._started)


class Gate:
    """At most ``capacity`` holders at once; the rest wait in arrival order."""

    def __init__(self, capacity: int, shared: SharedSlots | None = None) -> None:
        self.capacity = capacity
        self.reach = capacity  # the highest capacity yet: slots up to it may still be held
        self.active = 0
        self.waiters: deque[asyncio.Future[int]] = deque()
        self.mean_hold_s = 1.0
        self._shared = shared
        self._held: set[int] = set()  # the shared slots this process holds
        self._poll: asyncio.TimerHandle | None = None

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self.reach = max(self.reach, capacity)
        self._hand_over()

    async def acquire(self, alias: str, max_queue: int, timeout_s: float, request_left_s: float = math.inf) -> Slot:
        """A slot, waiting in line up to ``timeout_s``, and never past the ``request_left_s`` its
        request has: a request whose time ran out in line must not reach the upstream."""
        if not self.waiters:
            index = self._take()
            if index is not None:
                return GateSlot(self, index)
        if len(self.waiters) >= max_queue:
            raise self._busy(alias, f"its queue of {max_queue} is full")
        turn: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.append(turn)
        self._poll_soon()
        try:
            async with asyncio.timeout(min(timeout_s, request_left_s)):
                index = await turn
        except TimeoutError:
            if not self._handed(turn):
                self._leave(turn)
                if timeout_s <= request_left_s:
                    raise self._busy(alias, f"no slot came free within {timeout_s:g} s") from None
                raise self._busy(alias, f"no slot came free in the {max(request_left_s, 0):.3g} s its request had left") from None
            index = turn.result()
        except asyncio.CancelledError:
            if self._handed(turn):
                self.release(turn.result(), None)  # handed a slot as the client left: pass it on
            else:
                self._leave(turn)
            raise
        return GateSlot(self, index)

    def release(self, index: int, held_s: float | None) -> None:
        self.active -= 1
        if held_s is not None:
            self.mean_hold_s += HOLD_SMOOTHING * (held_s - self.mean_hold_s)
        if self._shared is None:
            self._hand_over()
            return
        self._held.discard(index)
        self._shared.give_back(index)
        # No hand-over now: the next poll takes it, or another worker's does first.
        self._poll_soon()

    def wait_guess_s(self) -> float:
        """A guess at when a slot frees up for a newcomer: the line's length in slot-hold times."""
        rounds = (len(self.waiters) + 1) / max(1, self.capacity)
        return min(float(MAX_RETRY_AFTER_S), self.mean_hold_s * rounds)

    @staticmethod
    def _handed(turn: asyncio.Future[int]) -> bool:
        return turn.done() and not turn.cancelled()

    def _leave(self, turn: asyncio.Future[int]) -> None:
        try:
            self.waiters.remove(turn)
        except ValueError:
            pass  # already taken off the line
        # Leaving may unblock the next waiter when capacity grew meanwhile.
        self._hand_over()

    def _take(self) -> int | None:
        """A free slot for this process, counted as active; None when there is none."""
        if self.active >= self.capacity:
            return None
        index = UNSHARED
        if self._shared is not None:
            taken = self._shared.take(self.capacity, self._held, self.reach)
            if taken is None:
                return None
            index = taken
            self._held.add(index)
        self.active += 1
        return index

    def _hand_over(self) -> None:
        while self.waiters:
            if self.waiters[0].done():
                self.waiters.popleft()  # its waiter left already
                continue
            index = self._take()
            if index is None:
                break
            self.waiters.popleft().set_result(index)
        self._poll_soon()

    def _poll_soon(self) -> None:
        """While the line waits on shared slots, look again in ``SHARED_POLL_S``."""
        if self._shared is None or self._poll is not None or not self.waiters:
            return
        self._poll = asyncio.get_running_loop().call_later(SHARED_POLL_S, self._on_poll)

    def _on_poll(self) -> None:
        self._poll = None
        self._hand_over()

    def _busy(self, alias: str, why: str) -> GatewayError:
        guess_s = self.wait_guess_s()
        retry_after = max(1, math.ceil(guess_s))
        # Every client refused in one burst read the same whole seconds and came back together, to
        # be refused together again. retry-after-ms, which the openai SDKs read first, spreads them.
        spread_s = min(float(MAX_RETRY_AFTER_S), max(guess_s, MIN_SPREAD_S) * random.uniform(0.75, 1.25))
        spread_ms = max(1, round(spread_s * 1000))
        return GatewayError(
            "concurrency_limit_exceeded",
            f"Model '{alias}' is serving {self.capacity} requests at once and {why}. Retry after {retry_after} s.",
            headers={"retry-after": str(retry_after), "retry-after-ms": str(spread_ms)},
        )


class BackendGates:
    """The app's ``BackendSlots``: one gate per backend that declares ``max_concurrency``."""

    def __init__(self, config: Callable[[], Config | None], shared: SlotDirectory | None = None) -> None:
        self._config = config
        self._shared = shared
        self._gates: dict[str, Gate] = {}

    async def acquire(self, target: Target, request_left_s: float = math.inf) -> Slot:
        config = self._config()
        backend: Backend | None = config.backends.get(target.backend_name) if config is not None else None
        if backend is None or backend.max_concurrency is None:
            return NO_SLOT
        gate = self._gates.get(target.backend_name)
        if gate is None:
            slot_file = self._shared.for_backend(target.backend_name) if self._shared is not None else None
            gate = self._gates[target.backend_name] = Gate(backend.max_concurrency, slot_file)
        elif gate.capacity != backend.max_concurrency:
            gate.resize(backend.max_concurrency)
        max_queue = backend.max_queue if backend.max_queue is not None else DEFAULT_MAX_QUEUE
        timeout_s = backend.queue_timeout_s if backend.queue_timeout_s is not None else DEFAULT_QUEUE_TIMEOUT_S
        return await gate.acquire(target.alias, max_queue, timeout_s, request_left_s)

    def follow(self, config: Config) -> None:
        """A reload swapped ``config`` in: gates take its capacities at once, so a raised
        ``max_concurrency`` starts the calls waiting in line without waiting for a newcomer."""
        for name, gate in self._gates.items():
            backend = config.backends.get(name)
            if backend is not None and backend.max_concurrency is not None and backend.max_concurrency != gate.capacity:
                gate.resize(backend.max_concurrency)

    def gate(self, backend: str) -> Gate | None:
        """The gate of a backend, if it has one yet (for status pages and tests)."""
        return self._gates.get(backend)
