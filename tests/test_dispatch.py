"""Unit tests of plans, dispatch, health and the stream relay, over an httpx MockTransport.

The integration fault matrix (tests/test_faults.py) runs the same behaviour
against the real stand-in and gateway processes; here every branch is pinned
down fast, with timeouts of a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.dispatch import Dispatcher, Served, StreamStart
from gateway.errors import GatewayError
from gateway.facts import inspect_request
from gateway.health import HealthBoard
from gateway.relay import TAIL_GRACE_S, StreamRelay, asked_choices, relay_stream
from gateway.routing import plan_attempts
from gateway.shaping import client_body
from gateway.snapshot import Snapshot, Target, build_snapshot
from gateway.sse import SSEDecoder
from gateway.upstream import UpstreamClient

SECRET = "sk-unit-secret-key-0123456789"
HOST = "upstream.internal:9000"
BASE_URL = f"http://user:hunter2@{HOST}/v1"
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"

Step = Callable[[dict[str, Any]], Awaitable[httpx.Response]]


# A target cools down at its first failure; it can make no retry then, which models.toml says outright.
COOL_AT_ONCE = "cooldown_failures = 1\n[defaults]\nretries = 0\n"


def config_text(models: str, routing: str = "") -> str:
    return (
        "[routing]\nbackoff_s = 0.02\nbackoff_max_s = 0.05\ncooldown_s = 0.4\n" + routing + "\n"
        f'[backends.b]\nbase_url = "{BASE_URL}"\napi_key_env = "UNIT_KEY"\n'
        "timeout_s = 1\nfirst_byte_timeout_s = 0.3\nidle_timeout_s = 0.3\n\n" + models
    )


def snapshot_of(models: str, routing: str = "") -> Snapshot:
    return build_snapshot(parse_config(config_text(models, routing).encode()), environ={"UNIT_KEY": SECRET})


def alias(name: str, model: str | None = None, **keys: Any) -> str:
    lines = [f'[models."{name}"]', 'backend = "b"', f'model = "{model or name}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


class CountingStream(httpx.AsyncByteStream):
    """A response body from timed pieces that records whether the reader closed it."""

    def __init__(self, pieces: list[tuple[float, bytes]], closed: list[int]) -> None:
        self._pieces = pieces
        self._closed = closed

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for delay_s, piece in self._pieces:
            if delay_s:
                await asyncio.sleep(delay_s)
            yield piece

    async def aclose(self) -> None:
        self._closed.append(1)


class FakeUpstream:
    """Scripted answers per upstream model id; the last step repeats. Records call times."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Step]] = {}
        self.calls: list[tuple[str, float]] = []
        self.headers: list[httpx.Headers] = []
        self.closed: list[int] = []

    def script(self, model: str, *steps: Step) -> None:
        self.scripts[model] = list(steps)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append((body["model"], time.monotonic()))
        self.headers.append(request.headers)
        steps = self.scripts[body["model"]]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        return await step(body)

    def count(self, model: str) -> int:
        return sum(1 for called, _ in self.calls if called == model)

    def times(self, model: str) -> list[float]:
        return [at for called, at in self.calls if called == model]

    # ---------------------------------------------------------------- steps

    def ok(self, text: str = "hello", image: bool = False) -> Step:
        async def step(body: dict[str, Any]) -> httpx.Response:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if image:
                message["images"] = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64}"}}]
            usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            answer = {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}
            return httpx.Response(200, json=answer)

        return step

    def status(self, code: int, body: Any = None, headers: dict[str, str] | None = None, delay_s: float = 0.0) -> Step:
        async def step(_: dict[str, Any]) -> httpx.Response:
            if delay_s:
                await asyncio.sleep(delay_s)
            payload = body if body is not None else {"error": {"message": f"upstream error {code}", "type": "server_error", "code": code}}
            content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            return httpx.Response(code, content=content, headers=headers)

        return step

    def fail(self, exc: Exception) -> Step:
        async def step(_: dict[str, Any]) -> httpx.Response:
            raise exc

        return step

    def slow(self, delay_s: float, then: Step) -> Step:
        async def step(body: dict[str, Any]) -> httpx.Response:
            await asyncio.sleep(delay_s)
            return await then(body)

        return step

    def sse(self, *pieces: tuple[float, Any]) -> Step:
        """A 200 event stream: (delay before, event) pairs; an event is a dict, b"[DONE]" or raw bytes."""

        def encode(event: Any) -> bytes:
            if isinstance(event, dict):
                return b"data: " + json.dumps(event).encode() + b"\n\n"
            if event == b"[DONE]":
                return b"data: [DONE]\n\n"
            return bytes(event)

        async def step(_: dict[str, Any]) -> httpx.Response:
            stream = CountingStream([(delay_s, encode(event)) for delay_s, event in pieces], self.closed)
            return httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"})

        return step


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {"id": "c", "object": "chat.completion.chunk", "model": "internal/model-id", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


ROLE = chunk(role="assistant", content="")


def request_body(name: str, **extra: Any) -> dict[str, Any]:
    return {"model": name, "messages": [{"role": "user", "content": "hi"}], **extra}


class Harness:
    def __init__(self, snapshot: Snapshot, health: HealthBoard | None = None) -> None:
        self.snapshot = snapshot
        self.upstream = FakeUpstream()
        self.health = health or HealthBoard()

    def dispatcher(self, slots: Any = None) -> Dispatcher:
        client = UpstreamClient(transport=httpx.MockTransport(self.upstream.handle))
        return Dispatcher(client, self.health, lambda: self.snapshot.config.routing, slots)

    def plan(self, body: dict[str, Any]) -> tuple[Any, tuple[Target, ...]]:
        compiled = self.snapshot.lookup(body["model"])
        return compiled, plan_attempts(compiled, inspect_request(body))

    async def complete(self, name: str, slots: Any = None, **extra: Any) -> Served:
        body = request_body(name, **extra)
        compiled, targets = self.plan(body)
        return await self.dispatcher(slots).complete(compiled, targets, body)

    async def fail(self, name: str, **extra: Any) -> GatewayError:
        with pytest.raises(GatewayError) as caught:
            await self.complete(name, **extra)
        return caught.value

    async def stream(self, name: str, slots: Any = None, **extra: Any) -> tuple[StreamStart, bytes]:
        body = request_body(name, stream=True, **extra)
        compiled, targets = self.plan(body)
        start = await self.dispatcher(slots).open_stream(compiled, targets, body)
        relay = StreamRelay(start.target.alias, lambda: None, expect_usage=bool(extra.get("stream_options")), choices=asked_choices(body))
        self.writes: list[bytes] = []  # what the relay handed the client, write by write
        try:
            async for piece in relay_stream(start, relay):
                self.writes.append(piece)
        finally:
            await start.aclose()
        return start, b"".join(self.writes)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


# ------------------------------------------------------------------ plans


def test_plan_is_own_target_then_fallbacks_recursively_each_alias_once() -> None:
    """A plan is the alias's own target, then its fallbacks and theirs, depth first, each alias once."""
    snap = snapshot_of(
        alias("a", fallback=["b1", "c"]) + alias("b1", fallback=["c", "d"]) + alias("c") + alias("d")
    )
    text = inspect_request({"model": "a", "messages": [{"role": "user", "content": "hi"}]})
    assert [t.alias for t in plan_attempts(snap.lookup("a"), text)] == ["a", "b1", "c", "d"]


def test_composite_plan_is_its_route_then_its_fallbacks() -> None:
    """A composite's plan is its route members in order (with their fallbacks), then its own fallbacks."""
    snap = snapshot_of(
        alias("m1", fallback=["m3"]) + alias("m2") + alias("m3") + alias("late")
        + '[models."combo"]\nroute = ["m1", "m2"]\nfallback = ["late"]\n'
    )
    text = inspect_request({"model": "combo", "messages": [{"role": "user", "content": "hi"}]})
    assert [t.alias for t in plan_attempts(snap.lookup("combo"), text)] == ["m1", "m3", "m2", "late"]


def test_plan_skips_members_that_cannot_take_the_request() -> None:
    """A fallback whose input lacks a modality of the request is left out of that request's plan."""
    snap = snapshot_of(alias("vision", input=["text", "image"], fallback=["texty", "vision2"]) + alias("texty") + alias("vision2", input=["text", "image"]))
    image_body = {"model": "vision", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]}]}
    compiled = snap.lookup("vision")
    assert [t.alias for t in plan_attempts(compiled, inspect_request(image_body))] == ["vision", "vision2"]
    assert [t.alias for t in plan_attempts(compiled, inspect_request(request_body("vision")))] == ["vision", "texty", "vision2"]


