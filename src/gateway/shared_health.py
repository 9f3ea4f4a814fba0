"""Target health shared by the worker processes of one ``gateway serve``, in a mapped file.

With ``--workers N`` (N > 1) each worker would otherwise learn on its own that a
target is down: N times the failed calls before it is skipped, and N probes per
cooldown instead of one. This store keeps ``gateway.health``'s per-target state
in a table that every worker maps from the run's private directory
(``shared_slots.SHARED_DIR_ENV``), beside the rate table (``shared_windows``).

Layout: ``ENTRIES`` entries. A target lives at the first entry along its probe
from its digest's position that holds it or is empty; entries are never freed
(a run meets a few targets per alias it ever served, and only a target that
failed is given one: an edit of a backend's connection adds entries for its
targets only once they fail). The key's text (backend, model, fingerprint, cut
at 128 bytes) is kept in the entry, so that any worker's status can name a target
another worker cooled; lookups go by the digest of the whole key, never the text.

Reads (``peek``) take no lock: the board reads to decide whether there is
anything to do, which for a healthy target there is not, and then changes the
state under the lock, reading it again there. A change holds the lock on byte 0
of the file (``fcntl.lockf``) while one entry is read and written: no ``await``
in between, and a worker that dies holding it loses it to the kernel. A full
table, or a file that cannot be mapped, leaves the targets it cannot hold to this
worker's memory, as without the directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from gateway.health import LocalHealth, TargetHealth, TargetKey
from gateway.shared_slots import SHARED_DIR_ENV, map_table

log = logging.getLogger("gateway.health")

# digest of the key, consecutive failures, cooled until, probe until, failures, cooldowns, probe's pid, key text, last error
ENTRY = struct.Struct("<16sqddqqq128s256s")
# What a peek reads: the numbers only, no text to decode on every request.
NUMBERS = struct.Struct("<16sqddqqq")
EMPTY_DIGEST = bytes(16)
ENTRIES = 1024
TABLE_BYTES = ENTRIES * ENTRY.size
FILE_NAME = "health.table"
_SEPARATOR = "\0"


def _digest(key: TargetKey) -> bytes:
    return hashlib.blake2b(_SEPARATOR.join(key).encode(), digest_size=16).digest()


def _text(value: str, size: int) -> bytes:
    data = value.encode()[:size]
    return data.decode(errors="ignore").encode()  # never half a character


class SharedHealth:
    """``gateway.health``'s store in a table every worker of the run maps."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME
        self._fd, self._table = map_table(self.path, TABLE_BYTES)
        self._offsets: dict[TargetKey, int] = {}
        self._digests: dict[TargetKey, bytes] = {}
        self._overflow = LocalHealth()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SharedHealth | None:
        """The table in the directory ``gateway serve`` made for its workers; None for a single process."""
        value = environ.get(SHARED_DIR_ENV)
        if not value:
            return None
        try:
            return cls(Path(value))
        except OSError as exc:
            log.warning("target health: cannot map the workers' shared table (%s); this worker keeps its own", exc.strerror)
            return None

    def close(self) -> None:
        self._table.close()
        os.close(self._fd)

    def peek(self, key: TargetKey) -> TargetHealth | None:
        offset = self._find(key, claim=False)
        if offset is None:
            return self._overflow.peek(key)
        _, failures, cooled, probe, total, cooldowns, pid = NUMBERS.unpack_from(self._table, offset)
        return TargetHealth(failures, cooled, probe, None, total, cooldowns, pid)

    def read(self, key: TargetKey) -> TargetHealth | None:
        offset = self._find(key, claim=False)
        if offset is None:
            return self._overflow.read(key)
        return self._read(offset)[1]

    @contextmanager
    def change(self, key: TargetKey) -> Iterator[TargetHealth]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
        try:
            offset = self._find(key, claim=True)
            if offset is None:
                with self._overflow.change(key) as health:
                    yield health
                return
            _, health = self._read(offset)
            yield health
            self._write(offset, key, health)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)

    def items(self) -> Iterable[tuple[TargetKey, TargetHealth]]:
        found: dict[TargetKey, TargetHealth] = dict(self._overflow.items())
        for index in range(ENTRIES):
            key, health = self._read(index * ENTRY.size)
            if key is not None:
                found[key] = health
        return list(found.items())

    def _find(self, key: TargetKey, *, claim: bool) -> int | None:
        """Where ``key``'s entry is; with ``claim`` (the lock held), an empty entry made its own."""
        offset = self._offsets.get(key)
        if offset is not None:
            return offset
        digest = self._digests.get(key)
        if digest is None:
            digest = self._digests[key] = _digest(key)
        start = int.from_bytes(digest[:4], "little") % ENTRIES
        for step in range(ENTRIES):
            offset = (start + step) % ENTRIES * ENTRY.size
            held = self._table[offset:offset + 16]
            if held == digest:
                self._offsets[key] = offset
                return offset
            if held == EMPTY_DIGEST:
                if not claim:
                    return None
                self._write(offset, key, TargetHealth())
                self._offsets[key] = offset
                return offset
        if claim:
            log.warning("target health: the workers' shared table is full; %s/%s is kept in this worker", key[0], key[1])
        return None

    def _read(self, offset: int) -> tuple[TargetKey | None, TargetHealth]:
        digest, failures, cooled, probe, total, cooldowns, pid, key_text, error = ENTRY.unpack_from(self._table, offset)
        if digest == EMPTY_DIGEST:
            return None, TargetHealth()
        backend, _, rest = key_text.rstrip(b"\0").decode(errors="replace").partition(_SEPARATOR)
        model, _, fingerprint = rest.partition(_SEPARATOR)
        last_error = error.rstrip(b"\0").decode(errors="replace") or None
        return (backend, model, fingerprint), TargetHealth(failures, cooled, probe, last_error, total, cooldowns, pid)

    def _write(self, offset: int, key: TargetKey, health: TargetHealth) -> None:
        # Only ever after ``_find`` placed the key, which kept its digest.
        ENTRY.pack_into(
            self._table, offset, self._digests[key], health.failures, health.cooled_until, health.probe_until,
            health.total_failures, health.cooldowns, health.probe_pid, _text(_SEPARATOR.join(key), 128), _text(health.last_error or "", 256),
        )
