"""Per-minute counters shared by the worker processes of one ``gateway serve``, in a mapped file.

``[limits] storage = "memory"`` with ``gateway serve --workers N`` (N > 1): every
worker maps the same file from the run's private directory
(``shared_slots.SHARED_DIR_ENV``), so a key's rate is one budget on this machine,
as it is with Redis, without running Redis.

The counter is the ``limits`` library's sliding-window counter, the one its
memory and Redis storages keep: windows aligned to multiples of ``expiry``
seconds since the epoch, a count for the current window and one for the window
before it, the earlier one weighted by how much of it still overlaps the last
``expiry`` seconds. ``gateway.limits`` reads it through the same two calls.

Layout: ``STRIPES`` stripes of ``ENTRIES_PER_STRIPE`` entries. A key lives in
the stripe its digest names, at the first entry along its probe from the
digest's position that holds it, or is empty, or holds a key whose counts have
run out (two windows old, so reusing it loses nothing). Each stripe has its own
lock, byte ``i`` of the file (``fcntl.lockf``), held only while a few entries are
read and written: no ``await`` in between, so a worker never holds it across a
turn of its event loop, and a worker that dies holding it loses it to the kernel.
A stripe whose entries are all live answers ``StorageError``, which the admission
treats like an unreachable Redis: the request goes through and the log says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from limits.errors import StorageError

from gateway.shared_slots import map_table

# digest of the key, window number, count in that window, count in the window before it
ENTRY = struct.Struct("<16sqqq")
EMPTY_DIGEST = bytes(16)
STRIPES = 64
ENTRIES_PER_STRIPE = 256
TABLE_BYTES = STRIPES * ENTRIES_PER_STRIPE * ENTRY.size
FILE_NAME = "rates.table"


class SharedWindows:
    """Sliding-window counters in a file that every worker of the run maps."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME
        self._fd, self._table = map_table(self.path, TABLE_BYTES)

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self.window(key, expiry, time.time())

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.acquire(key, limit, expiry, amount, time.time())

    def release(self, key: str, expiry: int, amount: int, now: float) -> None:
        """Uncount ``amount`` from the key's current window (what a request refused after all took).

        Once that window has rolled over, the count is left to age out with it.
        """
        digest, stripe = _locate(key)
        number = math.floor(now / expiry)
        with self._locked(stripe):
            offset = self._find(stripe, digest, number)
            if offset is None:
                return
            held, window, current, previous = ENTRY.unpack_from(self._table, offset)
            if held == digest and window == number:
                ENTRY.pack_into(self._table, offset, digest, window, max(0, current - amount), previous)

    def window(self, key: str, expiry: int, now: float) -> tuple[int, float, int, float]:
        """(previous count, its weight × expiry, current count, seconds until the current count stops mattering)."""
        digest, stripe = _locate(key)
        number = math.floor(now / expiry)
        with self._locked(stripe):
            offset = self._find(stripe, digest, number)
            _, previous, current = self._counts(offset, digest, number) if offset is not None else (number, 0, 0)
        return previous, _previous_ttl(previous, expiry, now), current, (1 - ((now / expiry) % 1)) * expiry + expiry

    def acquire(self, key: str, limit: int, expiry: int, amount: int, now: float) -> bool:
        """Count ``amount`` if the weighted count stays within ``limit``; False (nothing counted) if not."""
        if amount > limit:
            return False
        digest, stripe = _locate(key)
        number = math.floor(now / expiry)
        with self._locked(stripe):
            offset = self._find(stripe, digest, number)
            if offset is None:
                raise StorageError(RuntimeError(f"the shared rate table's stripe {stripe} is full"))
            number, previous, current = self._counts(offset, digest, number)
            if math.floor(previous * _previous_ttl(previous, expiry, now) / expiry + current) + amount > limit:
                return False
            ENTRY.pack_into(self._table, offset, digest, number, current + amount, previous)
        return True

    def close(self) -> None:
        self._table.close()
        os.close(self._fd)

    @contextmanager
    def _locked(self, stripe: int) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, stripe, os.SEEK_SET)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, stripe, os.SEEK_SET)

    def _find(self, stripe: int, digest: bytes, number: int) -> int | None:
        """The offset of the key's entry, or of the entry it may take; None when the stripe has no room."""
        base = stripe * ENTRIES_PER_STRIPE
        start = int.from_bytes(digest[4:8], "little") % ENTRIES_PER_STRIPE
        reusable: int | None = None
        for step in range(ENTRIES_PER_STRIPE):
            offset = (base + (start + step) % ENTRIES_PER_STRIPE) * ENTRY.size
            held, window, _, _ = ENTRY.unpack_from(self._table, offset)
            if held == digest:
                return offset
            if held == EMPTY_DIGEST:
                # Entries are never emptied, so the key is not further along.
                return reusable if reusable is not None else offset
            if reusable is None and window < number - 1:
                reusable = offset
        return reusable

    def _counts(self, offset: int, digest: bytes, number: int) -> tuple[int, int, int]:
        """(window, previous count, current count) of the key as of window ``number``; zeros for another key's entry.

        A window later than ``number`` (another worker read the clock a moment later) is taken as it is.
        """
        held, window, current, previous = ENTRY.unpack_from(self._table, offset)
        if held != digest or window < number - 1:
            return number, 0, 0
        if window == number - 1:
            return number, current, 0
        return window, previous, current


def _locate(key: str) -> tuple[bytes, int]:
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return digest, digest[0] % STRIPES


def _previous_ttl(previous: int, expiry: int, now: float) -> float:
    # The share of the previous window that still overlaps the last `expiry` seconds, × expiry (as limits computes it).
    return 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
