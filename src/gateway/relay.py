"""Relay an upstream stream to the client, event by event (SPEC §6).

Each ``data:`` event is decoded once, gets the serving alias as its ``model``
(and sniffed image types), and is re-encoded. A malformed chunk is dropped and
counted. After the first byte has gone to the client a fault cannot fall back:
a cut, an idle gap or an upstream error event ends the stream with one
``data: {"error": ...}`` event and no ``[DONE]``, so a truncated answer never
looks complete. An upstream that ends without ``[DONE]`` after its finish
reason is finalised at once with ``[DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from gateway.dispatch import StreamStart
from gateway.errors import GatewayError
from gateway.shaping import encode, fix_images
from gateway.sse import DONE, DONE_EVENT, data_event
from gateway.upstream import UpstreamFault
from gateway.upstream_errors import read_upstream_error

log = logging.getLogger("gateway.relay")

_decode = msgspec.json.Decoder().decode


class _Finished(Exception):
    pass


def error_event(error: GatewayError) -> bytes:
    return data_event(encode(error.envelope()))


class StreamRelay:
    """Turns upstream event data into client SSE bytes; remembers finish and usage."""

    def __init__(self, served_alias: str, on_malformed: Callable[[], None]) -> None:
        self.served_alias = served_alias
        self.saw_finish = False
        self.usage: dict[str, Any] | None = None
        self._on_malformed = on_malformed

    def render(self, data: bytes | None) -> bytes | None:
        if data is None:
            return None
        if data.strip() == DONE:
            raise _Finished
        try:
            event = _decode(data)
        except msgspec.DecodeError:
            self._on_malformed()
            return None
        if not isinstance(event, dict):
            self._on_malformed()
            return None
        if "error" in event:
            info = read_upstream_error(data)
            raise GatewayError("upstream_error", f"The upstream failed mid-stream: {info.reason}")
        event["model"] = self.served_alias
        for choice in event.get("choices") or ():
            if isinstance(choice, dict):
                if choice.get("finish_reason"):
                    self.saw_finish = True
                delta = choice.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("images"), list):
                    fix_images(delta["images"])
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        return data_event(encode(event))


async def relay_stream(start: StreamStart, relay: StreamRelay) -> AsyncIterator[bytes]:
    """Yield the client's SSE bytes; the caller closes ``start.stream`` on every path."""
    try:
        for data in start.held:
            out = relay.render(data)
            if out is not None:
                yield out
        if not start.finished:
            while (chunk := await start.stream.next_chunk()) is not None:
                for data in start.decoder.feed(chunk):
                    out = relay.render(data)
                    if out is not None:
                        yield out
    except _Finished:
        yield DONE_EVENT
        return
    except UpstreamFault as fault:
        code = "upstream_timeout" if fault.kind == "idle_timeout" else "upstream_error"
        log.warning("stream from %s cut after the first byte: %s", relay.served_alias, fault)
        yield error_event(GatewayError(code, f"The upstream stream broke off ({fault.kind}: {fault.detail}); the answer is incomplete."))
        return
    except GatewayError as error:
        yield error_event(error)
        return
    if relay.saw_finish:
        yield DONE_EVENT
    else:
        yield error_event(GatewayError("upstream_error", "The upstream ended the stream before finishing; the answer is incomplete."))