def test_timeouts_resolve_alias_then_backend_and_deadline_sums_the_plan() -> None:
    """Timeouts resolve alias → backend; a target's own total bounds one attempt, the plan's deadline sums them."""
    snap = snapshot_of(
        alias("slow", timeout_s=5, idle_timeout_s=2, fallback=["quick"]) + alias("quick")
        + '[models."both"]\nroute = ["slow", "quick"]\ntimeout_s = 3\n'
    )
    slow = snap.lookup("slow")
    assert slow.targets[0].timeouts.total_s == 5 and slow.targets[0].timeouts.idle_s == 2
    assert slow.targets[0].timeouts.first_byte_s == 0.3  # from the backend
    assert slow.targets[1].timeouts.total_s == 1
    assert slow.deadline_s == 6
    assert snap.lookup("both").deadline_s == 3


# ------------------------------------------------------------------ retry, move on, stop


def test_transient_500_is_retried_on_the_same_target_after_a_backoff() -> None:
    """A 500 once, then fine: two calls to the same target, a jittered backoff apart, and the answer served."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.status(500), h.upstream.ok())
    served = run(h.complete("a"))
    assert served.target.alias == "a" and [a.outcome for a in served.attempts] == ["500", "ok"]
    first, second = h.upstream.times("a")
    assert 0.01 <= second - first < 0.5


@pytest.mark.parametrize("status", [408, 409, 429, 502, 503, 504])
def test_each_transient_status_is_retried_then_the_plan_moves_on(status: int) -> None:
    """Every transient status is retried once (the default), then the fallback serves."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("a", h.upstream.status(status))
    h.upstream.script("b", h.upstream.ok())
    served = run(h.complete("a"))
    assert served.target.alias == "b"
    assert [a.outcome for a in served.attempts] == [str(status), str(status), "ok"]


def test_retries_are_configurable_per_alias() -> None:
    """`retries = 2` on the alias gives three calls to its target before moving on."""
    h = Harness(snapshot_of(alias("a", retries=2)))
    h.upstream.script("a", h.upstream.status(503))
    error = run(h.fail("a"))
    assert h.upstream.count("a") == 3
    assert error.code == "upstream_error" and error.headers["x-gateway-attempts"] == "3"


def test_the_log_says_what_follows_each_failed_attempt(caplog: pytest.LogCaptureFixture) -> None:
    """A retry, a move to the fallback, a stop: each failed attempt's line names what really follows it
    (every transient failure said "retry", the last try and retries = 0 too)."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("a", h.upstream.status(503))
    h.upstream.script("b", h.upstream.status(400, body={"error": {"message": "bad temperature"}}))
    with caplog.at_level(logging.WARNING, logger="gateway.dispatch"):
        run(h.fail("a"))
    nexts = [r.getMessage().rsplit("; next: ", 1)[1] for r in caplog.records if "; next: " in r.getMessage()]
    assert [n.split(" in ")[0] for n in nexts] == ["retry", "move on", "stop"], nexts


def test_connection_refused_and_invalid_json_are_transient() -> None:
    """A refused connection and a 200 that is not JSON are both retried on the same target."""
    h = Harness(snapshot_of(alias("a") + alias("j")))
    h.upstream.script("a", h.upstream.fail(httpx.ConnectError("refused")), h.upstream.ok())
    h.upstream.script("j", h.upstream.status(200, body=b"not json{"), h.upstream.ok())
    assert [a.outcome for a in run(h.complete("a")).attempts] == ["connect", "ok"]
    assert [a.outcome for a in run(h.complete("j")).attempts] == ["invalid_json", "ok"]


def test_connect_timeout_moves_on_without_retry() -> None:
    """A backend that cannot be reached within the connect timeout is not retried: the plan moves on."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("a", h.upstream.fail(httpx.ConnectTimeout("timed out")))
    h.upstream.script("b", h.upstream.ok())
    served = run(h.complete("a"))
    assert [a.outcome for a in served.attempts] == ["connect_timeout", "ok"]


