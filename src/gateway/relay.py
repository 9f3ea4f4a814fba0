"""Relay an upstream stream to the client, event by event (SPEC §6).

How it works:
1. The events the dispatcher held (up to the first real chunk) go first, then
   the rest of the upstream stream as it arrives. Each ``data:`` event is
   decoded once, gets the serving alias as its ``model`` and sniffed image
   types, and is re-encoded; comments and keep-alives are not forwarded.
   Events read from the upstream at once go to the client in one write.
2. A malformed chunk is dropped, logged and counted; the stream goes on.
3. After the first byte has gone to the client a fault cannot fall back: a cut,
   an idle gap, the total running out, or an upstream error event ends the
   stream with one ``data: {"error": ...}`` event and no ``[DONE]``, so a
   truncated answer never looks complete.
4. An upstream that ends without ``[DONE]`` is finalised with ``[DONE]`` when
   its answer is complete (every choice has its finish reason); once the answer
   is complete and its usage is in (or was not asked for), the relay waits only
   ``TAIL_GRACE_S`` for the end, so a missing ``[DONE]`` never holds the client.
   An answer that ends unfinished is an error, as in 3.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import msgspec

from gateway.dispatch import StreamStart
from gateway.errors import GatewayError
from gateway.shaping import choices_of, decode_answer, encode, fix_images, gather_part_images
from gateway.sse import DONE, DONE_EVENT, data_event
from gateway.upstream import UpstreamFault
from gateway.upstream_errors import read_upstream_error, scrub

log = logging.getLogger("gateway.relay")

# How long a complete answer may wait for its upstream's end (usage, [DONE]).
TAIL_GRACE_S = 1.0



def error_event(error: GatewayError) -> bytes:
    return data_event(encode(error.envelope()))


def asked_choices(body: Mapping[str, Any]) -> int:
    """How many choices the request asks for (``n``; the rules checked its type)."""
    n = body.get("n")
    return n if type(n) is int and n > 1 else 1


class StreamRelay:
    """Turns upstream event data into client SSE bytes; remembers finish reasons and usage."""

    def __init__(
        self,
        served_alias: str,
        on_malformed: Callable[[], None],
        *,
        expect_usage: bool = False,
        secrets: tuple[str, ...] = (),
        image_output: bool = False,
        choices: int = 1,
    ) -> None:
        self.served_alias = served_alias
        self.choices = choices  # how many the client asked for (``n``): the tail's grace waits for each
        self.image_output = image_output  # images sent as content parts join the delta's images
        self.secrets = secrets  # the target's: kept out of what is logged and relayed
        self.usage: dict[str, Any] | None = None
        self.expect_usage = expect_usage
        self.done = False  # the upstream said [DONE]
        self._choices: set[int] = set()
        self._finished_choices: set[int] = set()
        self._on_malformed = on_malformed

    @property
    def saw_finish(self) -> bool:
        """Every choice the upstream started has its finish reason: what it sent is a whole answer."""
        return bool(self._finished_choices) and self._choices <= self._finished_choices

    @property
    def complete(self) -> bool:
        """Nothing more is needed from the upstream: finished, with usage when it was asked for."""
        # Each choice asked for (``n``): another may still come after the first ones finished. An upstream
        # that ignores ``n`` ends with [DONE], or its end or an idle timeout ends a whole answer.
        finished_all = len(self._finished_choices) >= self.choices
        return self.saw_finish and finished_all and (self.usage is not None or not self.expect_usage)

    def render_all(self, events: list[bytes | None]) -> tuple[bytes, GatewayError | None]:
        """The client's bytes for events that arrived together, up to [DONE]; and an upstream error among them.

        One write for the lot, as each write to the client is a hand-off to the
        server's I/O thread. What was rendered before an error event is
        returned with it, so it still goes out first.
        """
        out: list[bytes] = []
        try:
            for data in events:
                rendered = self.render(data)
                if rendered is not None:
                    out.append(rendered)
                if self.done:
                    break
        except GatewayError as error:
            # A value from here on: its traceback would tie the caller's frame, which holds it, in a cycle.
            return b"".join(out), error.with_traceback(None)
        return b"".join(out), None

    def render(self, data: bytes | None) -> bytes | None:
        if data is None:
            return None  # a comment or keep-alive: nothing for the client
        if data.strip() == DONE:
            self.done = True
            return DONE_EVENT
        try:
            event = decode_answer(data)
        except (msgspec.DecodeError, RecursionError):
            event = None
        if not isinstance(event, dict):
            log.warning("dropped a malformed chunk from %s: %s", self.served_alias, scrub(repr(data[:200]), self.secrets)[:120])
            self._on_malformed()
            return None
        if event.get("error") is not None:
            info = read_upstream_error(data, secrets=self.secrets)
            raise GatewayError("upstream_error", f"The model failed mid-answer: {info.reason}. The answer is incomplete.")
        event["model"] = self.served_alias
        for choice in choices_of(event):
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                self._choices.add(index if isinstance(index, int) else 0)
                if choice.get("finish_reason"):
                    self._finished_choices.add(index if isinstance(index, int) else 0)
                delta = choice.get("delta")
                if delta is None and isinstance(choice.get("message"), dict):
                    delta = choice["delta"] = choice.pop("message")  # a whole message in one event: a stream says delta
                if self.image_output:
                    gather_part_images(delta)
                if isinstance(delta, dict) and isinstance(delta.get("images"), list):
                    fix_images(delta["images"])
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        # No RecursionError to fear here: msgspec writes a little deeper than it reads, from the same frame.
        return data_event(encode(event))


async def relay_stream(start: StreamStart, relay: StreamRelay) -> AsyncGenerator[bytes, None]:
    """Yield the client's SSE bytes; the caller closes ``start.stream`` on every path."""
    stream, decoder = start.stream, start.decoder
    secrets = start.target.secrets
    try:
        rendered, upstream_error = relay.render_all(start.held)
        ended = start.finished
        while True:
            if rendered:
                yield rendered
            if upstream_error is not None:
                # Answered here, not raised: this frame holds it, and its traceback would hold this frame.
                message = start.target.in_client_words(upstream_error.message)
                log.warning("stream from %s ended by an upstream error: %s", relay.served_alias, message)
                yield error_event(GatewayError(upstream_error.code, message))
                return
            if relay.done:
                return
            if ended:
                break
            try:
                chunk = await stream.next_chunk(TAIL_GRACE_S if relay.complete else None)
            except UpstreamFault:
                if relay.saw_finish:
                    break  # the answer is whole; only its end (or usage) went missing
                raise
            ended = chunk is None
            rendered, upstream_error = relay.render_all(decoder.feed(chunk) if chunk is not None else decoder.finish())
    except UpstreamFault as fault:
        code = "upstream_timeout" if fault.kind in ("idle_timeout", "timeout") else "upstream_error"
        detail = scrub(f"{fault.kind}: {fault.detail}", secrets)
        log.warning("stream from %s broke off after the first byte: %s", relay.served_alias, detail)
        yield error_event(GatewayError(code, f"The model's stream broke off ({detail}); the answer is incomplete."))
        return
    if relay.saw_finish:
        if not start.finished:
            log.info("stream from %s ended without [DONE]; finalised", relay.served_alias)
        yield DONE_EVENT
    else:
        yield error_event(GatewayError("upstream_error", "The model's stream ended before the answer was finished; the answer is incomplete."))
