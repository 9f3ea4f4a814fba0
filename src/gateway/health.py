"""Per-target health: consecutive failures and cooldowns (SPEC §6).

A target (backend + upstream model) that fails ``cooldown_failures`` times in a
row is skipped without a call for ``cooldown_s``; then one request probes it
(half-open) and the first success clears it. The board lives for the whole
process, across reloads, keyed by (backend, model).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import attrs


@attrs.define
class TargetHealth:
    failures: int = 0
    cooled_until: float = 0.0
    probing: bool = False
    last_error: str | None = None
    successes: int = 0
    total_failures: int = 0


class HealthBoard:
    def __init__(self) -> None:
        self._targets: dict[tuple[str, str], TargetHealth] = {}

    def _get(self, key: tuple[str, str]) -> TargetHealth:
        health = self._targets.get(key)
        if health is None:
            health = self._targets[key] = TargetHealth()
        return health

    def cooling_for(self, key: tuple[str, str], now: float | None = None) -> float:
        """Seconds this target is still cooling down; 0 when it may be called.

        After the cooldown, the first caller gets 0 and becomes the probe; others
        keep skipping it until the probe ends, so a dead target gets one call.
        """
        health = self._targets.get(key)
        if health is None or health.cooled_until == 0.0:
            return 0.0
        now = time.monotonic() if now is None else now
        if now < health.cooled_until:
            return health.cooled_until - now
        if health.probing:
            return 1.0
        health.probing = True
        return 0.0

    def succeeded(self, key: tuple[str, str]) -> None:
        health = self._get(key)
        health.failures = 0
        health.cooled_until = 0.0
        health.probing = False
        health.successes += 1

    def failed(self, key: tuple[str, str], reason: str, *, failures_to_cool: int, cooldown_s: float) -> None:
        health = self._get(key)
        health.failures += 1
        health.total_failures += 1
        health.last_error = reason
        health.probing = False
        if health.failures >= failures_to_cool:
            health.cooled_until = time.monotonic() + cooldown_s

    def report(self) -> Iterator[dict[str, object]]:
        now = time.monotonic()
        for (backend, model), health in sorted(self._targets.items()):
            yield {
                "backend": backend,
                "model": model,
                "state": "cooling_down" if health.cooled_until > now else ("probing" if health.cooled_until else "healthy"),
                "cooldown_remaining_s": round(max(0.0, health.cooled_until - now), 3),
                "consecutive_failures": health.failures,
                "successes": health.successes,
                "failures": health.total_failures,
                "last_error": health.last_error,
            }