def test_retry_after_that_fits_is_honoured() -> None:
    """A 429 with `Retry-After: 0.3` is retried no sooner than 0.3 s later."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.status(429, headers={"retry-after": "0.3"}), h.upstream.ok())
    run(h.complete("a"))
    first, second = h.upstream.times("a")
    assert second - first >= 0.29


def test_retry_after_longer_than_allowed_moves_on_and_pauses_the_target() -> None:
    """A Retry-After beyond `retry_after_max_s` moves on at once; the target is then skipped without a call."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b"), routing="retry_after_max_s = 1\n"))
    h.upstream.script("a", h.upstream.status(429, headers={"retry-after": "30"}))
    h.upstream.script("b", h.upstream.ok())
    started = time.monotonic()
    served = run(h.complete("a"))
    assert time.monotonic() - started < 1.0
    assert served.target.alias == "b" and h.upstream.count("a") == 1
    again = run(h.complete("a"))
    assert h.upstream.count("a") == 1
    assert [a.outcome for a in again.attempts] == ["cooling_down", "ok"]


def test_retry_after_beyond_the_remaining_budget_is_not_waited_for() -> None:
    """A Retry-After longer than what is left of the plan's deadline moves on instead of sleeping past it."""
    h = Harness(snapshot_of('[models."c"]\nroute = ["a", "b"]\ntimeout_s = 0.5\n' + alias("a") + alias("b")))
    h.upstream.script("a", h.upstream.status(503, headers={"retry-after": "2"}))
    h.upstream.script("b", h.upstream.ok())
    started = time.monotonic()
    served = run(h.complete("c"))
    assert time.monotonic() - started < 1.5 and served.target.alias == "b"


def test_stream_with_no_first_chunk_in_time_moves_on_without_retry() -> None:
    """A stream whose first real chunk misses the first-byte window is not retried: the plan moves on."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("a", h.upstream.sse((0, ROLE), (0.8, chunk("late")), (0, b"[DONE]")))
    h.upstream.script("b", h.upstream.sse((0, chunk("hi")), (0, chunk(finish="stop")), (0, b"[DONE]")))
    started = time.monotonic()
    start, out = run(h.stream("a"))
    assert 0.25 < time.monotonic() - started < 1.5
    assert start.target.alias == "b" and h.upstream.count("a") == 1
    assert [a.outcome for a in start.attempts] == ["first_byte_timeout", "ok"]
    assert out.endswith(b"data: [DONE]\n\n") and b'"model":"b"' in out
    assert len(h.upstream.closed) == 2  # the abandoned stream was closed too


def test_non_streaming_answer_is_bounded_by_its_total_not_the_first_byte() -> None:
    """Non-streaming: an answer slower than the first-byte window but within the total is served."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.slow(0.5, h.upstream.ok()))
    assert run(h.complete("a")).target.alias == "a"


def test_non_streaming_total_timeout_moves_on_without_retry() -> None:
    """Non-streaming: no answer within the total moves on at once (no retry), and all timeouts end as 504."""
    h = Harness(snapshot_of(alias("a", timeout_s=0.3, fallback=["b"]) + alias("b", timeout_s=0.3)))
    h.upstream.script("a", h.upstream.slow(5, h.upstream.ok()))
    h.upstream.script("b", h.upstream.slow(5, h.upstream.ok()))
    error = run(h.fail("a"))
    assert error.code == "upstream_timeout" and error.status == 504
    assert h.upstream.count("a") == 1 and h.upstream.count("b") == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error", "code": "context_length_exceeded"}}),
        (400, {"object": "error", "message": "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens", "type": "BadRequestError", "code": 400}),
        (500, {"error": {"code": 500, "message": "the request exceeds the available context size, try increasing it", "type": "exceed_context_size_error"}}),
    ],
    ids=["openai", "vllm", "llamacpp-500"],
)
def test_context_length_refusal_moves_on_and_is_never_retried(status: int, body: dict[str, Any]) -> None:
    """A context refusal in any dialect moves on without a retry; when every target refuses, 400 context_length_exceeded."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("a", h.upstream.status(status, body=body))
    h.upstream.script("b", h.upstream.ok())
    assert run(h.complete("a")).target.alias == "b"
    assert h.upstream.count("a") == 1
    h.upstream.script("b", h.upstream.status(status, body=body))
    error = run(h.fail("a"))
    assert (error.code, error.status, error.at) == ("context_length_exceeded", 400, ("messages",))


def test_content_filter_stops_the_plan_with_the_upstream_status_and_reason() -> None:
    """A 400 content filter stops: no retry, no fallback, the client gets 400 with the upstream's reason."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    refusal = {"error": {"message": "The response was filtered due to the content management policy.", "type": "invalid_request_error", "param": "prompt", "code": "content_filter"}}
    h.upstream.script("a", h.upstream.status(400, body=refusal))
    h.upstream.script("b", h.upstream.ok())
    error = run(h.fail("a"))
    assert (error.code, error.status) == ("upstream_rejected", 400)
    assert "content management policy" in error.message and "content_filter" in error.message
    assert error.at is None  # "prompt" is not a field the client sent
    assert h.upstream.count("a") == 1 and h.upstream.count("b") == 0
    assert error.headers["x-gateway-attempts"] == "1"


def test_bad_parameter_points_at_the_clients_field() -> None:
    """An upstream 422 naming a parameter the client sent keeps its status and points at that field."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.status(422, body={"object": "error", "message": "temperature must be <= 2", "type": "BadRequestError", "param": "temperature", "code": 422}))
    error = run(h.fail("a", temperature=5))
    assert (error.status, error.at) == (422, ("temperature",))


def test_a_backend_refusing_our_key_moves_on() -> None:
    """A 401 from the backend is the operator's problem: the plan moves on to the fallback."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("a", h.upstream.status(401))
    h.upstream.script("b", h.upstream.ok())
    assert run(h.complete("a")).target.alias == "b" and h.upstream.count("a") == 1


def test_image_alias_answer_without_image_moves_on() -> None:
    """An image-output member answering 200 without an image moves on to the next member, which serves."""
    snap = snapshot_of(
        alias("nano", output=["image", "text"]) + alias("big", output=["image", "text"])
        + '[models."image-gen"]\nroute = ["nano", "big"]\n'
    )
    h = Harness(snap)
    h.upstream.script("nano", h.upstream.ok(image=False))
    h.upstream.script("big", h.upstream.ok(image=True))
    served = run(h.complete("image-gen"))
    assert served.target.alias == "big" and [a.outcome for a in served.attempts] == ["no_image", "ok"]
    h.upstream.script("big", h.upstream.ok(image=False))
    assert run(h.fail("image-gen")).code == "no_image_generated"


