"""Where limits plug into the request path: the seams, and admission by rates.

Two hooks:
- ``Admission.admit(identity, alias, facts)`` runs once per request before any
  upstream call (rates per key and per alias); it raises ``GatewayError`` 429 or
  returns a ``Ticket`` whose ``headers`` go on the answer and whose
  ``settle(usage)`` is called with the serving attempt's usage at the end.
- ``BackendSlots.acquire(target, request_left_s)`` runs before each upstream attempt
  (the concurrency of a backend, see ``concurrency``); the returned ``Slot`` is
  released when the attempt ends, or for a stream when the stream ends or its
  client leaves.

``RateAdmission`` is the admission the app runs. For each request:
1. Collect the rates that apply from the serving config: the key's ``rpm`` /
   ``tpm`` (its keys-file entry, else ``[limits] key_rpm`` / ``key_tpm``) and the
   requested alias's ``rpm`` / ``tpm``. None apply: no storage is touched.
2. Read every counter; if one has no room (one request, or the token estimate:
   the prompt at ~4 characters per token), refuse with 429
   ``rate_limit_exceeded``, ``Retry-After`` and the ``x-ratelimit-*`` headers.
3. Take the request and the estimate from every counter, atomically each.
4. ``settle(usage)`` later counts the tokens the upstream reported beyond the
   estimate (an answer without usage keeps the estimate).
The storage follows ``[limits] storage`` of the current config on every request;
a storage that fails lets requests through and says so in the log: a Redis
outage must not take the gateway down with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from gateway.auth import Identity
from gateway.config.model import Config
from gateway.errors import GatewayError
from gateway.facts import RequestFacts
from gateway.limits import STORAGE_ERRORS, WINDOW_S, Rate, RateCounter, Window, format_duration, storage_label
from gateway.snapshot import CompiledAlias, Target

log = logging.getLogger("gateway.admission")

Headers = list[tuple[bytes, bytes]]

# Real text runs near 4 characters per token (the facts' lower bound is far more cautious).
CHARS_PER_TOKEN_ESTIMATE = 4
STORAGE_TIMEOUT_S = 2.0
WARN_EVERY_S = 30.0
# After the storage fails, requests are let through without asking it for this long: an unreachable
# or hanging Redis would otherwise add its timeout to every request.
STORAGE_REST_S = 5.0


class Ticket(Protocol):
    headers: list[tuple[bytes, bytes]]

    def settle(self, usage: dict[str, Any] | None) -> None: ...

    def refund(self) -> None:
        """The request made no upstream call after all (every backend full, cooling down or unconfigured):
        give back what it took."""


class Admission(Protocol):
    async def admit(self, identity: Identity, alias: CompiledAlias, facts: RequestFacts) -> Ticket: ...


class Slot(Protocol):
    def release(self) -> None: ...


class BackendSlots(Protocol):
    async def acquire(self, target: Target, request_left_s: float = ...) -> Slot: ...


class _NoTicket:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []

    def settle(self, usage: dict[str, Any] | None) -> None:
        return None

    def refund(self) -> None:
        return None


NO_TICKET = _NoTicket()


class AdmitAll:
    async def admit(self, identity: Identity, alias: CompiledAlias, facts: RequestFacts) -> Ticket:
        return NO_TICKET


class _NoSlot:
    def release(self) -> None:
        return None


NO_SLOT = _NoSlot()


class Unlimited:
    async def acquire(self, target: Target, request_left_s: float = math.inf) -> Slot:
        return NO_SLOT


# ---------------------------------------------------------------- rates


def rates_for(identity: Identity, alias: CompiledAlias, config: Config) -> list[Rate]:
    """The per-minute rates a request of ``identity`` for ``alias`` counts against."""
    rates: list[Rate] = []
    key_rpm = identity.rpm if identity.rpm is not None else config.limits.key_rpm
    key_tpm = identity.tpm if identity.tpm is not None else config.limits.key_tpm
    if key_rpm is not None:
        rates.append(Rate("requests", "key", identity.name, key_rpm))
    if key_tpm is not None:
        rates.append(Rate("tokens", "key", identity.name, key_tpm))
    if alias.spec.rpm is not None:
        rates.append(Rate("requests", "alias", alias.name, alias.spec.rpm))
    if alias.spec.tpm is not None:
        rates.append(Rate("tokens", "alias", alias.name, alias.spec.tpm))
    return rates


def estimate_tokens(facts: RequestFacts) -> int:
    """Tokens taken up front for the admission decision: the prompt's text at ~4 characters a token."""
    return max(1, facts.prompt_chars // CHARS_PER_TOKEN_ESTIMATE)


def usage_tokens(usage: dict[str, Any] | None) -> int | None:
    """Total tokens of an upstream's ``usage``, or None when it reports none."""
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if type(total) is int:
        return total
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens")]
    counted = [p for p in parts if type(p) is int]
    return sum(counted) if counted else None


def _cost(rate: Rate, estimate: int) -> int:
    return 1 if rate.unit == "requests" else min(estimate, rate.per_minute)


def rate_headers(rates: Iterable[Rate], windows: Iterable[Window], estimate: int, *, taken: bool) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers: per unit, the rate with the least room left."""
    tightest: dict[str, tuple[int, Rate, Window]] = {}
    for rate, window in zip(rates, windows):
        left = max(0, window.remaining(rate.per_minute) - (_cost(rate, estimate) if taken else 0))
        if rate.unit not in tightest or left < tightest[rate.unit][0]:
            tightest[rate.unit] = (left, rate, window)
    headers: dict[str, str] = {}
    for unit, (left, rate, window) in sorted(tightest.items()):
        if taken:
            # What we took sits in the current window: it stops counting a minute after that window ends
            # (a window Redis had not started yet lives two minutes from now).
            reset_s = window.current_ttl_s if window.current_ttl_s > 0 else 2.0 * WINDOW_S
        else:
            reset_s = window.reset_s()
        headers[f"x-ratelimit-limit-{unit}"] = str(rate.per_minute)
        headers[f"x-ratelimit-remaining-{unit}"] = str(left)
        headers[f"x-ratelimit-reset-{unit}"] = format_duration(reset_s)
    return headers


def _encoded(headers: dict[str, str]) -> Headers:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _refusal(rate: Rate, wait_s: float, headers: dict[str, str]) -> GatewayError:
    retry_after = max(1, math.ceil(wait_s))
    whose = "your key" if rate.scope == "key" else f"model '{rate.name}'"
    message = (
        f"Rate limit reached: {rate.per_minute} {rate.unit} per minute for {whose}. "
        f"Retry after {retry_after} s."
    )
    return GatewayError("rate_limit_exceeded", message, headers={"retry-after": str(retry_after), **headers})


class RateTicket:
    """An admitted request: its headers, and the token rates to settle once its usage is known."""

    def __init__(self, admission: RateAdmission, counter: RateCounter, rates: list[Rate], estimate: int, headers: Headers) -> None:
        self.headers = headers
        self._admission = admission
        self._counter = counter
        self._rates = rates
        self._token_rates = [r for r in rates if r.unit == "tokens"]
        self._estimate = estimate
        self._settled = False

    def settle(self, usage: dict[str, Any] | None) -> None:
        if self._settled:
            return
        self._settled = True
        used = usage_tokens(usage)
        if used is not None and any(used > _cost(rate, self._estimate) for rate in self._token_rates):
            self._admission.spawn(self._add(used))

    def refund(self) -> None:
        if self._settled:
            return
        self._settled = True
        self.headers = []  # what they said counted this request, which now uses up nothing
        self._admission.spawn(self._give_back())

    async def _give_back(self) -> None:
        for rate in self._rates:
            await self._counter.give_back(rate, _cost(rate, self._estimate))

    async def _add(self, used: int) -> None:
        # Each token rate took min(estimate, its limit) up front: count the rest of what was used.
        for rate in self._token_rates:
            await self._counter.add(rate, used - _cost(rate, self._estimate))


class RateAdmission:
    """Admission by requests and tokens per minute, per key and per alias (see the module docstring)."""

    def __init__(self, config: Callable[[], Config | None]) -> None:
        self._config = config
        self._counter: RateCounter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_at = -WARN_EVERY_S
        self._failing = False  # the current counter's storage failed and has not answered since
        self._resting_until = 0.0

    async def admit(self, identity: Identity, alias: CompiledAlias, facts: RequestFacts) -> Ticket:
        config = self._config()
        rates = rates_for(identity, alias, config) if config is not None else []
        if config is None or not rates:
            return NO_TICKET
        counter = self._counter_for(config.limits.storage)
        if self._failing and time.monotonic() < self._resting_until:
            return NO_TICKET
        estimate = estimate_tokens(facts)
        try:
            async with asyncio.timeout(STORAGE_TIMEOUT_S):
                return await self._admit(counter, rates, estimate)
        except STORAGE_ERRORS as exc:
            self._storage_failed(counter, exc)
            return NO_TICKET

    async def _admit(self, counter: RateCounter, rates: list[Rate], estimate: int) -> Ticket:
        windows = list(await asyncio.gather(*(counter.window(rate) for rate in rates)))
        self._storage_answered(counter)
        waits = [(window.wait_s(rate.per_minute, _cost(rate, estimate)), rate) for rate, window in zip(rates, windows)]
        wait_s, rate = max(waits, key=lambda pair: pair[0])
        if wait_s > 0:
            raise _refusal(rate, wait_s, rate_headers(rates, windows, estimate, taken=False))
        for i, rate in enumerate(rates):
            if not await counter.take(rate, _cost(rate, estimate)):
                # Another request (or worker) took the room since we looked: give back what this one took.
                for taken in rates[:i]:
                    await counter.give_back(taken, _cost(taken, estimate))
                window = await counter.window(rate)
                wait_s = max(1.0, window.wait_s(rate.per_minute, _cost(rate, estimate)))
                raise _refusal(rate, wait_s, rate_headers(rates, windows, estimate, taken=False))
        return RateTicket(self, counter, rates, estimate, _encoded(rate_headers(rates, windows, estimate, taken=True)))

    def _counter_for(self, url: str) -> RateCounter:
        current = self._counter
        if current is not None and current.url == url:
            return current
        self._counter = RateCounter(url)
        # A new storage is asked at once, and its first failure is said at once.
        self._failing, self._resting_until, self._warned_at = False, 0.0, -WARN_EVERY_S
        if current is not None:
            log.info("rate counters now kept in %s (were in %s)", storage_label(url), storage_label(current.url))
            self.spawn(current.aclose())
        return self._counter

    def _storage_failed(self, counter: RateCounter, exc: BaseException) -> None:
        now = time.monotonic()
        self._failing, self._resting_until = True, now + STORAGE_REST_S
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "rate limits not enforced: the counter storage %s failed (%s: %s); requests are let through, "
                "and it is asked again in %g s",
                storage_label(counter.url), type(exc).__name__, exc, STORAGE_REST_S,
            )

    def _storage_answered(self, counter: RateCounter) -> None:
        if self._failing:
            self._failing = False
            log.warning("rate limits enforced again: the counter storage %s answers", storage_label(counter.url))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run storage work off the request path, bounded in time, its failures logged."""

        async def bounded() -> None:
            counter = self._counter
            try:
                async with asyncio.timeout(STORAGE_TIMEOUT_S):
                    await work
            except STORAGE_ERRORS as exc:
                if counter is not None:
                    self._storage_failed(counter, exc)

        task = asyncio.get_running_loop().create_task(bounded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Finish pending counts and close the storage's connections (the lifespan's end)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STORAGE_TIMEOUT_S)
        if self._counter is not None:
            try:
                await self._counter.aclose()
            except STORAGE_ERRORS:
                pass
