"""Per-target health: consecutive failures, cooldowns and probes (SPEC §6).

A target is a (backend, upstream model) pair, so one failing model does not cool
down its whole backend, and its health is keyed by that pair *and* a fingerprint
of where its calls go (``Target.key``: base URL, key, headers). The board lives
for the whole process, across reloads: a reload that leaves a target's connection
alone keeps its state (a failing target stays cooled whatever else was edited),
while one that changes it (an operator fixing a wrong ``base_url`` or key) makes a
new upstream, which starts healthy instead of waiting out the old one's cooldown.
Nothing has to be forgotten at the swap, so workers that reload a moment apart
never reset each other's state: an old and a new configuration count apart.

1. Each failed call counts; ``cooldown_failures`` failures in a row cool the
   target down for ``cooldown_s``: the dispatcher skips it without a call. An
   upstream that asked for a pause (``Retry-After``) the plan did not wait out
   cools its target down at once, for that long (at most ``cooldown_s``).
2. When the cooldown is over, the next request is let through as the probe;
   others keep skipping the target while the probe runs, so a dead target gets
   one call per cooldown, never a burst.
3. The probe's answer decides: a success (any answer that shows the target is up,
   even a refusal of the request) clears the target; a failure cools it again.
   A probe that ends without a verdict (the client left) frees the probe slot, a
   probe whose worker died (killed, crashed) is taken over by the next request,
   and a probe that never reports is forgotten after its window, so a target
   cannot stay skipped forever.

Where the state lives is the board's ``store``: this process's memory, or with
``gateway serve --workers N`` a table every worker maps (``shared_health``), so
the workers count one target's failures together, skip it together and send it
one probe between them. Successes are counted per worker: a success on a
healthy target then costs no write to the table.

The report (``GET /v1/gateway/status``) shows the targets the serving
configuration calls, when the board is told which (``serving_keys``): the state
of a connection a reload replaced is kept but no longer shown, so the old URL's
error does not linger beside the new one. Rows never show the fingerprint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import attrs

# (backend, upstream model, connection fingerprint): see ``gateway.snapshot.Target.key``.
TargetKey = tuple[str, str, str]


@attrs.define
class TargetHealth:
    failures: int = 0               # consecutive
    cooled_until: float = 0.0       # monotonic (one clock for every process); 0: not cooled
    probe_until: float = 0.0        # monotonic end of the running probe's window; 0: no probe
    last_error: str | None = None
    total_failures: int = 0
    cooldowns: int = 0
    probe_pid: int = 0              # the process running the probe


class HealthStore(Protocol):
    def peek(self, key: TargetKey) -> TargetHealth | None:
        """The target's state as last written (its last error may be left out), or None if it has none;
        read without waiting for writers, to decide whether there is anything to change."""

    def read(self, key: TargetKey) -> TargetHealth | None:
        """The target's whole state (its last error too), or None if it has none; for the report."""

    def change(self, key: TargetKey) -> AbstractContextManager[TargetHealth]:
        """The target's state to change; written back at the end, no other change in between."""

    def items(self) -> Iterable[tuple[TargetKey, TargetHealth]]: ...


class LocalHealth:
    """The state in this process's memory."""

    def __init__(self) -> None:
        self._targets: dict[TargetKey, TargetHealth] = {}

    def peek(self, key: TargetKey) -> TargetHealth | None:
        return self._targets.get(key)

    def read(self, key: TargetKey) -> TargetHealth | None:
        return self._targets.get(key)

    @contextmanager
    def change(self, key: TargetKey) -> Iterator[TargetHealth]:
        health = self._targets.get(key)
        if health is None:
            health = self._targets[key] = TargetHealth()
        yield health

    def items(self) -> Iterable[tuple[TargetKey, TargetHealth]]:
        return list(self._targets.items())


def _probing(health: TargetHealth, now: float) -> bool:
    """Whether a probe is running: taken, within its window, by a process that is still there."""
    return now < health.probe_until and not _gone(health.probe_pid)