def test_a_spent_plan_tells_the_client_not_to_retry_or_when_to_come_back() -> None:
    """After the plan's own retries and fallbacks, a 5xx says `x-should-retry: false` (the openai SDK made
    two more rounds of paid calls of each failed or imageless request); when every target is paused, as its
    upstream asked, it says `Retry-After` instead (it said nothing, and the SDK came back at once)."""
    models = (
        alias("a", fallback=["b"]) + alias("b") + alias("slow", retries=0) + alias("paused")
        + alias("nano", output=["image", "text"]) + '[models."image-gen"]\nroute = ["nano"]\n'
    )
    text = config_text(models, routing="retry_after_max_s = 1\n").replace("cooldown_s = 0.4", "cooldown_s = 45")
    snap = build_snapshot(parse_config(text.encode()), environ={"UNIT_KEY": SECRET})
    h = Harness(snap)
    h.upstream.script("a", h.upstream.status(500))
    h.upstream.script("b", h.upstream.status(503))
    h.upstream.script("nano", h.upstream.ok(image=False))
    h.upstream.script("paused", h.upstream.status(429, headers={"retry-after": "30"}))
    for name, code in (("a", "upstream_error"), ("image-gen", "no_image_generated")):
        error = run(h.fail(name))
        assert error.code == code and error.headers["x-should-retry"] == "false"
        assert "retry-after" not in error.headers
    paused = run(h.fail("paused"))
    assert paused.code == "upstream_error" and h.upstream.count("paused") == 1
    assert 29 <= int(paused.headers["retry-after"]) <= 30 and "x-should-retry" not in paused.headers
    # An upstream's 4xx about the request is passed on as it came: no word on retrying (a 400 is not retried).
    h.upstream.script("slow", h.upstream.status(400))
    assert not {"x-should-retry", "retry-after"} & run(h.fail("slow")).headers.keys()


def test_calls_are_bounded_by_max_attempts() -> None:
    """`max_attempts` caps the calls of one request, and the untried rest is listed as not tried."""
    h = Harness(snapshot_of(alias("a", fallback=["b", "c"]) + alias("b") + alias("c"), routing="max_attempts = 3\n"))
    for model in ("a", "b", "c"):
        h.upstream.script(model, h.upstream.status(503))
    error = run(h.fail("a"))
    assert len(h.upstream.calls) == 3 and error.headers["x-gateway-attempts"] == "3"
    assert "c: not_tried" in error.message


def test_all_failed_message_lists_every_attempt_without_secrets() -> None:
    """The 502 lists each attempt (alias, status or fault, reason) and never the key, URL, host or credentials."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    leaky = {"error": {"message": f"Incorrect API key {SECRET} for {BASE_URL}; auth Bearer {SECRET}", "code": 503}}
    h.upstream.script("a", h.upstream.status(503, body=leaky))
    h.upstream.script("b", h.upstream.fail(httpx.ConnectError(f"Cannot connect to host {HOST}")))
    error = run(h.fail("a"))
    assert error.code == "upstream_error" and error.status == 502
    assert error.message.count("a: 503") == 2 and error.message.count("b: connect") == 2
    for secret in (SECRET, "hunter2", HOST, "upstream.internal", "Bearer"):
        assert secret not in error.message
    assert h.upstream.headers[0]["authorization"] == f"Bearer {SECRET}"  # the upstream did get its key


def test_unconfigured_backend_is_skipped_without_a_call() -> None:
    """A target whose key variable is unset is skipped; alone it is 503 backend_not_configured naming the variable."""
    text = config_text(alias("a", fallback=["n"]) + alias("n", model="n").replace('backend = "b"', 'backend = "nokey"'))
    text += '[backends.nokey]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "MISSING_KEY"\n'
    h = Harness(build_snapshot(parse_config(text.encode()), environ={"UNIT_KEY": SECRET}))
    h.upstream.script("a", h.upstream.status(503))
    error = run(h.fail("a"))
    assert "n: not_configured (MISSING_KEY is unset)" in error.message
    error = run(h.fail("n"))
    assert error.code == "backend_not_configured" and "MISSING_KEY" in error.message


# ------------------------------------------------------------------ cooldowns


def test_failing_target_cools_down_then_is_probed_and_recovers() -> None:
    """After `cooldown_failures` failures a target is skipped without a call, then one probe brings it back."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b"), routing="cooldown_failures = 2\n"))
    h.upstream.script("a", h.upstream.status(503))
    h.upstream.script("b", h.upstream.ok())
    assert run(h.complete("a")).target.alias == "b"
    assert h.upstream.count("a") == 2  # this second failure cooled it: no third call
    assert run(h.complete("a")).target.alias == "b" and h.upstream.count("a") == 2
    report = {row["model"]: row for row in h.health.report()}
    assert report["a"]["state"] == "cooling_down" and report["b"]["state"] == "healthy"
    time.sleep(0.45)
    h.upstream.script("a", h.upstream.ok())
    served = run(h.complete("a"))
    assert served.target.alias == "a" and h.upstream.count("a") == 3
    assert {row["model"]: row for row in h.health.report()}["a"]["state"] == "healthy"


def test_all_targets_cooling_is_503_with_retry_after() -> None:
    """When every target of the plan cools down, the client gets 503 no_healthy_backend with Retry-After, no call."""
    h = Harness(snapshot_of(alias("a"), routing=COOL_AT_ONCE))
    h.upstream.script("a", h.upstream.status(500))
    run(h.fail("a"))
    error = run(h.fail("a"))
    assert error.code == "no_healthy_backend" and error.headers["retry-after"] == "1"
    assert error.headers["x-gateway-attempts"] == "0" and h.upstream.count("a") == 1


