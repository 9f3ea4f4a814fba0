"""Run a plan of attempts: retry, move on, or stop (SPEC §6).

For each target of the plan, in order:
1. Skip it without a call when its backend has no key (``backend_not_configured``)
   or it is cooling down after repeated failures (``health``); a target whose
   cooldown is over is let through as a probe.
2. Call it, and judge the answer:
   - a transient fault (connection refused or reset, 408, 409, 429, 5xx, a 200
     that is not a chat completion, an error event before the first chunk) is
     retried on the same target up to its ``retries``, after a jittered
     exponential backoff, or after ``Retry-After`` when that is at most
     ``[routing] retry_after_max_s`` and fits the remaining time. A longer
     ``Retry-After`` moves on at once; whenever the plan moves on from a target
     that asked for a pause, the target is skipped for that long (at most
     ``cooldown_s``). A target that this very failure cooled down is not retried;
   - no answer within the time to first byte (a stream's first real chunk; for a
     non-streaming call the whole answer is its first byte, so its total), or the
     total running out: move on, never retry (that would double the wait);
   - a context-length refusal, in any dialect: move on (the next target may have
     a larger window), never retry; an image-output alias's answer without an
     image: move on;
   - a 401, 402, 403 (other than a content refusal) or 404 says the backend's
     key, credit or model id is wrong: the operator's problem, so move on;
   - any other 4xx is about the request (a bad parameter, a content filter):
     stop, and the client gets that status with the upstream's reason.
3. Upstream calls (``[routing] max_attempts``) and total time (the alias's plan
   deadline) are bounded. When the plan is exhausted, one error sums up every
   attempt in order: alias, status or fault, short reason. Reasons are scrubbed
   of keys, backend URLs and hosts before they go anywhere.

Streams are held until their first real chunk (for an image-output alias, until
its first image), so everything above also applies to a stream until the client
has seen a byte. A client that leaves cancels the running task: the open
upstream answer is closed on the way out and the target's probe slot freed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs
import msgspec

from gateway.admission import NO_SLOT, BackendSlots, Slot, Unlimited
from gateway.answer_forms import completion_as_events, events_as_completion
from gateway.config.model import RoutingConfig
from gateway.errors import GatewayError, Location
from gateway.h1 import RequestBody
from gateway.health import HealthBoard
from gateway.shaping import (
    KeptBody,
    asks_for_image,
    choices_of,
    decode_answer,
    fix_images,
    gather_content_images,
    gather_part_images,
    holds_image,
    message_images,
    upstream_body,
)
from gateway.snapshot import CompiledAlias, Target
from gateway.sse import DONE, SSEDecoder, looks_like_event_stream
from gateway.upstream import MAX_ANSWER_BYTES, UpstreamClient, UpstreamFault, UpstreamStream, retry_after_s
from gateway.upstream_errors import UpstreamErrorInfo, read_upstream_error

log = logging.getLogger("gateway.dispatch")

TRANSIENT_STATUSES = frozenset({408, 409, 429})
# An upstream's 4xx about the request itself (a bad parameter, a body too large), or a content
# filter's (FILTER_STATUSES): the client's to mend, passed on with its status. Any other 4xx is about
# the call the gateway made (a wrong key, credit or model id, a base_url path that takes no POST,
# a proxy wanting credentials): the operator's problem, not the client's, so the plan moves on.
REQUEST_STATUSES = frozenset({400, 413, 422})
# Where a content filter's words are taken as such: a 401 "key flagged for abuse" is about the key.
FILTER_STATUSES = REQUEST_STATUSES | {403, 451}
TIMEOUT_OUTCOMES = frozenset({"timeout", "connect_timeout", "first_byte_timeout", "idle_timeout"})
# Outcomes that show the target is up and answering, though not with what we need.
ANSWERED_OUTCOMES = frozenset({"context_length", "no_image"})
MAX_ERROR_BODY_BYTES = 64 * 1024
# How long an error answer's body may take to arrive once its headers have.
ERROR_BODY_WAIT_S = 5.0

OK, RETRY, MOVE_ON, STOP = "ok", "retry", "move_on", "stop"
# How long a stream's end may follow its [DONE] and still keep the connection for the next call.
FINISH_AFTER_DONE_S = 0.25


@attrs.frozen
class Attempt:
    """One call (or skip) of a plan, as the final error message and logs report it."""

    alias: str
    backend: str
    outcome: str        # "ok", an HTTP status, or a fault: reset, connect, first_byte_timeout, ...
    reason: str
    duration_s: float
    called: bool = True
    refusal: GatewayError | None = attrs.field(default=None, eq=False, repr=False)  # a backend slot refused
    # An answer the plan threw away (an image alias's without an image) was paid for all the same.
    usage: Any = attrs.field(default=None, eq=False, repr=False)
    cost_per_mtok_usd: float | None = attrs.field(default=None, eq=False, repr=False)

    def describe(self) -> str:
        return f"{self.alias}: {self.outcome} ({self.reason})" if self.reason else f"{self.alias}: {self.outcome}"


@attrs.frozen
class Verdict:
    action: str
    outcome: str
    reason: str
    answer: Any = None
    retry_after_s: float | None = None
    error: GatewayError | None = None
    usage: Any = None  # the usage of an answer moved on from


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
    held: list[bytes | None]     # events read before the hand-over, in order
    attempts: list[Attempt]
    finished: bool               # the upstream already sent [DONE] or ended
    slot: Slot = NO_SLOT         # the backend slot the stream holds until it ends

    async def aclose(self, *, answered: bool = False) -> None:
        """Close the stream and free its slot. ``answered``: the upstream said [DONE], so the rest of
        its body (the end of its chunked framing, which may come in a later read) is awaited a little,
        letting the connection be kept for the next call instead of aborted."""
        self.slot.release()
        try:
            if answered:
                await self.stream.finish(within_s=FINISH_AFTER_DONE_S)
        finally:
            await self.stream.aclose()


def calls_made(attempts: list[Attempt]) -> int:
    return sum(1 for attempt in attempts if attempt.called)


def _is_real_chunk(event: Any) -> bool:
    """A chunk that shows the model is answering (a bare role delta does not)."""
    if not isinstance(event, dict):
        return False
    if event.get("usage"):
        return True
    for choice in choices_of(event):
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta") if "delta" in choice else choice.get("message")
        if isinstance(delta, dict) and any(
            delta.get(k) for k in ("content", "tool_calls", "function_call", "images", "reasoning", "reasoning_content", "refusal", "audio")
        ):
            return True
    return False


def _has_image_delta(event: Any) -> bool:
    if not isinstance(event, dict):
        return False
    for choice in choices_of(event):
        delta = choice.get("delta") if isinstance(choice, dict) else None
        gather_part_images(delta)
        images = delta.get("images") if isinstance(delta, dict) else None
        if isinstance(images, list):
            fix_images(images)  # a copy: the relay decodes and fixes the event again
            if holds_image(images):
                return True
    return False


class Dispatcher:
    def __init__(
        self,
        client: UpstreamClient,
        health: HealthBoard,
        routing: Callable[[], RoutingConfig | None],
        slots: BackendSlots | None = None,
        on_attempts: Callable[[list[Attempt]], None] | None = None,
    ) -> None:
        self._client = client
        self._health = health
        self._routing = routing
        self._slots = slots or Unlimited()
        # Told every plan's attempts, served or not: a backend that only fails must show in the metrics.
        self._on_attempts = on_attempts

    async def complete(
        self, alias: CompiledAlias, targets: tuple[Target, ...], body: Mapping[str, Any], kept: KeptBody | None = None
    ) -> Served:
        """``kept``: the JSON ``body`` came from, kept for a large body (``shaping.upstream_body``)."""
        served = await self._run(alias, targets, body, self._attempt_complete, kept)
        assert isinstance(served, Served)
        return served

    async def open_stream(
        self, alias: CompiledAlias, targets: tuple[Target, ...], body: Mapping[str, Any], kept: KeptBody | None = None
    ) -> StreamStart:
        started = await self._run(alias, targets, body, self._attempt_stream, kept)
        assert isinstance(started, StreamStart)
        return started

    # ------------------------------------------------------------ the plan loop

    async def _run(
        self,
        alias: CompiledAlias,
        targets: tuple[Target, ...],
        body: Mapping[str, Any],
        attempt: Callable[[Target, RequestBody, float], Awaitable[Verdict]],
        kept: KeptBody | None = None,
    ) -> Served | StreamStart:
        attempts: list[Attempt] = []
        try:
            return await self._run_plan(alias, targets, body, attempt, kept, attempts)
        finally:
            if self._on_attempts is not None:
                self._on_attempts(attempts)

    async def _run_plan(
        self,
        alias: CompiledAlias,
        targets: tuple[Target, ...],
        body: Mapping[str, Any],
        attempt: Callable[[Target, RequestBody, float], Awaitable[Verdict]],
        kept: KeptBody | None,
        attempts: list[Attempt],
    ) -> Served | StreamStart:
        routing = self._routing() or RoutingConfig()
        deadline = time.monotonic() + alias.deadline_s
        for index, target in enumerate(targets):
            stopped = self._out_of_budget(routing, attempts, deadline)
            if stopped:
                attempts += [Attempt(t.alias, t.backend_name, "not_tried", stopped, 0.0, called=False) for t in targets[index:]]
                break
            if not target.configured:
                attempts.append(Attempt(target.alias, target.backend_name, "not_configured", f"{target.api_key_env} is unset", 0.0, called=False))
                continue
            cooling_s = self._health.admit(target.key, probe_window_s=target.timeouts.total_s)
            if cooling_s > 0:
                attempts.append(Attempt(target.alias, target.backend_name, "cooling_down", f"skipped for {cooling_s:.1f} s more", 0.0, called=False))
                continue
            if target.image_output and not asks_for_image(body, target):
                # Asked for text only, an image model's answer without an image is what the client wants.
                target = attrs.evolve(target, image_output=False)
            result = await self._try_target(routing, target, upstream_body(body, target, kept), body, deadline, attempts, attempt)
            if result is not None:
                result.attempts = attempts
                # DEBUG, not INFO: a line per request on the hot path measured 472 → 380 µs of
                # CPU per small request when removed; metrics count who served.
                log.debug(
                    "%s served by %s (backend %s, model %s) after %d call(s)",
                    alias.name, target.alias, target.backend_name, target.model, calls_made(attempts),
                )
                return result
        # Raised as made, never held in a local: the traceback holds this frame, which holds the body.
        raise exhausted_error(alias.name, attempts, self._health, targets)

    @staticmethod
    def _out_of_budget(routing: RoutingConfig, attempts: list[Attempt], deadline: float) -> str | None:
        if calls_made(attempts) >= routing.max_attempts:
            return f"the limit of {routing.max_attempts} calls was reached"
        if time.monotonic() >= deadline:
            return "the request's time ran out"
        return None

    async def _try_target(
        self,
        routing: RoutingConfig,
        target: Target,
        payload: RequestBody,
        body: Mapping[str, Any],
        deadline: float,
        attempts: list[Attempt],
        attempt: Callable[[Target, RequestBody, float], Awaitable[Verdict]],
    ) -> Served | StreamStart | None:
        """Call one target, retrying transient faults; the answer, or None to move on."""
        tries = 0
        while True:
            tries += 1
            started = time.monotonic()
            try:
                verdict = await attempt(target, payload, deadline)
            except GatewayError as refusal:
                # The backend is at its max_concurrency and its line is full: no call was made.
                self._health.released(target.key)
                if refusal.code != "concurrency_limit_exceeded":
                    raise
                attempts.append(
                    Attempt(target.alias, target.backend_name, "busy", refusal.message, time.monotonic() - started, called=False, refusal=refusal)
                )
                return None
            except BaseException:
                # Cancelled (the client left): no verdict on the target, but counted among the attempts.
                self._health.released(target.key)
                attempts.append(Attempt(target.alias, target.backend_name, "cancelled", "the client left", time.monotonic() - started))
                raise
            reason = target.in_client_words(verdict.reason) if verdict.reason else ""
            attempts.append(
                Attempt(
                    target.alias, target.backend_name, verdict.outcome, reason, time.monotonic() - started,
                    usage=verdict.usage, cost_per_mtok_usd=target.cost_per_mtok_usd,
                )
            )
            self._judge(routing, target, verdict, reason)
            if verdict.action == OK:
                return verdict.answer  # type: ignore[no-any-return]
            wait_s = None
            if (
                verdict.action == RETRY
                and tries <= target.retries
                and self._health.cooling_for(target.key) == 0  # else this failure cooled it: a retry would hammer it
                and not self._out_of_budget(routing, attempts, deadline)
            ):
                wait_s = self._retry_wait_s(routing, tries, verdict.retry_after_s, deadline - time.monotonic())
            log.warning(
                "attempt on %s (backend %s, model %s) failed: %s (%s); next: %s",
                target.alias, target.backend_name, target.model, verdict.outcome, reason,
                "stop" if verdict.action == STOP else f"retry in {wait_s:.2g} s" if wait_s is not None else "move on",
            )
            if verdict.action == STOP:
                assert verdict.error is not None
                raise self._stop_error(target, verdict, body, attempts)
            if wait_s is None:
                if verdict.retry_after_s:
                    # Moving on from a target that asked for a pause: other requests honour it too.
                    pause_s = min(verdict.retry_after_s, routing.cooldown_s)
                    self._health.pause(target.key, f"{verdict.outcome}: asked to wait {verdict.retry_after_s:g} s", pause_s)
                return None
            await asyncio.sleep(wait_s)

    def _judge(self, routing: RoutingConfig, target: Target, verdict: Verdict, reason: str) -> None:
        """Tell the health board what this call says about the target."""
        if verdict.action in (OK, STOP) or verdict.outcome in ANSWERED_OUTCOMES:
            self._health.succeeded(target.key)
        else:
            self._health.failed(
                target.key,
                f"{verdict.outcome}: {reason}",
                failures_to_cool=routing.cooldown_failures,
                cooldown_s=routing.cooldown_s,
            )

    @staticmethod
    def _retry_wait_s(routing: RoutingConfig, tries: int, retry_after: float | None, remaining_s: float) -> float | None:
        """How long to wait before retrying the same target, or None to move on instead."""
        if retry_after is not None:
            # Honour the upstream's wish when it fits; a longer wait is better spent on the next target.
            if retry_after <= routing.retry_after_max_s and retry_after < remaining_s:
                return retry_after
            return None
        base_s = min(routing.backoff_s * (2 ** (tries - 1)), routing.backoff_max_s)
        wait_s = base_s * random.uniform(0.5, 1.5)
        return wait_s if wait_s < remaining_s else None

    @staticmethod
    def _stop_error(target: Target, verdict: Verdict, body: Mapping[str, Any], attempts: list[Attempt]) -> GatewayError:
        error = verdict.error
        assert error is not None
        message = target.in_client_words(error.message)
        # Point at the upstream's `param` only when it names a field the client sent.
        at: Location | None = (error.at[0],) if error.at and error.at[0] in body else None
        stop = GatewayError(error.code, message, at=at, status=error.status)
        stop.headers["x-gateway-attempts"] = str(calls_made(attempts))
        return stop

    # ------------------------------------------------------------ one attempt

    async def _attempt_complete(self, target: Target, payload: RequestBody, deadline: float) -> Verdict:
        slot = await self._slots.acquire(target, deadline - time.monotonic())
        try:
            return await self._call_complete(target, payload, deadline)
        finally:
            slot.release()

    async def _call_complete(self, target: Target, payload: RequestBody, deadline: float) -> Verdict:
        now = time.monotonic()
        budget_s = min(target.timeouts.total_s, deadline - now)
        ends_at = now + budget_s
        try:
            # A non-streaming answer's headers come with the finished answer: only the total bounds them.
            stream = await self._client.open(target, payload, wait_s=budget_s, ends_at=ends_at)
        except UpstreamFault as fault:
            if fault.kind == "first_byte_timeout":
                return Verdict(MOVE_ON, "timeout", f"no answer within {budget_s:.3g} s")
            return fault_verdict(fault)
        try:
            if stream.status != 200:
                return status_verdict(stream.status, stream.headers, await self._error_body(stream), target.secrets)
            raw = await stream.read(MAX_ANSWER_BYTES + 1, within_s=math.inf)
            if len(raw) > MAX_ANSWER_BYTES:
                return Verdict(MOVE_ON, "too_large", f"the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB")
        except UpstreamFault as fault:
            return fault_verdict(fault)
        finally:
            await stream.aclose()
        return answer_verdict(target, raw)

    async def _error_body(self, stream: UpstreamStream) -> bytes:
        try:
            return await stream.read(MAX_ERROR_BODY_BYTES, within_s=ERROR_BODY_WAIT_S)
        except UpstreamFault:
            return b""

    async def _attempt_stream(self, target: Target, payload: RequestBody, deadline: float) -> Verdict:
        slot = await self._slots.acquire(target, deadline - time.monotonic())
        try:
            verdict = await self._call_stream(target, payload, deadline)
        except BaseException:
            slot.release()
            raise
        if verdict.action == OK:
            verdict.answer.slot = slot  # held until the stream ends
        else:
            slot.release()
        return verdict

    async def _call_stream(self, target: Target, payload: RequestBody, deadline: float) -> Verdict:
        now = time.monotonic()
        budget_s = min(target.timeouts.total_s, deadline - now)
        ends_at = now + budget_s
        # One window from sending the request to the first real chunk, headers included.
        first_byte_by = now + min(target.timeouts.first_byte_s, budget_s)
        try:
            stream = await self._client.open(target, payload, wait_s=first_byte_by - now, ends_at=ends_at)
        except UpstreamFault as fault:
            return fault_verdict(fault)
        handed_over = False
        try:
            if stream.status != 200:
                return status_verdict(stream.status, stream.headers, await self._error_body(stream), target.secrets)
            verdict = await self._hold(target, stream, first_byte_by)
            handed_over = verdict.action == OK
            return verdict
        finally:
            if not handed_over:
                await stream.aclose()

    async def _hold(self, target: Target, stream: UpstreamStream, first_byte_by: float) -> Verdict:
        """Read until the first real chunk (an image-output alias: its first image) arrives.

        Until then nothing has reached the client, so any failure can still move on.
        """
        decoder = SSEDecoder()
        held: list[bytes | None] = []
        answering = False
        has_image = not target.image_output
        finished = False
        # The bytes read while no event has held data: a body that is no event stream (a whole answer,
        # an error) is judged below as it came, blank lines and all.
        prelude: bytearray | None = bytearray()
        try:
            while not finished:
                within_s = None if answering else first_byte_by - time.monotonic()
                chunk = await stream.next_chunk(within_s)
                finished = chunk is None
                if prelude is not None and chunk is not None:
                    prelude += chunk
                    if len(prelude) > MAX_ANSWER_BYTES:
                        prelude = None  # as large as no answer may be: an endless stream of blank events
                for data in decoder.feed(chunk) if chunk is not None else decoder.finish():
                    if data is not None:
                        prelude = None
                    held.append(data)
                    if data is None or (answering and has_image):
                        continue  # past the first real chunk the relay reads the events, once
                    if data.strip() == DONE:
                        finished = True
                        break
                    try:
                        event = decode_answer(data)
                    except (msgspec.DecodeError, RecursionError):
                        continue  # one malformed chunk is dropped (the relay counts it), not fatal
                    if isinstance(event, dict) and event.get("error") is not None:
                        return error_event_verdict(data, target.secrets)
                    answering = answering or _is_real_chunk(event)
                    has_image = has_image or _has_image_delta(event)
                if answering and has_image:
                    return Verdict(OK, "ok", "", answer=StreamStart(target, stream, decoder, held, [], finished))
        except UpstreamFault as fault:
            return fault_verdict(fault)
        if answering:
            return Verdict(MOVE_ON, "no_image", "the stream ended without an image")
        rest = bytes(prelude).strip() if prelude is not None else b""
        if rest and not looks_like_event_stream(rest):
            # Not an event stream at all: an error body sent with status 200, or the whole answer (some
            # upstreams ignore `stream`), which is relayed as the stream it would have been.
            verdict = answer_verdict(target, rest)
            if verdict.action == OK:
                answer = verdict.answer.answer
                return Verdict(OK, "ok", "", answer=StreamStart(target, stream, decoder, completion_as_events(answer), [], True))
            return verdict if verdict.outcome != "invalid_json" else answer_verdict(target, rest, streaming=True)
        return Verdict(RETRY, "empty_stream", "the stream ended before any answer")


def fault_verdict(fault: UpstreamFault) -> Verdict:
    if fault.kind in TIMEOUT_OUTCOMES or fault.lasting:
        # Retrying would double the wait, or meet the same refusal (a certificate, a proxy's no): move on.
        return Verdict(MOVE_ON, fault.kind, fault.detail)
    return Verdict(RETRY, fault.kind, fault.detail)


def status_verdict(status: int, headers: Mapping[str, str], body: bytes, secrets: Iterable[str] = ()) -> Verdict:
    return info_verdict(status, read_upstream_error(body, status, secrets), retry_after_s(headers))


def error_event_verdict(data: bytes, secrets: Iterable[str] = ()) -> Verdict:
    """An ``{"error": ...}`` event before the first real chunk, judged like the status it names."""
    info = read_upstream_error(data, secrets=secrets)
    status = info.numeric_code if info.numeric_code is not None and 400 <= info.numeric_code < 600 else 502
    verdict = info_verdict(status, info, None)
    return attrs.evolve(verdict, outcome=f"error_event {verdict.outcome}")


def info_verdict(status: int, info: UpstreamErrorInfo, retry_after: float | None) -> Verdict:
    outcome = str(status)
    if info.is_context_length:
        return Verdict(MOVE_ON, "context_length", info.reason)
    if status in TRANSIENT_STATUSES or status >= 500:
        return Verdict(RETRY, outcome, info.reason, retry_after_s=retry_after)
    if status in REQUEST_STATUSES or (status in FILTER_STATUSES and info.is_content_filter):
        what = f"HTTP {status}" + (f", {info.code}" if info.code and info.code != str(status) else "")
        at: Location | None = (info.param,) if info.param else None
        error = GatewayError("upstream_rejected", f"The model refused the request ({what}): {info.reason}", at=at, status=status)
        return Verdict(STOP, outcome, info.reason, error=error)
    if 400 <= status < 500:
        return Verdict(MOVE_ON, outcome, info.reason)
    return Verdict(RETRY, outcome, f"unexpected status: {info.reason}")


def answer_verdict(target: Target, raw: bytes, *, streaming: bool = False) -> Verdict:
    """Judge a 200 answer's body: a chat completion, an error in disguise, or junk."""
    try:
        answer = decode_answer(raw)
    except (msgspec.DecodeError, RecursionError):
        answer = None
        if not streaming and looks_like_event_stream(raw):
            # An event stream answered to a plain request (some upstreams ignore `stream`): what it adds up to.
            folded = events_as_completion(raw)
            if folded.error is not None:
                return error_event_verdict(folded.error, target.secrets)
            if folded.answer is None:
                return Verdict(RETRY, "invalid_stream", "the event stream ends before its answer does")
            answer = folded.answer
    if isinstance(answer, dict) and answer.get("error") is not None and not isinstance(answer.get("choices"), list):
        # Some providers answer 200 with an error object: judge it as the status it names.
        verdict = error_event_verdict(raw, target.secrets)
        return attrs.evolve(verdict, outcome=verdict.outcome.replace("error_event", "error_body"))
    if streaming:
        return Verdict(RETRY, "invalid_stream", "the answer is not an event stream")
    if answer is None:
        return Verdict(RETRY, "invalid_json", "the answer is not JSON")
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        return Verdict(RETRY, "invalid_json", "the answer is not a chat completion")
    if target.image_output:
        gather_content_images(answer)
        if not holds_image(message_images(answer)):
            return Verdict(MOVE_ON, "no_image", "the answer holds no image (as a data URI of image bytes)", usage=answer.get("usage"))
    return Verdict(OK, "ok", "", answer=Served(target, answer, []))