def _gone(pid: int) -> bool:
    """Whether the process ``pid`` has died: a worker killed during its probe never reports, and the
    other workers would skip the target for the probe's whole window (the alias's timeout_s)."""
    if pid in (0, os.getpid()):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Killed but not yet reaped by granian, a worker is a zombie: still there to kill(pid, 0).
            return stat.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class HealthBoard:
    def __init__(
        self, store: HealthStore | None = None, serving_keys: Callable[[], Collection[TargetKey] | None] | None = None
    ) -> None:
        """``serving_keys``: the keys of the targets the serving configuration calls (None while
        nothing serves); read only by ``report``. Without it the report shows every target known."""
        self._store: HealthStore = store or LocalHealth()
        self._successes: dict[TargetKey, int] = {}
        self._serving_keys = serving_keys

    def admit(self, key: TargetKey, probe_window_s: float, now: float | None = None) -> float:
        """0 when the target may be called now, else the seconds it stays skipped.

        After a cooldown the caller admitted becomes the probe for ``probe_window_s``.
        """
        seen = self._store.peek(key)
        if seen is None or seen.cooled_until == 0.0:
            return 0.0
        with self._store.change(key) as health:
            if health.cooled_until == 0.0:
                return 0.0
            now = time.monotonic() if now is None else now
            if now < health.cooled_until:
                return health.cooled_until - now
            if _probing(health, now):
                return health.probe_until - now
            health.probe_until, health.probe_pid = now + probe_window_s, os.getpid()
            return 0.0

    def cooling_for(self, key: TargetKey, now: float | None = None) -> float:
        """Seconds before the target may be called again (0 when it may), without admitting anyone."""
        health = self._store.peek(key)
        if health is None or health.cooled_until == 0.0:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(health.cooled_until - now, health.probe_until - now if _probing(health, now) else 0.0, 0.0)

    def succeeded(self, key: TargetKey) -> None:
        self._successes[key] = self._successes.get(key, 0) + 1
        seen = self._store.peek(key)
        if seen is not None and (seen.failures or seen.cooled_until or seen.probe_until):
            with self._store.change(key) as health:
                health.failures = 0
                health.cooled_until = health.probe_until = 0.0

    def failed(self, key: TargetKey, reason: str, *, failures_to_cool: int, cooldown_s: float) -> None:
        with self._store.change(key) as health:
            health.failures += 1
            health.total_failures += 1
            health.last_error = reason
            health.probe_until = 0.0
            if health.failures >= failures_to_cool:
                self._cool(health, cooldown_s)

    def pause(self, key: TargetKey, reason: str, pause_s: float) -> None:
        """The upstream asked not to be called for ``pause_s``: cool it down at once."""
        with self._store.change(key) as health:
            health.last_error = reason
            health.probe_until = 0.0
            self._cool(health, pause_s)

    def released(self, key: TargetKey) -> None:
        """A call ended without a verdict on the target (the client left): free the probe slot."""
        seen = self._store.peek(key)
        if seen is not None and seen.probe_until:
            with self._store.change(key) as health:
                health.probe_until = 0.0

    @staticmethod
    def _cool(health: TargetHealth, cooldown_s: float) -> None:
        until = time.monotonic() + cooldown_s
        if until > health.cooled_until:
            health.cooled_until = until
            health.cooldowns += 1

    def _known(self) -> dict[TargetKey, TargetHealth]:
        """The targets to report: those serving (each read by its key, so a name cut short in the
        shared table still matches), or without that list every one with a state or a success."""
        serving = self._serving_keys() if self._serving_keys is not None else None
        if serving is None:
            states = dict(self._store.items())
            for key in self._successes.keys() - states.keys():
                states[key] = TargetHealth()
            return states
        states = {}
        for key in serving:
            health = self._store.read(key)
            if health is not None:
                states[key] = health
            elif key in self._successes:
                states[key] = TargetHealth()
        return states

    def report(self) -> Iterator[dict[str, object]]:
        now = time.monotonic()
        for key, health in sorted(self._known().items()):
            backend, model = key[0], key[1]  # never the fingerprint: it is derived from the backend's key
            if health.cooled_until == 0.0:
                state = "healthy"
            elif now < health.cooled_until:
                state = "cooling_down"
            else:
                state = "probing"  # the cooldown is over: the next call (or the one running) is the probe
            yield {
                "backend": backend,
                "model": model,
                "state": state,
                "cooldown_remaining_s": round(max(0.0, health.cooled_until - now), 3),
                "consecutive_failures": health.failures,
                "successes": self._successes.get(key, 0),  # this worker's
                "failures": health.total_failures,
                "cooldowns": health.cooldowns,
                "last_error": health.last_error,
            }