def test_only_one_probe_runs_and_a_cancelled_probe_frees_its_slot() -> None:
    """After a cooldown one request probes while others skip; a probe whose client left lets the next one probe."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b"), routing=COOL_AT_ONCE))
    h.upstream.script("a", h.upstream.status(500))
    h.upstream.script("b", h.upstream.ok())
    run(h.complete("a"))
    time.sleep(0.45)
    h.upstream.script("a", h.upstream.slow(5, h.upstream.ok()))

    async def probe_and_leave() -> None:
        probe = asyncio.create_task(h.complete("a"))
        await asyncio.sleep(0.1)
        other = await h.complete("a")  # the probe is running: this one skips "a"
        assert other.target.alias == "b" and other.attempts[0].outcome == "cooling_down"
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe

    run(probe_and_leave())
    assert h.upstream.count("a") == 2
    h.upstream.script("a", h.upstream.ok())
    assert run(h.complete("a")).target.alias == "a"


def test_refusals_of_the_request_do_not_cool_the_target() -> None:
    """Content refusals and context refusals show the target is up: they never cool it down."""
    h = Harness(snapshot_of(alias("a"), routing=COOL_AT_ONCE))
    h.upstream.script("a", h.upstream.status(400, body={"error": {"message": "bad parameter", "code": "invalid_value"}}))
    for _ in range(3):
        run(h.fail("a"))
    assert h.upstream.count("a") == 3
    assert next(h.health.report())["state"] == "healthy"


def test_backend_slots_are_released_on_every_path() -> None:
    """Each acquired backend slot is released: failed calls, answers, streams and abandoned streams."""

    class Slots:
        def __init__(self) -> None:
            self.held = 0
            self.taken = 0

        async def acquire(self, target: Target, request_left_s: float = 0.0) -> Any:
            self.held += 1
            self.taken += 1
            slots = self

            class Slot:
                def release(self) -> None:
                    slots.held -= 1

            return Slot()

    slots = Slots()
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b"), routing="cooldown_failures = 10\n"))
    h.upstream.script("a", h.upstream.status(503))
    h.upstream.script("b", h.upstream.sse((0, chunk("x")), (0, chunk(finish="stop")), (0, b"[DONE]")))
    run(h.stream("a", slots=slots))
    h.upstream.script("b", h.upstream.ok())
    run(h.complete("a", slots=slots))
    assert slots.taken == 6 and slots.held == 0


def test_busy_backend_moves_on_and_alone_is_429() -> None:
    """A backend slot refusal (queue full) moves on without a call; with nothing else to try the 429 reaches the client."""

    class Full:
        async def acquire(self, target: Target, request_left_s: float = 0.0) -> Any:
            if target.alias == "a":
                raise GatewayError("concurrency_limit_exceeded", "busy", headers={"retry-after": "3"})

            class Slot:
                def release(self) -> None:
                    pass

            return Slot()

    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("b", h.upstream.ok())
    assert run(h.complete("a", slots=Full())).target.alias == "b" and h.upstream.count("a") == 0
    h2 = Harness(snapshot_of(alias("a")))
    error = run(h2.fail("a", slots=Full()))
    assert error.code == "concurrency_limit_exceeded" and error.headers["retry-after"] == "3"
    # A busy target and a failing fallback: a retry is served once a slot frees, as the refusal said.
    h.upstream.script("b", h.upstream.status(500))
    error = run(h.fail("a", slots=Full()))
    assert error.code == "upstream_error" and error.headers["retry-after"] == "3" and "x-should-retry" not in error.headers


# ------------------------------------------------------------------ streams


def test_stream_is_held_until_its_first_real_chunk_so_early_faults_fall_back() -> None:
    """A stream that sends only a role chunk and then fails still falls back: nothing reached the client yet."""
    h = Harness(snapshot_of(alias("a", fallback=["b"]) + alias("b")))
    h.upstream.script("a", h.upstream.sse((0, ROLE), (0, {"error": {"message": "overloaded", "code": 503}})))
    h.upstream.script("b", h.upstream.sse((0, chunk("fine")), (0, chunk(finish="stop")), (0, b"[DONE]")))
    start, out = run(h.stream("a"))
    assert start.target.alias == "b"
    assert [a.outcome for a in start.attempts] == ["error_event 503", "error_event 503", "ok"]
    assert b"fine" in out and out.endswith(b"data: [DONE]\n\n")


def test_stream_cut_after_first_byte_ends_with_one_error_event_and_no_done() -> None:
    """A stream cut after content has gone out ends with one error event and no [DONE]."""
    h = Harness(snapshot_of(alias("a")))

    async def cut(_: dict[str, Any]) -> httpx.Response:
        class Cut(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                yield b"data: " + json.dumps(chunk("partial")).encode() + b"\n\n"
                raise httpx.ReadError("connection reset")

        return httpx.Response(200, stream=Cut())

    h.upstream.script("a", cut)
    _, out = run(h.stream("a"))
    events = [e for e in out.split(b"\n\n") if e]
    assert b"partial" in events[0]
    assert events[-1].startswith(b'data: {"error":') and b"[DONE]" not in out
    assert sum(1 for e in events if b'"error"' in e) == 1


def sse_bytes(*events: Any) -> bytes:
    """Several events as the bytes of one upstream read."""
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def test_events_that_arrive_together_go_to_the_client_in_one_write() -> None:
    """Events read from the upstream at once are relayed as one write, [DONE] included; later reads get writes of their own."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.sse((0, sse_bytes(ROLE, chunk("one"), chunk("two"))), (0.05, sse_bytes(chunk("three"), chunk(finish="stop"), b"[DONE]"))))
    _, out = run(h.stream("a"))
    assert len(h.writes) == 2, h.writes
    assert [w.count(b"data: ") for w in h.writes] == [3, 3]
    assert b"one" in h.writes[0] and b"two" in h.writes[0] and b"three" in h.writes[1]
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"[DONE]") == 1


def test_events_before_an_error_event_in_the_same_read_still_go_out_first() -> None:
    """An upstream error event in the middle of a read: the events before it are sent, then one error event; nothing after it."""
    h = Harness(snapshot_of(alias("a")))
    failing = sse_bytes(chunk("two"), {"error": {"message": "overloaded", "code": 503}}, chunk("three"), b"[DONE]")
    h.upstream.script("a", h.upstream.sse((0, chunk("one")), (0.05, failing)))
    _, out = run(h.stream("a"))
    events = [e for e in out.split(b"\n\n") if e]
    assert [b"one" in events[0], b"two" in events[1]] == [True, True]
    assert len(events) == 3 and events[2].startswith(b'data: {"error":') and b"overloaded" in events[2]
    assert b"three" not in out and b"[DONE]" not in out


def test_stream_idle_gap_ends_with_timeout_error_event() -> None:
    """A stream silent for longer than the idle gap after its first chunk ends with an upstream_timeout event."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.sse((0, chunk("one")), (2, chunk("two"))))
    started = time.monotonic()
    _, out = run(h.stream("a"))
    assert time.monotonic() - started < 1.8
    assert b'"code":"upstream_timeout"' in out and b"[DONE]" not in out and b"two" not in out


def test_stream_longer_than_its_total_is_cut_with_a_timeout_event() -> None:
    """A stream that keeps trickling past the attempt's total ends with an upstream_timeout event, no [DONE]."""
    h = Harness(snapshot_of(alias("a", timeout_s=0.6, idle_timeout_s=0.3, first_byte_timeout_s=0.3)))
    h.upstream.script("a", h.upstream.sse(*[(0.1, chunk(f"w{i} ")) for i in range(40)]))
    started = time.monotonic()
    _, out = run(h.stream("a"))
    assert 0.5 < time.monotonic() - started < 2.0
    assert b"w2 " in out and b'"code":"upstream_timeout"' in out and b"[DONE]" not in out


