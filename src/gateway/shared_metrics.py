"""Every worker's counters in ``GET /metrics``, whichever worker of a ``gateway serve`` answers it.

With ``--workers N`` (N > 1) each worker counts in its own process, and a scrape
reaches one of them: alone, each scrape would show that worker's share, and a
counter would seem to fall and rise from one scrape to the next. So each worker
writes its counts, every ``PUBLISH_S``, to a file of its own in the run's shared
directory (``shared_slots.SHARED_DIR_ENV``), and the worker that answers a scrape
writes its own afresh and sums every file. Other workers' counts are at most
``PUBLISH_S`` old.

A worker that dies leaves its file, so the totals never go back; the worker
started in its place writes a new file (named by process id and a random tag, as
a process id can come back). The run's directory goes when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import msgspec

from gateway.metrics import Metrics, Sample
from gateway.shared_slots import SHARED_DIR_ENV

log = logging.getLogger("gateway.metrics")

DIR_NAME = "metrics"
PUBLISH_S = 1.0
_decode = msgspec.json.Decoder(list[tuple[str, list[tuple[str, str]], float]]).decode


class MetricsExchange:
    """One worker's side: publish its counters, and read every worker's."""

    def __init__(self, directory: Path, metrics: Metrics) -> None:
        self.directory = directory / DIR_NAME
        self.path = self.directory / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        self._metrics = metrics
        self._failing = False

    @classmethod
    def from_environment(cls, metrics: Metrics, environ: Mapping[str, str] = os.environ) -> MetricsExchange | None:
        """The exchange in the directory ``gateway serve`` made for its workers; None for a single process."""
        value = environ.get(SHARED_DIR_ENV)
        return cls(Path(value), metrics) if value else None

    def publish(self) -> None:
        self._write(self._metrics.samples())

    def _write(self, samples: list[Sample]) -> None:
        self.directory.mkdir(exist_ok=True)  # again, should a cleaner have taken it
        # Written aside and renamed, so a reader sees the old counts or the new, never half a file.
        staged = self.path.with_suffix(".part")
        staged.write_bytes(msgspec.json.encode(samples))
        os.replace(staged, self.path)

    def samples(self) -> Iterator[Sample]:
        """Every worker's counts, this one's as of now; this one's alone if the directory is unusable."""
        own = self._metrics.samples()
        try:
            self._write(own)
        except OSError as exc:
            log.warning("could not publish this worker's counters: %s", exc)
        yield from own
        for path in self.directory.glob("*.json"):
            if path == self.path:
                continue
            try:
                published = _decode(path.read_bytes())
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("skipped a worker's counters in %s: %s", path.name, exc)
                continue
            for name, labels, value in published:
                yield name, tuple(labels), value

    async def publish_periodically(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_S)
            try:
                self.publish()
            except OSError as exc:  # a full disk must not stop the worker, nor this loop, nor fill the log
                if not self._failing:
                    log.warning("could not publish this worker's counters (said once until it works again): %s", exc)
                self._failing = True
            else:
                self._failing = False

    @contextlib.asynccontextmanager
    async def publishing(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.publish_periodically())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(OSError):
                self.publish()  # the last counts, for the totals after this worker is gone