def exhausted_error(alias: str, attempts: list[Attempt], health: HealthBoard, targets: tuple[Target, ...]) -> GatewayError:
    """The one error a client gets when no target of the plan answered, with how many calls were made,
    and, for a 5xx, when to come back or that coming back would not help."""
    error = _exhaustion(alias, attempts, health, targets)
    error.headers["x-gateway-attempts"] = str(calls_made(attempts))
    if error.status >= 500 and "retry-after" not in error.headers:
        busy = next((a.refusal for a in attempts if a.refusal is not None), None)
        wait_s = min((health.cooling_for(t.key) for t in targets if t.configured), default=0.0)
        if busy is not None:
            # A target was only busy: it serves once a slot frees, as its refusal said.
            error.headers.update({k: v for k, v in busy.headers.items() if k.startswith("retry-after")})
        elif wait_s > 0:
            # Every target is cooling down, or paused as its upstream asked: the client may come back then.
            error.headers["retry-after"] = str(math.ceil(wait_s))
        else:
            # The plan's own retries and fallbacks were made: a client's retry (the openai SDK makes two
            # of a 5xx unless told not to) would only make the same calls again, each of them paid.
            error.headers["x-should-retry"] = "false"
    return error


def _exhaustion(alias: str, attempts: list[Attempt], health: HealthBoard, targets: tuple[Target, ...]) -> GatewayError:
    called = [a for a in attempts if a.called]
    outcomes = {a.outcome for a in called}
    summary = "; ".join(a.describe() for a in attempts) or "no target could be tried"
    if not called:
        busy = [a.refusal for a in attempts if a.refusal is not None]
        if busy:
            # Every target that could be tried was at its max_concurrency: the client waits and retries.
            return GatewayError(busy[0].code, busy[0].message, headers=busy[0].headers)
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
            headers={"retry-after": str(max(1, math.ceil(wait_s)))},
        )
    if outcomes == {"context_length"}:
        return GatewayError(
            "context_length_exceeded",
            f"The messages do not fit the context window of any target of '{alias}' ({summary}).",
            at=("messages",),
        )
    if outcomes == {"no_image"}:
        return GatewayError("no_image_generated", f"No target of '{alias}' answered with an image ({summary}).")
    if outcomes <= TIMEOUT_OUTCOMES:
        return GatewayError("upstream_timeout", f"No target of '{alias}' answered in time ({summary}).")
    return GatewayError("upstream_error", f"Every target of '{alias}' failed: {summary}.")