def test_sse_decoder_handles_any_chunking_and_line_ends() -> None:
    """Events split anywhere, with LF, CRLF or CR line ends, decode to the same data; comments give None."""
    text = b": keep-alive\r\n\r\ndata: {\"a\": 1}\r\n\r\ndata: x\rdata: y\r\rdata: [DONE]\n\n"
    expected = [None, b'{"a": 1}', b"x\ny", b"[DONE]"]
    for size in (1, 2, 3, 5, 7, len(text)):
        decoder = SSEDecoder()
        events: list[bytes | None] = []
        for i in range(0, len(text), size):
            events += decoder.feed(text[i : i + size])
        assert events == expected, size


def test_sse_decoder_drops_a_byte_order_mark_split_across_reads() -> None:
    """A mark the upstream's first read cuts in two hid the first event's data line, and the event was lost."""
    text = b"\xef\xbb\xbfdata: first\n\ndata: second\n\n"
    for size in (1, 2, 3, 4, len(text)):
        decoder = SSEDecoder()
        events: list[bytes | None] = []
        for i in range(0, len(text), size):
            events += decoder.feed(text[i : i + size])
        assert events == [b"first", b"second"], size
    tail = SSEDecoder()
    assert tail.feed(b"data: last") == [] and tail.finish() == [b"last"]


def test_malformed_chunk_is_dropped_and_counted() -> None:
    """One malformed chunk is dropped and counted; the stream goes on to [DONE]."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.sse((0, chunk("one")), (0, b"data: {not json\n\n"), (0, chunk("two")), (0, chunk(finish="stop")), (0, b"[DONE]")))
    body = request_body("a", stream=True)
    compiled, targets = h.plan(body)
    dropped: list[int] = []

    async def go() -> bytes:
        start = await h.dispatcher().open_stream(compiled, targets, body)
        out = b""
        async for piece in relay_stream(start, StreamRelay("a", lambda: dropped.append(1))):
            out += piece
        await start.aclose()
        return out

    out = run(go())
    assert dropped == [1] and b"not json" not in out
    assert b"one" in out and b"two" in out and out.endswith(b"data: [DONE]\n\n")


def test_stream_without_done_is_finalised_promptly_with_its_usage() -> None:
    """An upstream that finishes and sends usage but neither [DONE] nor its end is finalised within the tail grace."""
    h = Harness(snapshot_of(alias("a", idle_timeout_s=5, timeout_s=10)))
    usage = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}
    h.upstream.script("a", h.upstream.sse((0, chunk("one")), (0, chunk(finish="stop")), (0, usage), (8, b"[DONE]")))
    started = time.monotonic()
    _, out = run(h.stream("a", stream_options={"include_usage": True}))
    assert time.monotonic() - started < 2.5
    assert b'"completion_tokens":3' in out and out.endswith(b"data: [DONE]\n\n")


def test_a_stream_of_several_choices_waits_for_each_to_finish() -> None:
    """With `n: 2`, the first choice's finish is not the answer's end: a second choice coming more than
    the tail's grace later was dropped, and the stream ended with [DONE] as if whole."""
    second = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 1, "delta": {"content": "B"}, "finish_reason": "stop"}]}
    h = Harness(snapshot_of(alias("a", idle_timeout_s=5, timeout_s=10)))
    h.upstream.script("a", h.upstream.sse((0, chunk("A")), (0, chunk(finish="stop")), (TAIL_GRACE_S + 0.3, second), (0, b"[DONE]")))
    _, out = run(h.stream("a", n=2))
    assert b'"content":"B"' in out and out.endswith(b"data: [DONE]\n\n"), out


def test_an_upstream_that_ignores_n_ends_its_whole_answer_with_done() -> None:
    """Asked for two choices, it sends one, finished, and closes without [DONE]: what it sent is whole."""
    h = Harness(snapshot_of(alias("a", idle_timeout_s=5, timeout_s=10)))
    h.upstream.script("a", h.upstream.sse((0, chunk("A")), (0, chunk(finish="stop"))))
    _, out = run(h.stream("a", n=2))
    assert out.endswith(b"data: [DONE]\n\n") and b'"error"' not in out


