"""Per-minute counters of requests and tokens, kept by the ``limits`` library.

The counting is the library's sliding-window counter (two fixed windows, the
previous one weighted by how much of it still overlaps the last minute): cheap
for token counts in the thousands, where a moving window would store one entry
per token. Its storage is ``RedisStorage`` (every worker and machine pointing at
one Redis shares one budget), or, for ``memory``: the file the workers of one
``gateway serve --workers N`` share (``gateway.shared_windows``, the same counter),
or the library's ``MemoryStorage`` in a single process. Only this module and
``shared_windows`` import ``limits``; only this one imports ``redis``.

What the admission needs from a counter, and nothing more:
- ``window(rate)``: how much of a rate the last minute used (to refuse early and
  to say how long to wait);
- ``take(rate, cost)``: consume ``cost`` only if it fits, atomically in the storage;
- ``add(rate, cost)``: count ``cost`` whatever the limit (tokens an answer used
  beyond the estimate taken up front).
The arithmetic of waits and resets is pure and lives in ``Window``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.errors import StorageError

from gateway.shared_slots import SHARED_DIR_ENV
from gateway.shared_windows import SharedWindows

log = logging.getLogger("gateway.limits")

WINDOW_S = 60
KEY_PREFIX = "dgx-gateway"
# Large enough never to refuse, small enough to stay exact in Redis' Lua doubles.
NO_LIMIT = 2**50
REDIS_TIMEOUT_S = 1.0
# A wait ends this far past the moment the cost would fit exactly (where it does not yet).
_PAST_S = 1e-3

Unit = Literal["requests", "tokens"]

# What a broken or unreachable storage raises (the admission then lets requests through).
STORAGE_ERRORS: tuple[type[BaseException], ...] = (StorageError, OSError, TimeoutError)


class WindowStorage(Protocol):
    """The two calls of a ``limits`` storage that the sliding-window counter makes."""

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]: ...

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool: ...


@attrs.frozen
class Rate:
    """One per-minute limit that applies to a request: what is counted, for whom, how many."""

    unit: Unit
    scope: str          # "key" or "alias"
    name: str           # the key's name or the alias; never a key or a hash
    per_minute: int

    @property
    def item(self) -> RateLimitItem:
        # The amount is part of the library's storage key: counters carry over a
        # reload that keeps the limit, and start afresh when the limit changes.
        return RateLimitItemPerMinute(self.per_minute, namespace=f"{self.unit}")

    @property
    def identifiers(self) -> tuple[str, str]:
        return (self.scope, self.name)

    @property
    def storage_key(self) -> str:
        return self.item.key_for(*self.identifiers)


@attrs.frozen
class Window:
    """A sliding-window counter as the storage reports it (times in seconds from now)."""

    previous_count: int
    previous_ttl_s: float   # time left in the current window: the previous count's weight × 60 s
    current_count: int
    current_ttl_s: float    # end of the current window + 60 s (when its count stops mattering)

    def used(self) -> float:
        return self.previous_count * self.previous_ttl_s / WINDOW_S + self.current_count

    def remaining(self, limit: int) -> int:
        return max(0, limit - math.floor(self.used()))

    def wait_s(self, limit: int, cost: int) -> float:
        """How long until ``cost`` more fits under ``limit`` (0: it fits now)."""
        room = limit - min(cost, limit)
        if math.floor(self.used()) <= room:
            return 0.0
        # The counter takes while floor(used) <= room, that is while used < room + 1: the wait ends
        # when used falls below room + 1 (just past it: at it exactly, the cost does not fit yet).
        below = room + 1
        if self.current_count < below and self.previous_count:
            # The previous window's share fades linearly; wait until it has faded enough.
            return max(0.0, self.previous_ttl_s - (below - self.current_count) * WINDOW_S / self.previous_count) + _PAST_S
        # This window alone is too full: wait for it to become the previous one, then fade.
        window_end_s = self.current_ttl_s - WINDOW_S if self.current_ttl_s > WINDOW_S else self.previous_ttl_s
        return max(0.0, window_end_s) + WINDOW_S * (1 - below / self.current_count) + _PAST_S

    def reset_s(self) -> float:
        """How long until the counter is back to its initial state (nothing counted)."""
        if self.current_count:
            return max(0.0, self.current_ttl_s)
        return max(0.0, self.previous_ttl_s) if self.previous_count else 0.0


def storage_label(url: str) -> str:
    """The storage URL without credentials, for logs."""
    if url == "memory":
        return url
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RateCounter:
    """One storage (memory, or Redis at a URL) and the sliding-window counter over it."""

    def __init__(self, url: str, environ: Mapping[str, str] = os.environ) -> None:
        self.url = url
        self._pool: Any = None
        # The client library's own errors, re-raised as StorageError (empty: catches nothing).
        self._native_errors: tuple[type[Exception], ...] = ()
        self._storage: WindowStorage
        if url == "memory":
            # The workers of one `gateway serve` count in one shared file; a single process in its own memory.
            shared = _shared_windows(environ)
            self._storage = shared if shared is not None else MemoryStorage()
        else:
            # Imported only when a Redis URL is configured: it costs each worker ~5 MiB.
            import redis.asyncio

            # Not only redis.RedisError: a connection the server closes under a command can surface
            # as the event loop's RuntimeError ("unable to perform operation on ... closed").
            self._native_errors = (Exception,)
            # Our own pool: bounded timeouts, and a handle to close at shutdown.
            self._pool = redis.asyncio.ConnectionPool.from_url(
                url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            self._storage = RedisStorage(
                f"async+{url}",
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=KEY_PREFIX,
                connection_pool=self._pool,  # typed as scalars, documented as passed on
            )

    async def window(self, rate: Rate) -> Window:
        try:
            previous, previous_ttl, current, current_ttl = await self._storage.get_sliding_window(rate.storage_key, WINDOW_S)
        except self._native_errors as exc:
            raise StorageError(exc) from exc
        return Window(int(previous), float(previous_ttl), int(current), float(current_ttl))

    async def take(self, rate: Rate, cost: int) -> bool:
        try:
            # What the library's SlidingWindowCounterRateLimiter.hit does, minus its indirection.
            return await self._storage.acquire_sliding_window_entry(
                rate.storage_key, rate.per_minute, WINDOW_S, max(1, min(cost, rate.per_minute))
            )
        except self._native_errors as exc:
            raise StorageError(exc) from exc

    async def give_back(self, rate: Rate, cost: int) -> None:
        """Uncount what ``take`` counted, for a request refused after all (by another rate, or for
        want of a backend slot): a refusal must not use up the budget of the rates it passed.

        What was taken in a window that has rolled over since is left to age out (Redis: its
        fresh window is lowered instead, letting that much more through once).
        """
        amount = max(1, min(cost, rate.per_minute))
        storage = self._storage
        try:
            if isinstance(storage, SharedWindows):
                storage.release(rate.storage_key, WINDOW_S, amount, time.time())
            elif isinstance(storage, MemoryStorage):
                _, current = storage.sliding_window_keys(rate.storage_key, WINDOW_S, time.time())
                await storage.decr(current, amount)
            elif isinstance(storage, RedisStorage):
                await storage.incr(storage._current_window_key(rate.storage_key), 2 * WINDOW_S, amount=-amount)
        except self._native_errors as exc:
            raise StorageError(exc) from exc

    async def add(self, rate: Rate, cost: int) -> None:
        if cost > 0:
            try:
                await self._storage.acquire_sliding_window_entry(rate.storage_key, NO_LIMIT, WINDOW_S, cost)
            except self._native_errors as exc:
                raise StorageError(exc) from exc

    async def aclose(self) -> None:
        if self._pool is not None:
            try:
                await self._pool.disconnect()
            except self._native_errors as exc:
                raise StorageError(exc) from exc


# One mapping of the run's table per process, kept for the process's life: a counter
# that a storage switch retired may still settle a late answer's tokens into it.
_mapped: dict[str, SharedWindows] = {}


def _shared_windows(environ: Mapping[str, str]) -> SharedWindows | None:
    run_dir = environ.get(SHARED_DIR_ENV)
    if not run_dir:
        return None
    if run_dir not in _mapped:
        try:
            _mapped[run_dir] = SharedWindows(Path(run_dir))
        except OSError as exc:
            log.warning("rate counts: cannot map the workers' shared table (%s); this worker counts on its own", exc.strerror)
            return None
    return _mapped[run_dir]


def format_duration(seconds: float) -> str:
    """Durations as OpenAI's ``x-ratelimit-reset-*`` headers write them: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"
