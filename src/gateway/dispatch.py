"""Run a plan of attempts: retry, move on, or stop (SPEC §6).

For each target of the plan, in order:
1. Skip it without a call when its backend has no key (``backend_not_configured``)
   or it is cooling down after repeated failures.
2. Call it. A transient fault (connection refused or reset, 408, 409, 429, 5xx,
   a 200 whose body is not JSON) is retried on the same target up to its
   ``retries`` with jittered backoff, or after ``Retry-After`` when that fits the
   remaining budget; then the plan moves on. No answer within the time to first
   byte, a context-length refusal, or an image alias's reply without an image:
   move on at once. Any other upstream 4xx about the request: stop, and the
   client gets that status with the upstream's reason.
3. Attempts (``[routing] max_attempts``) and total time (the alias's deadline)
   are bounded. When the plan is exhausted, one error sums up every attempt.

Streams are held until their first real chunk, so everything above also applies
to a stream until the client has seen a byte.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import msgspec

from gateway.admission import NO_SLOT, BackendSlots, Slot, Unlimited
from gateway.config.model import RoutingConfig
from gateway.errors import GatewayError
from gateway.health import HealthBoard
from gateway.shaping import message_images, upstream_body
from gateway.snapshot import CompiledAlias, Target
from gateway.sse import DONE, SSEDecoder
from gateway.upstream import UpstreamClient, UpstreamFault, UpstreamStream, retry_after_s
from gateway.upstream_errors import read_upstream_error

TRANSIENT_STATUSES = frozenset({408, 409, 429})
# A backend answering 401/403/404 has a wrong key or model id: that is the
# operator's problem, not the client's, so the plan moves on instead of stopping.
BACKEND_PROBLEM_STATUSES = frozenset({401, 403, 404})
MAX_ERROR_BODY_BYTES = 64 * 1024

OK, RETRY, MOVE_ON, STOP = "ok", "retry", "move_on", "stop"


@attrs.frozen
class Attempt:
    """One call (or skip) of a plan, as the final error message and logs report it."""

    alias: str
    backend: str
    outcome: str        # "ok", an HTTP status, or a fault: reset, connect, first_byte_timeout, ...
    reason: str
    duration_s: float
    called: bool = True

    def describe(self) -> str:
        return f"{self.alias}: {self.outcome} ({self.reason})"


@attrs.frozen
class Verdict:
    action: str
    outcome: str
    reason: str
    answer: Any = None
    retry_after_s: float | None = None
    error: GatewayError | None = None


@attrs.define
class Served:
    """A non-streaming answer and how it was obtained."""

    target: Target
    answer: dict[str, Any]
    attempts: list[Attempt]


@attrs.define
class StreamStart:
    """A stream whose first real chunk has arrived; the relay takes it from here."""

    target: Target
    stream: UpstreamStream
    decoder: SSEDecoder
    held: list[bytes | None]     # events read before the first real chunk (inclusive)
    attempts: list[Attempt]
    finished: bool               # the upstream already sent [DONE] or ended
    slot: Slot = NO_SLOT         # the backend slot the stream holds until it ends

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            self.slot.release()


def _is_real_chunk(event: Any) -> bool:
    """A chunk that shows the model is answering (a bare role delta does not)."""
    if not isinstance(event, dict):
        return False
    if event.get("usage"):
        return True
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(k) for k in ("content", "tool_calls", "images", "reasoning", "reasoning_content", "refusal", "audio")):
            return True
    return False


class Dispatcher:
    def __init__(
        self,
        client: UpstreamClient,
        health: HealthBoard,
        routing: Callable[[], RoutingConfig],
        slots: BackendSlots | None = None,
    ) -> None:
        self._client = client
        self._health = health
        self._routing = routing
        self._slots = slots or Unlimited()

    async def complete(self, alias: CompiledAlias, targets: tuple[Target, ...], body: Mapping[str, Any]) -> Served:
        served = await self._run(alias, targets, body, self._attempt_complete)
        assert isinstance(served, Served)
        return served

    async def open_stream(self, alias: CompiledAlias, targets: tuple[Target, ...], body: Mapping[str, Any]) -> StreamStart:
        started = await self._run(alias, targets, body, self._attempt_stream)
        assert isinstance(started, StreamStart)
        return started

    # ------------------------------------------------------------ the plan loop

    async def _run(
        self,
        alias: CompiledAlias,
        targets: tuple[Target, ...],
        body: Mapping[str, Any],
        attempt: Callable[[Target, bytes, float], Awaitable[Verdict]],
    ) -> Served | StreamStart:
        routing = self._routing()
        deadline = time.monotonic() + alias.deadline_s
        attempts: list[Attempt] = []
        calls = 0
        for target in targets:
            if not target.configured:
                attempts.append(Attempt(target.alias, target.backend_name, "not_configured", f"{target.api_key_env} is unset", 0.0, called=False))
                continue
            cooling_s = self._health.cooling_for(target.key)
            if cooling_s > 0:
                attempts.append(Attempt(target.alias, target.backend_name, "cooling_down", f"skipped for {cooling_s:.0f} s more", 0.0, called=False))
                continue
            payload = upstream_body(body, target)
            tries = 0
            while calls < routing.max_attempts:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                calls += 1
                tries += 1
                started = time.monotonic()
                verdict = await attempt(target, payload, remaining_s)
                elapsed = time.monotonic() - started
                attempts.append(Attempt(target.alias, target.backend_name, verdict.outcome, verdict.reason, elapsed))
                if verdict.action == OK:
                    self._health.succeeded(target.key)
                    result = verdict.answer
                    result.attempts = attempts
                    return result  # type: ignore[no-any-return]
                if verdict.action == STOP:
                    assert verdict.error is not None
                    raise verdict.error
                if verdict.outcome not in ("context_length", "no_image"):
                    self._health.failed(target.key, f"{verdict.outcome}: {verdict.reason}", failures_to_cool=routing.cooldown_failures, cooldown_s=routing.cooldown_s)
                if verdict.action != RETRY or tries > target.retries:
                    break
                wait_s = self._backoff_s(routing, tries, verdict.retry_after_s)
                if wait_s is None or time.monotonic() + wait_s >= deadline:
                    break
                await asyncio.sleep(wait_s)
            if calls >= routing.max_attempts or time.monotonic() >= deadline:
                break
        raise exhausted_error(alias.name, attempts, self._health, targets)

    @staticmethod
    def _backoff_s(routing: RoutingConfig, tries: int, retry_after: float | None) -> float | None:
        if retry_after is not None:
            # Honour the upstream's wish only if it is within our own backoff ceiling;
            # a longer wait is better spent on the next target.
            return retry_after if retry_after <= routing.backoff_max_s else None
        base = min(routing.backoff_s * (2 ** (tries - 1)), routing.backoff_max_s)
        return base * random.uniform(0.5, 1.5)

    # ------------------------------------------------------------ one attempt

    async def _attempt_complete(self, target: Target, payload: bytes, remaining_s: float) -> Verdict:
        slot = await self._slots.acquire(target)
        try:
            return await self._call_complete(target, payload, remaining_s)
        finally:
            slot.release()

    async def _call_complete(self, target: Target, payload: bytes, remaining_s: float) -> Verdict:
        budget_s = min(target.timeouts.total_s, remaining_s)
        try:
            async with asyncio.timeout(budget_s):
                stream = await self._client.open(target, payload, first_byte_s=min(target.timeouts.first_byte_s, budget_s))
                try:
                    raw = await stream.read()
                finally:
                    await stream.aclose()
        except UpstreamFault as fault:
            return fault_verdict(fault)
        except TimeoutError:
            return Verdict(MOVE_ON, "timeout", f"no complete answer within {budget_s:g} s")
        if stream.status != 200:
            return status_verdict(stream.status, stream.headers, raw)
        try:
            answer = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return Verdict(RETRY, "invalid_json", "the 200 answer is not JSON")
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            if isinstance(answer, dict) and "error" in answer:
                return status_verdict(502, stream.headers, raw)
            return Verdict(RETRY, "invalid_json", "the 200 answer is not a chat completion")
        if target.image_output and not message_images(answer):
            return Verdict(MOVE_ON, "no_image", "the answer holds no image")
        return Verdict(OK, "ok", "", answer=Served(target, answer, []))

    async def _attempt_stream(self, target: Target, payload: bytes, remaining_s: float) -> Verdict:
        slot = await self._slots.acquire(target)
        try:
            verdict = await self._call_stream(target, payload, remaining_s)
        except BaseException:
            slot.release()
            raise
        if verdict.action == OK:
            verdict.answer.slot = slot  # held until the stream ends
        else:
            slot.release()
        return verdict

    async def _call_stream(self, target: Target, payload: bytes, remaining_s: float) -> Verdict:
        first_byte_s = min(target.timeouts.first_byte_s, remaining_s)
        try:
            stream = await self._client.open(target, payload, first_byte_s=first_byte_s)
        except UpstreamFault as fault:
            return fault_verdict(fault)
        handed_over = False
        try:
            if stream.status != 200:
                try:
                    async with asyncio.timeout(min(10.0, remaining_s)):
                        raw = await stream.read(MAX_ERROR_BODY_BYTES)
                except (UpstreamFault, TimeoutError):
                    raw = b""
                return status_verdict(stream.status, stream.headers, raw)
            verdict = await self._hold_until_first_chunk(target, stream, first_byte_s)
            handed_over = verdict.action == OK
            return verdict
        finally:
            if not handed_over:
                await stream.aclose()

    async def _hold_until_first_chunk(self, target: Target, stream: UpstreamStream, first_byte_s: float) -> Verdict:
        decoder = SSEDecoder()
        held: list[bytes | None] = []
        try:
            async with asyncio.timeout(first_byte_s):
                while (chunk := await stream.next_chunk()) is not None:
                    events = decoder.feed(chunk)
                    held.extend(events)
                    for data in events:
                        if data is None:
                            continue
                        if data.strip() == DONE:
                            return Verdict(OK, "ok", "", answer=StreamStart(target, stream, decoder, held, [], True))
                        try:
                            event = msgspec.json.decode(data)
                        except msgspec.DecodeError:
                            continue  # one malformed chunk is dropped, not fatal
                        if isinstance(event, dict) and "error" in event:
                            return Verdict(RETRY, "error_event", read_upstream_error(data).reason)
                        if _is_real_chunk(event):
                            # The rest of this upstream chunk is held too: the relay sends it all.
                            return Verdict(OK, "ok", "", answer=StreamStart(target, stream, decoder, held, [], False))
        except UpstreamFault as fault:
            return fault_verdict(fault)
        except TimeoutError:
            return Verdict(MOVE_ON, "first_byte_timeout", f"no chunk within {first_byte_s:g} s")
        # The upstream ended cleanly before any real chunk: relay what it sent.
        return Verdict(OK, "ok", "", answer=StreamStart(target, stream, decoder, held, [], True))


def fault_verdict(fault: UpstreamFault) -> Verdict:
    if fault.kind in ("first_byte_timeout", "timeout", "idle_timeout"):
        # Retrying would double the wait: move on.
        return Verdict(MOVE_ON, fault.kind, fault.detail)
    return Verdict(RETRY, fault.kind, fault.detail)


def status_verdict(status: int, headers: Mapping[str, str], body: bytes) -> Verdict:
    info = read_upstream_error(body)
    outcome = str(status)
    if info.is_context_length:
        return Verdict(MOVE_ON, "context_length", info.reason)
    if status in TRANSIENT_STATUSES or status >= 500:
        return Verdict(RETRY, outcome, info.reason, retry_after_s=retry_after_s(headers))
    if status in BACKEND_PROBLEM_STATUSES:
        return Verdict(MOVE_ON, outcome, info.reason)
    if 400 <= status < 500:
        error = GatewayError("upstream_rejected", f"The upstream refused the request: {info.reason}", status=status)
        return Verdict(STOP, outcome, info.reason, error=error)
    return Verdict(RETRY, outcome, f"unexpected status: {info.reason}")


def exhausted_error(alias: str, attempts: list[Attempt], health: HealthBoard, targets: tuple[Target, ...]) -> GatewayError:
    """The one error a client gets when no target of the plan answered."""
    called = [a for a in attempts if a.called]
    outcomes = {a.outcome for a in called}
    summary = "; ".join(a.describe() for a in attempts) or "no target could be tried"
    if not called:
        unset = sorted({t.api_key_env for t in targets if not t.configured and t.api_key_env})
        if unset and all(a.outcome == "not_configured" for a in attempts):
            names = " or ".join(unset)
            return GatewayError(
                "backend_not_configured",
                f"Model '{alias}' cannot be served: set {names} in the gateway's environment.",
            )
        wait_s = min((health.cooling_for(t.key) for t in targets if t.configured), default=1.0)
        return GatewayError(
            "no_healthy_backend",
            f"Every target of '{alias}' is cooling down after repeated failures ({summary}).",
            headers={"retry-after": str(max(1, round(wait_s)))},
        )
    if outcomes == {"context_length"}:
        return GatewayError(
            "context_length_exceeded",
            f"The messages do not fit the context window of any target of '{alias}' ({summary}).",
            at=("messages",),
        )
    if outcomes == {"no_image"}:
        return GatewayError("no_image_generated", f"No target of '{alias}' answered with an image ({summary}).")
    if outcomes <= {"timeout", "first_byte_timeout", "idle_timeout"}:
        return GatewayError("upstream_timeout", f"No target of '{alias}' answered in time ({summary}).")
    return GatewayError("upstream_error", f"Every target of '{alias}' failed: {summary}.")
