"""The completion pipeline behind ``POST /v1/chat/completions`` (and ``/c1/chat``).

One request, one way through:
1. read the serving snapshot once; authenticate;
2. read the body under ``max_request_bytes``; decode JSON once;
3. (``/c1/chat``) rebuild the chat body, keeping a map back to the c1 body;
4. inspect the request (shape, images) and check the alias's generated rules;
5. plan the attempts (members that cannot serve it are skipped) and dispatch;
6. answer: JSON with ``model`` = the serving alias, or an SSE relay.
Any ``GatewayError`` becomes the envelope, its location mapped back into the
body the client sent; anything unexpected becomes 500 ``internal_error`` with
the request id, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from gateway.admission import NO_TICKET, Admission, AdmitAll, Ticket
from gateway.api.edge import (
    JSON_HEADERS,
    ClientGone,
    Headers,
    OverdueCutoff,
    StalledBodies,
    cancelled_on_disconnect,
    declared_length,
    header,
    read_body,
    send_bytes,
    send_error,
    send_stream,
)
from gateway.bulk import inspect_in_place
from gateway.chunks import Chunks
from gateway.dispatch import Attempt, Dispatcher
from gateway.errors import GatewayError, Location, nested_too_deeply
from gateway.facts import inspect_request
from gateway.metrics import Metrics
from gateway.relay import StreamRelay, asked_choices, relay_stream
from gateway.reload import SnapshotHolder
from gateway.routing import plan_attempts
from gateway.shaping import KeptBody, client_body

log = logging.getLogger("gateway.completions")

# A translator turns the decoded body of another endpoint into a chat body, and
# returns how to map a location in the chat body back into the original body.
Translator = Callable[[Any], tuple[Any, Callable[[Location], Location | None]]]

_decode = msgspec.json.Decoder().decode


# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or the reverse, after an even run
# of backslashes (an odd run escapes the backslash itself).
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)


_BOM = b"\xef\xbb\xbf"
# How long past its total time a stream may still be sending (its last event, an error) before
# the client is taken for one that stopped reading.
STALLED_CLIENT_GRACE_S = 1.0


def decode_body(data: bytes | bytearray | memoryview, scope: Mapping[str, Any], *, after_bom: bool = False) -> Any:
    """The client's JSON, or an error with a reason the client can act on."""
    try:
        return _decode(data)
    except RecursionError:
        raise nested_too_deeply() from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 in strings raise the latter
        reason = str(exc)  # not the exception: its traceback would hold this frame, and so the body
    # Looked into only once the body failed: the common case pays nothing.
    encoding = header(scope, b"content-encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise GatewayError(
            "unsupported_content_encoding",
            f"The body is sent with Content-Encoding: {encoding[:40]}, which the gateway does not decode; send the JSON uncompressed.",
            headers={"Accept-Encoding": "identity"},
        )
    if bytes(data[:3]) == _BOM and not after_bom:
        # RFC 8259 lets a reader ignore a byte-order mark; some Windows tools write one. One:
        # a second is not JSON, and skipping marks one call each would let a body exhaust the stack.
        return decode_body(memoryview(data)[3:], scope, after_bom=True)
    if reason.startswith("Number out of range"):
        # Valid JSON (RFC 8259 leaves the range to the reader), so not invalid_json.
        raise GatewayError(
            "invalid_request",
            "The body holds a number beyond what the gateway reads, a 64-bit float (up to about 1.8e308): "
            "send it within that range, or as a string.",
        )
    raise GatewayError("invalid_json", f"The body is not valid JSON: {_json_fault(reason, data)}.")


def _json_fault(reason: str, data: bytes | bytearray | memoryview) -> str:
    # msgspec calls a lone surrogate "truncated"; JavaScript's JSON.stringify writes one for a
    # string cut inside an emoji, so say what it is.
    lone = _LONE_SURROGATE.search(data)
    if lone is not None:
        escape = lone.group(1).decode()
        return f"{escape} at byte {lone.start(1)} is half of a UTF-16 surrogate pair (text cut inside a character, such as an emoji); send both halves or neither"
    return reason