def test_a_streamed_event_holding_a_whole_message_reaches_the_client_as_a_delta() -> None:
    """Sent under `message`, its text went out where a stream's reader never looks."""
    whole = {"id": "c", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole"}, "finish_reason": "stop"}]}
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.sse((0, whole), (0, b"[DONE]")))
    _, out = run(h.stream("a"))
    first = json.loads(out.split(b"\n\n")[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"]["content"] == "Whole" and "message" not in first["choices"][0]


def test_stream_ending_unfinished_is_an_error_not_done() -> None:
    """An upstream stream that ends before any finish reason is reported incomplete, never with [DONE]."""
    h = Harness(snapshot_of(alias("a")))
    h.upstream.script("a", h.upstream.sse((0, chunk("half an ans"))))
    _, out = run(h.stream("a"))
    assert b"[DONE]" not in out and b'"code":"upstream_error"' in out


def test_streamed_answer_names_the_serving_alias_and_fixes_image_types() -> None:
    """Every relayed chunk names the serving alias as model; a streamed image delta gets its sniffed type."""
    snap = snapshot_of(alias("img", output=["image", "text"]))
    h = Harness(snap)
    image_delta = chunk(images=[{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64}"}}])
    h.upstream.script("img", h.upstream.sse((0, chunk("drawing")), (0.1, image_delta), (0, chunk(finish="stop")), (0, b"[DONE]")))
    _, out = run(h.stream("img"))
    assert b"internal/model-id" not in out and out.count(b'"model":"img"') == 3
    assert b"data:image/png;base64," in out and b"image/jpeg" not in out


def test_image_stream_without_image_moves_on() -> None:
    """A streamed image-output member that ends without an image delta moves on, before any byte reached the client."""
    snap = snapshot_of(alias("nano", output=["image", "text"]) + alias("big", output=["image", "text"]) + '[models."gen"]\nroute = ["nano", "big"]\n')
    h = Harness(snap)
    h.upstream.script("nano", h.upstream.sse((0, chunk("I cannot draw")), (0, chunk(finish="stop")), (0, b"[DONE]")))
    image_delta = chunk(images=[{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}])
    h.upstream.script("big", h.upstream.sse((0, image_delta), (0, chunk(finish="stop")), (0, b"[DONE]")))
    start, out = run(h.stream("gen"))
    assert start.target.alias == "big" and b"cannot draw" not in out


# ------------------------------------------------------------------ pieces


def test_backoff_is_jittered_exponential_and_capped() -> None:
    """Backoff waits are within ±50 % of base·2^(n-1), capped by backoff_max_s, and vary."""
    routing = snapshot_of(alias("a")).config.routing
    waits = [Dispatcher._retry_wait_s(routing, 1, None, 10.0) for _ in range(50)]
    assert all(w is not None and 0.01 <= w <= 0.03 for w in waits) and len(set(waits)) > 1
    capped = Dispatcher._retry_wait_s(routing, 10, None, 10.0)
    assert capped is not None and capped <= 0.075
    assert Dispatcher._retry_wait_s(routing, 1, None, 0.001) is None


def reloaded(models: str, *, base_url: str = BASE_URL, headers: str = "", key: str = SECRET, cooldown_s: float = 60) -> Snapshot:
    """A snapshot as a reload would build it, with the backend's connection settings given."""
    text = config_text(models, COOL_AT_ONCE).replace("cooldown_s = 0.4", f"cooldown_s = {cooldown_s}")
    text = text.replace(f'base_url = "{BASE_URL}"', f'base_url = "{base_url}"' + (f"\nheaders = {headers}" if headers else ""))
    return build_snapshot(parse_config(text.encode()), environ={"UNIT_KEY": key})


def test_an_upstreams_words_name_the_alias_where_they_name_its_model() -> None:
    """Only the whole model id is the alias's: not inside a longer id, and not an id as short as a word."""
    target = snapshot_of(alias("chat", model="org/model-7b")).lookup("chat").targets[0]
    assert target.in_client_words("The model `org/model-7b` does not exist.") == "The model `chat` does not exist."
    assert target.in_client_words("org/model-7b is overloaded; try org/model-7b.") == "chat is overloaded; try chat."
    for longer in ("org/model-7b-instruct", "org/model-7b.1", "xorg/model-7b", "org/model-7b/v2"):
        assert target.in_client_words(f"{longer} is gone") == f"{longer} is gone"
    short = snapshot_of(alias("chat", model="m1")).lookup("chat").targets[0]
    assert short.in_client_words("m1 is gone") == "m1 is gone"
    assert target.in_client_words(f"bad key {SECRET}") == "bad key [redacted]"


def test_an_upstreams_words_lose_the_backends_host_with_or_without_its_port() -> None:
    """A base_url with a port left the bare host name in an upstream's words ("api.example.test is busy")."""
    target = reloaded(alias("chat"), base_url="https://api.example.test:8443/v1").lookup("chat").targets[0]
    said = "overloaded: api.example.test is busy, see https://api.example.test/status or api.example.test:8443"
    assert "api.example.test" not in target.in_client_words(said)
    one_word = reloaded(alias("chat"), base_url="http://spark:8000/v1").lookup("chat").targets[0]
    assert one_word.in_client_words("sparkling spark:8000") == "sparkling [redacted]"  # words keep their letters


def test_target_health_key_changes_with_where_calls_go_only() -> None:
    """A target's health key changes with its base URL, key or headers, not with other edits, and never holds the key."""
    first = reloaded(alias("a")).lookup("a").targets[0].key
    same = [
        reloaded(alias("a")),
        reloaded(alias("a") + alias("other")),
        reloaded(alias("a", timeout_s=0.5, retries=0)),
    ]
    assert all(snapshot.lookup("a").targets[0].key == first for snapshot in same)
    changed = [
        reloaded(alias("a"), base_url="http://127.0.0.1:9/v1"),
        reloaded(alias("a"), key="sk-the-right-key-987654321"),
        reloaded(alias("a"), headers='{ "x-tenant" = "blue" }'),
    ]
    keys = [snapshot.lookup("a").targets[0].key for snapshot in changed]
    assert all(key[:2] == ("b", "a") for key in keys) and len({first, *keys}) == 4
    assert not any(SECRET in part or "hunter2" in part for key in (first, *keys) for part in key)
    assert same[1].target_keys == {first, same[1].lookup("other").targets[0].key}


def test_a_reload_that_fixes_a_backend_starts_its_cooled_target_afresh() -> None:
    """A target cooled on a wrong base URL is called at once after a reload fixes the URL; an edit of another
    alias keeps it cooled; the status shows only the serving target's state."""
    broken_url = "http://127.0.0.1:9/v1"
    h = Harness(reloaded(alias("a"), base_url=broken_url), HealthBoard(serving_keys=lambda: h.snapshot.target_keys))
    h.upstream.script("a", h.upstream.fail(httpx.ConnectError("connection refused")))
    assert run(h.fail("a")).code == "upstream_error"
    assert run(h.fail("a")).code == "no_healthy_backend" and h.upstream.count("a") == 1
    h.snapshot = reloaded(alias("a") + alias("other"), base_url=broken_url)  # an unrelated edit
    assert run(h.fail("a")).code == "no_healthy_backend" and h.upstream.count("a") == 1
    (row,) = h.health.report()
    assert row["state"] == "cooling_down" and str(row["last_error"]).startswith("connect")
    h.snapshot = reloaded(alias("a") + alias("other"))  # the URL fixed
    h.upstream.script("a", h.upstream.ok())
    assert run(h.complete("a")).target.alias == "a" and h.upstream.count("a") == 2
    (row,) = h.health.report()
    assert (row["model"], row["state"], row["last_error"], row["failures"]) == ("a", "healthy", None, 0)
    assert not any(SECRET in str(value) for value in row.values()) and "fingerprint" not in row


def test_health_probe_window_expires_so_a_lost_probe_cannot_block_forever() -> None:
    """A probe that never reports is forgotten after its window, and the next caller probes."""
    board = HealthBoard()
    key = ("b", "m")
    board.failed(key, "503", failures_to_cool=1, cooldown_s=0.0)
    now = time.monotonic() + 0.01
    assert board.admit(key, probe_window_s=1.0, now=now) == 0.0
    assert board.admit(key, probe_window_s=1.0, now=now + 0.5) > 0
    assert board.admit(key, probe_window_s=1.0, now=now + 1.1) == 0.0


# ------------------------------------------------------------------ any upstream answer

ANSWER_KEYS = st.sampled_from([
    "id", "object", "model", "choices", "index", "message", "delta", "role", "content", "images", "image_url", "url",
    "finish_reason", "usage", "prompt_tokens", "total_tokens", "error", "code", "tool_calls",
])
ANSWER_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=10)
    | st.sampled_from(["stop", "assistant", f"data:image/png;base64,{PNG_B64}", "data:image/png;base64,!!", "[DONE]"])
)
ANSWER_JSON = st.recursive(ANSWER_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANSWER_KEYS, inner, max_size=4), max_leaves=16)
MESSAGES = st.fixed_dictionaries({}, optional={"role": ANSWER_JSON, "content": ANSWER_JSON, "images": ANSWER_JSON | st.lists(
    st.fixed_dictionaries({"image_url": ANSWER_JSON | st.fixed_dictionaries({"url": ANSWER_JSON})}), max_size=2)})
CHOICES = st.lists(st.fixed_dictionaries({}, optional={
    "index": ANSWER_JSON, "message": MESSAGES | ANSWER_JSON, "delta": MESSAGES | ANSWER_JSON, "finish_reason": ANSWER_JSON}), max_size=2)
# Answers shaped more and more like a chat completion, each field allowed to be anything.
ANSWERS = ANSWER_JSON | st.fixed_dictionaries({}, optional={
    "choices": CHOICES | ANSWER_JSON, "usage": ANSWER_JSON, "model": ANSWER_JSON, "error": ANSWER_JSON, "id": ANSWER_JSON})
EVENTS = st.lists(ANSWERS | st.sampled_from([b"[DONE]", b"data: {not json\n\n", b": keep-alive\n\n", b"data: \n\n", b"\n\n"]), max_size=5)
ANY_ANSWER_ALIASES = alias("text-a", retries=0) + alias("image-a", retries=0, output=["image", "text"])


def _answering(h: Harness, model: str, answer: Any) -> None:
    async def step(_: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, content=json.dumps(answer).encode(), headers={"content-type": "application/json"})

    h.upstream.script(model, step)


@settings(deadline=None)
@given(answer=ANSWERS, name=st.sampled_from(["text-a", "image-a"]))
def test_any_upstream_answer_is_served_or_ends_in_a_gateway_error(answer: Any, name: str) -> None:
    """Whatever JSON an upstream answers with 200, the client gets a chat completion naming the
    alias, or a 5xx GatewayError; never another exception (which the edge would turn into a 500)."""
    h = Harness(snapshot_of(ANY_ANSWER_ALIASES))
    _answering(h, name, answer)
    try:
        served = run(h.complete(name))
    except GatewayError as refused:
        assert refused.status >= 500, refused.message
        return
    out = json.loads(client_body(served.answer, served.target.alias))
    assert type(out) is dict and out["model"] == name and type(out["choices"]) is list


@settings(deadline=None)
@given(events=EVENTS, name=st.sampled_from(["text-a", "image-a"]))
# `choices` that is a number: once crashed the wait for the first chunk, and the relay after it.
@example(events=[{"choices": 1.5}], name="text-a")
@example(events=[{"choices": [{"delta": {"content": "hi"}}]}, {"choices": 2}, b"[DONE]"], name="text-a")
def test_any_upstream_stream_is_relayed_or_ends_in_a_gateway_error(events: list[Any], name: str) -> None:
    """Whatever events an upstream streams with 200, the client gets either a GatewayError before
    the first byte, or SSE whose every event is JSON naming the alias, an error envelope, or [DONE]."""
    h = Harness(snapshot_of(ANY_ANSWER_ALIASES))
    pieces = [event if isinstance(event, bytes) else b"data: " + json.dumps(event).encode() + b"\n\n" for event in events]
    h.upstream.script(name, h.upstream.sse(*((0.0, piece) for piece in pieces)))
    try:
        _, out = run(h.stream(name))
    except GatewayError as refused:
        assert refused.status >= 500, refused.message
        return
    payloads = [event.removeprefix(b"data: ") for event in out.split(b"\n\n") if event]
    assert payloads, out
    for payload in payloads[:-1]:
        event = json.loads(payload)
        assert type(event) is dict and (event.get("model") == name or set(event) == {"error"}), event
    last = payloads[-1]
    assert last == b"[DONE]" or set(json.loads(last)) == {"error"}, out


def _relayed(events: list[Any], name: str, cuts: list[int] | None) -> bytes | str:
    """What the client gets for these events (or the refusal's code), the upstream's bytes cut into reads at ``cuts``."""
    h = Harness(snapshot_of(ANY_ANSWER_ALIASES))
    whole = b"".join(event if isinstance(event, bytes) else b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    edges = [0, *sorted({cut % (len(whole) + 1) for cut in cuts}), len(whole)] if cuts is not None else [0, len(whole)]
    reads = [whole[a:b] for a, b in itertools.pairwise(edges) if b > a]
    h.upstream.script(name, h.upstream.sse(*((0.0, read) for read in reads)))
    try:
        out: bytes = run(h.stream(name))[1]
    except GatewayError as refused:
        return str(refused.code)
    return out


@settings(deadline=None)
@given(events=EVENTS, cuts=st.lists(st.integers(0, 4096), max_size=8), name=st.sampled_from(["text-a", "image-a"]))
def test_what_the_client_gets_does_not_depend_on_how_the_upstream_cut_its_stream(events: list[Any], cuts: list[int], name: str) -> None:
    """The same events answer the same, whether they come in one read or cut anywhere into many:
    the relay's one write per read changes how the bytes are grouped, never the bytes."""
    assert _relayed(events, name, cuts) == _relayed(events, name, None)


RETRY_AFTERS = st.none() | st.sampled_from(["1", "0", "-5", "nan", "inf", "1e309", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", ""]) | st.text(max_size=12)


@settings(deadline=None)
@given(
    status=st.integers(200, 599),
    body=st.binary(max_size=200) | ANSWERS.map(lambda answer: json.dumps(answer).encode()),
    retry_after=RETRY_AFTERS,
    retry_after_ms=RETRY_AFTERS,
    stream=st.booleans(),
)
def test_any_upstream_status_headers_and_body_end_served_or_in_a_gateway_error(
    status: int, body: bytes, retry_after: str | None, retry_after_ms: str | None, stream: bool
) -> None:
    """Any status, any body, any Retry-After: served, or a GatewayError with a status the catalog
    allows (an upstream 4xx about the request is passed on as that 4xx); never another exception."""
    h = Harness(snapshot_of(ANY_ANSWER_ALIASES, routing="retry_after_max_s = 0.05"))
    headers = {name: value for name, value in (("retry-after", retry_after), ("retry-after-ms", retry_after_ms)) if value is not None}
    headers = {name: value for name, value in headers.items() if value.isprintable() and value.isascii()}

    async def step(_: dict[str, Any]) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "application/json", **headers})

    h.upstream.script("text-a", step)
    try:
        if stream:
            run(h.stream("text-a"))
        else:
            run(h.complete("text-a"))
    except GatewayError as refused:
        assert 400 <= refused.status <= 599, refused.message
        assert all(value.isascii() for value in refused.headers.values())
