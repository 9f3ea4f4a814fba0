"""A backend's ``max_concurrency`` slots, shared by the worker processes of one ``gateway serve``.

``gateway serve --workers N`` makes a directory private to the run and names it
in ``GATEWAY_SHARED_DIR``. Each gated backend has a file there, and slot ``i`` is
the lock on byte ``i`` of that file: a worker holds a slot by holding that lock.

Why byte-range locks (``fcntl.lockf``):
- The kernel keeps them, so a worker that crashes or is killed gives its slots
  back at once: no coordinator process, no cleanup, no slot lost for good.
- Taking a free slot is one non-blocking system call per byte tried, and only
  backends that set ``max_concurrency`` pay it.

POSIX locks belong to the process, not to the file descriptor:
- A process that locks a byte it already holds succeeds again. So the caller
  passes the slots its process holds, and they are never tried.
- A process that closes any descriptor of the file loses all its locks on it.
  So each file is opened once per process and stays open.

A slot file that cannot be opened or locked (its directory removed under the
running gateway, say) is logged once; that backend is then counted per worker,
as without the directory: a broken counter never stops the traffic.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

log = logging.getLogger("gateway.concurrency")

# The run's directory that its workers share: these slot files, the rate table (``shared_windows``),
# the health table (``shared_health``) and the workers' counters (``shared_metrics``).
SHARED_DIR_ENV = "GATEWAY_SHARED_DIR"
# What a non-blocking lock attempt raises when another process holds the byte.
HELD_ELSEWHERE = {errno.EACCES, errno.EAGAIN}
# What a try to lock one slot finds.
TAKEN, HELD, BROKEN = "taken", "held", "broken"


def map_table(path: Path, size: int) -> tuple[int, mmap.mmap]:
    """The file at ``path`` in the run's directory, made ``size`` bytes if smaller, opened and mapped."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # Every worker sizes the file the same way: a second ftruncate to the same size changes nothing.
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except OSError:
        os.close(fd)
        raise


class SlotFile:
    """One backend's slots: byte ``i`` of the file, locked by the process that holds slot ``i``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._warned = False

    def take(self, capacity: int, held: AbstractSet[int], reach: int = 0) -> int | None:
        """Lock the first slot below ``capacity`` that no process holds; None when all are held.

        ``held``: the slots this process holds already (locking them again would succeed).
        ``reach``: the highest capacity this backend has had. After a reload lowered it, slots
        above the new capacity may still be held by calls begun before: they count too, so
        nothing new starts until fewer than ``capacity`` calls are in flight in all.
        """
        if reach > capacity:
            return self._take_counting(capacity, held, reach)
        for index in range(capacity):
            if index not in held and self._lock(index) is not HELD:
                return index  # taken, or broken: then counted in this worker only, as if unshared
        return None

    def _take_counting(self, capacity: int, held: AbstractSet[int], reach: int) -> int | None:
        in_flight = len(held)
        free: int | None = None
        for index in range(reach):
            if index in held:
                continue
            state = self._lock(index)
            if state is HELD:
                in_flight += 1
            elif state is BROKEN:
                return index if index < capacity else None
            elif free is None and index < capacity:
                free = index  # kept locked: the one to take, if the count allows
            else:
                self.give_back(index)  # only looked at
        if free is not None and in_flight >= capacity:
            self.give_back(free)
            return None
        return free

    def _lock(self, index: int) -> str:
        """Try to lock slot ``index``: TAKEN, HELD (by another process) or BROKEN (the file failed)."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in HELD_ELSEWHERE:
                return HELD
            self._warn(exc)
            return BROKEN
        return TAKEN

    def give_back(self, index: int) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, index, os.SEEK_SET)
        except OSError as exc:
            self._warn(exc)

    def close(self) -> None:
        os.close(self._fd)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("concurrency slots: %s failed (%s); counting this backend in this worker only", self.path.name, exc.strerror)


class SlotDirectory:
    """The run's directory of slot files, one per backend, each opened once on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, SlotFile | None] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SlotDirectory | None:
        """The directory ``gateway serve`` made for its workers; None for a single process."""
        value = environ.get(SHARED_DIR_ENV)
        return cls(Path(value)) if value else None

    def for_backend(self, name: str) -> SlotFile | None:
        if name in self._files:
            return self._files[name]
        # Backend names are free text: the file is named by a digest of the name.
        path = self.path / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.slots"
        try:
            slot_file: SlotFile | None = SlotFile(path)
        except OSError as exc:
            log.warning("concurrency slots: cannot open the file for backend %r (%s); counting it in this worker only", name, exc.strerror)
            slot_file = None
        self._files[name] = slot_file
        return slot_file

    def close(self) -> None:
        for slot_file in self._files.values():
            if slot_file is not None:
                slot_file.close()
        self._files.clear()