def count_attempts(metrics: Metrics, attempts: list[Attempt]) -> None:
    """Count a plan's attempts, whatever became of the request (``Dispatcher``'s ``on_attempts``), and
    the tokens of the answers it threw away, which the upstreams charged for."""
    for attempt in attempts:
        metrics.inc("gateway_attempts_total", alias=attempt.alias, backend=attempt.backend, outcome=attempt.outcome)
        if attempt.usage is not None:
            count_usage(metrics, attempt.alias, attempt.cost_per_mtok_usd, attempt.usage)


def count_usage(metrics: Metrics, alias: str, cost_per_mtok_usd: float | None, usage: Any) -> None:
    """An upstream's reported usage, in tokens and estimated cost, for the alias that answered."""
    if not isinstance(usage, dict):
        return
    tokens = 0
    for kind in ("prompt_tokens", "completion_tokens"):
        value = usage.get(kind)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            metrics.inc("gateway_tokens_total", value, alias=alias, kind=kind)
            tokens += value
    if cost_per_mtok_usd is not None and tokens:
        metrics.inc("gateway_estimated_cost_usd_total", tokens * cost_per_mtok_usd / 1e6, alias=alias)


def request_id(scope: dict[str, Any]) -> str:
    return scope.get("gateway_request_id", "-")  # type: ignore[no-any-return]


def served_headers(served_alias: str, attempts: list[Attempt]) -> Headers:
    calls = sum(1 for a in attempts if a.called)
    return [(b"x-gateway-served-by", served_alias.encode()), (b"x-gateway-attempts", str(calls).encode())]


class CompletionService:
    def __init__(self, holder: SnapshotHolder, dispatcher: Dispatcher, metrics: Metrics, admission: Admission | None = None) -> None:
        self.holder = holder
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.admission = admission or AdmitAll()
        self.stalls = StalledBodies()

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any, translate: Translator | None = None) -> None:
        started = time.monotonic()
        relocate: Callable[[Location], Location | None] = lambda at: at
        alias_name = "-"
        named = scope.get("gateway_request_id")
        id_header: Headers = [(b"x-request-id", named.encode("latin-1"))] if named else []
        ticket: Ticket = NO_TICKET
        try:
            if scope.get("method") != "POST":
                raise GatewayError("method_not_allowed", f"{scope.get('path')} does not take {scope.get('method')}. It takes POST.", headers={"Allow": "POST"})
            snapshot = self.holder.current
            if snapshot is None:
                raise GatewayError("config_not_loaded", "No valid configuration is loaded; `gateway check` says why.")
            identity = self.holder.keys.authenticate(header(scope, b"authorization"))
            server = snapshot.config.server
            raw = await read_body(receive, server.max_request_bytes, declared_length(scope), self.stalls, server.body_timeout_s)
            # A large body comes as Chunks: a chat body is kept to splice `model` into
            # (shaping.upstream_body), and decoded around its images (bulk).
            kept = inspected = None
            if isinstance(raw, Chunks) and translate is None:
                inspected = inspect_in_place(raw)
                if inspected is None:
                    # Decoded whole below: joined once, and the splice reads that copy, so the pieces can go.
                    raw = Chunks((raw.tobytes(),))
                kept = KeptBody(raw, inspected.strings if inspected is not None else None)
            if inspected is not None:
                body, facts = inspected.body, inspected.facts
            else:
                body = decode_body(raw.tobytes() if isinstance(raw, Chunks) else raw, scope)
                if translate is not None:
                    body, relocate = translate(body)
                facts = inspect_request(body)
            del raw
            if facts.model in snapshot.aliases:
                alias_name = facts.model  # counted by the alias, also when this key may not use it
            alias = snapshot.lookup(facts.model, identity.may_use)
            alias.rules.check(facts)
            targets = plan_attempts(alias, facts, identity.may_use if identity.allowed_models is not None else None)
            ticket = await self.admission.admit(identity, alias, facts)
            async with cancelled_on_disconnect(receive) as watch:
                if facts.stream:
                    await self._stream(send, alias, targets, body, kept, ticket, id_header, started, watch)
                else:
                    await self._complete(send, alias, targets, body, kept, ticket, id_header, started)
            return
        except GatewayError as error:
            if error.at is not None:
                error = error.relocated(relocate(error.at))
            self.metrics.inc("gateway_requests_total", alias=alias_name, status=str(error.status))
            # Counted against its rates, a failed request says so as a served one does.
            await self._send_error(send, error, [*ticket.headers, *id_header])
        except ClientGone:
            self.metrics.inc("gateway_requests_total", alias=alias_name, status="499")
        except Exception:
            rid = request_id(scope)
            log.exception("unexpected fault in request %s", rid)
            self.metrics.inc("gateway_requests_total", alias=alias_name, status="500")
            await self._send_error(send, GatewayError("internal_error", f"An unexpected fault in the gateway (request id {rid})."), id_header)

    @staticmethod
    async def _send_error(send: Any, error: GatewayError, extra: Headers) -> None:
        try:
            await send_error(send, error, extra)
        except ClientGone:
            pass  # nobody left to tell

    async def _complete(
        self, send: Any, alias: Any, targets: Any, body: Any, kept: KeptBody | None, ticket: Ticket, extra: Headers, started: float
    ) -> None:
        try:
            served = await self.dispatcher.complete(alias, targets, body, kept)
        except BaseException as exc:
            self._unanswered(ticket, alias.name, exc)
            raise
        usage = served.answer.get("usage")
        ticket.settle(usage if isinstance(usage, dict) else None)
        self._count(alias.name, served.target, usage)
        out = client_body(served.answer, served.target.alias)  # read deeper in the stack than this: no RecursionError
        headers = [*JSON_HEADERS, *served_headers(served.target.alias, served.attempts), *ticket.headers, *extra]
        await send_bytes(send, 200, out, headers)
        self._observe(alias.name, "false", started)

    async def _stream(
        self,
        send: Any,
        alias: Any,
        targets: Any,
        body: Any,
        kept: KeptBody | None,
        ticket: Ticket,
        extra: Headers,
        started: float,
        watch: cancelled_on_disconnect,
    ) -> None:
        try:
            start = await self.dispatcher.open_stream(alias, targets, body, kept)
        except BaseException as exc:
            self._unanswered(ticket, alias.name, exc)
            raise
        served_alias = start.target.alias
        # The first event is in hand: it leaves with the head, below.
        self.metrics.observe("gateway_first_byte_seconds", time.monotonic() - started, alias=served_alias)
        options = body.get("stream_options")
        relay = StreamRelay(
            served_alias,
            lambda: self.metrics.inc("gateway_stream_malformed_chunks_total", alias=served_alias),
            expect_usage=isinstance(options, dict) and options.get("include_usage") is True,
            secrets=start.target.secrets,
            image_output=start.target.image_output,
            choices=asked_choices(body),
        )
        try:
            headers = [*served_headers(served_alias, start.attempts), *ticket.headers, *extra]
            # By its total time the relay has ended the stream itself; still sending a little later,
            # the client is not reading, and must not hold the upstream call and its slot.
            with OverdueCutoff(start.stream.ends_at + STALLED_CLIENT_GRACE_S - time.monotonic()):
                await send_stream(send, relay_stream(start, relay), headers)
            watch.answered()
        finally:
            # Counted before the upstream connection is drained, which a disconnect may still cut short.
            ticket.settle(relay.usage)
            self._count(alias.name, start.target, relay.usage)
            self._observe(alias.name, "true", started)
            await start.aclose(answered=relay.done)

    def _observe(self, requested: str, stream: str, started: float) -> None:
        """Time a served request (one counted 200): a client that left before its answer began waited for
        nothing, and its wait is no latency of the gateway's."""
        self.metrics.observe("gateway_request_seconds", time.monotonic() - started, alias=requested, stream=stream)

    def _unanswered(self, ticket: Ticket, requested: str, fault: BaseException) -> None:
        """Settle the rates of a request that got no answer, and count it if its client left."""
        if isinstance(fault, GatewayError) and (fault.code == "concurrency_limit_exceeded" or fault.headers.get("x-gateway-attempts") == "0"):
            # No call was made (every backend full, cooling down or unconfigured): it must not use up the rates.
            ticket.refund()
        else:
            ticket.settle(None)
        # Cancelled before the answer began: the client left (or the worker is stopping), and
        # the block that cancelled this ends quietly, counting nothing. Once the answer has
        # begun, it counts as its head's 200 (README, metrics).
        if isinstance(fault, asyncio.CancelledError):
            self.metrics.inc("gateway_requests_total", alias=requested, status="499")

    def _count(self, requested: str, target: Any, usage: Any) -> None:
        self.metrics.inc("gateway_requests_total", alias=requested, status="200")
        count_usage(self.metrics, target.alias, target.cost_per_mtok_usd, usage)
