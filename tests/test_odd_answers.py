"""Odd answers from an upstream, through a real gateway and the stand-in's byte-for-byte ``raw`` step.

Each answer here once went wrong: a stream that starts with a byte-order mark lost its first
words; a chunk saying ``"error": null`` was taken for an error; a JSON error answered to a
stream request became a retried 502; a key echoed in an error reached the log, or a prefix of
it the client; a small gzip body unpacked to gigabytes in the worker.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import backend_toml
from harness import CLIENT_KEY, UPSTREAM_KEY, GatewayProcess, StandIn, group_rss_bytes, local_client, serving

RUN = uuid.uuid4().hex[:6]
ALIASES = ("bom", "error-null", "json-to-stream", "echo-key", "long-reason", "bomb", "half-emoji", "huge-number", "bom-json", "ignores-stream", "streams-anyway")


def upstream_id(alias: str) -> str:
    return f"{RUN}-odd-{alias}"


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    lines = ["[routing]", "backoff_s = 0.05", "cooldown_failures = 100", "", backend_toml(standin, timeout_s=20)]
    for alias in ALIASES:
        lines += [f'[models."{alias}"]', 'backend = "local"', f'model = "{upstream_id(alias)}"', ""]
    with serving("\n".join(lines), tmp_path_factory.mktemp("odd-answers")) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=30.0) as http:
        yield http


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    event = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "x", **extra,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(event)}\n\n"


def raw_stream(*events: str) -> dict[str, Any]:
    return {"kind": "raw", "content_type": "text/event-stream", "body": "".join(events)}


def ask(client: httpx.Client, gateway: GatewayProcess, alias: str, *, stream: bool) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return client.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"})


def streamed_text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", response.text
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])


def test_a_stream_that_begins_with_a_byte_order_mark_loses_no_text(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    standin.script(upstream_id("bom"), [raw_stream(
        "\ufeff" + chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"), "data: [DONE]\n\n",
    )])
    assert streamed_text(ask(client, gateway, "bom", stream=True)) == "Hello"


def test_a_chunk_whose_error_is_null_is_no_error(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    standin.script(upstream_id("error-null"), [raw_stream(
        chunk({"role": "assistant", "content": "fine"}, error=None), chunk({"content": "!"}, error=None), chunk({}, "stop"), "data: [DONE]\n\n",
    )])
    assert streamed_text(ask(client, gateway, "error-null", stream=True)) == "fine!"
    assert len([r for r in standin.requests() if r["model"] == upstream_id("error-null")]) == 1


def test_an_emoji_cut_in_two_utf16_halves_reaches_the_client_as_sent(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """JSON that escapes half of a UTF-16 pair (an upstream slicing text inside an emoji, as JavaScript does)
    is what Python's json, and so the openai SDK, reads: a stream lost those chunks, a whole answer was
    taken for junk, retried and answered 502."""
    half, other_half = "A\ud83d", "\ude00B"
    standin.script(upstream_id("half-emoji"), [raw_stream(
        chunk({"role": "assistant", "content": half}), chunk({"content": other_half}), chunk({}, "stop"), "data: [DONE]\n\n",
    )])
    assert streamed_text(ask(client, gateway, "half-emoji", stream=True)) == half + other_half
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "x",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": half + other_half + " \ud83d"}, "finish_reason": "stop"}]}
    standin.script(upstream_id("half-emoji"), [{"kind": "raw", "body": json.dumps(answer)}])
    whole = ask(client, gateway, "half-emoji", stream=False)
    assert whole.status_code == 200, whole.text
    as_the_sdk_reads_it = json.loads(json.dumps(answer))["choices"][0]["message"]["content"]  # "A😀B \ud83d"
    assert whole.json()["choices"][0]["message"]["content"] == as_the_sdk_reads_it
    assert whole.json()["model"] == "half-emoji"


def test_an_answer_that_begins_with_a_byte_order_mark_is_served(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """As the openai SDK reads it: it was taken for junk, retried and answered 502."""
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "x",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}]}
    standin.script(upstream_id("bom-json"), [{"kind": "raw", "body": "\ufeff" + json.dumps(answer)}])
    response = ask(client, gateway, "bom-json", stream=False)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello"


def test_a_number_beyond_a_float_beside_a_lone_surrogate_is_junk_not_a_fault(
    gateway: GatewayProcess, standin: StandIn, client: httpx.Client
) -> None:
    """Read by the lone surrogate's fallback, 1e400 became inf, which has no JSON to be written as: the
    client got 500 internal_error, a stream was cut without its error event. Now the answer is junk (502
    after its retry) and the chunk is dropped, as any malformed one is."""
    content = '"content":"cut \\ud83d","logprobs":{"content":[{"token":"x","logprob":-1e400}]}'
    answer = ('{"id":"c1","object":"chat.completion","created":1,"model":"x","choices":[{"index":0,'
              '"message":{"role":"assistant",' + content + '},"finish_reason":"stop"}]}')
    standin.script(upstream_id("huge-number"), [{"kind": "raw", "body": answer}] * 2)
    whole = ask(client, gateway, "huge-number", stream=False)
    assert whole.status_code == 502 and whole.json()["error"]["code"] == "upstream_error", whole.text
    bad = 'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"x","choices":[{"index":0,"delta":{' + content + '}}]}\n\n'
    standin.script(upstream_id("huge-number"), [raw_stream(
        chunk({"role": "assistant", "content": "Hel"}), bad, chunk({"content": "lo"}), chunk({}, "stop"), "data: [DONE]\n\n",
    )])
    assert streamed_text(ask(client, gateway, "huge-number", stream=True)) == "Hello"


def test_a_whole_answer_to_a_stream_request_is_relayed_as_its_stream(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """An upstream that ignores `stream` and answers whole: that paid answer was junk, retried (paid again)
    and answered 502 invalid_stream. It now reaches the client as the stream it would have been, read by the
    openai SDK: text, tool calls with their index, usage, [DONE]."""
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "frogs"}'}}
    answer = {"id": "c9", "object": "chat.completion", "created": 7, "model": "x",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello", "tool_calls": [call]}, "finish_reason": "tool_calls"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    # Ending in a blank line, as a server may end a body: read as an event without data, it was "empty".
    standin.script(upstream_id("ignores-stream"), [{"kind": "raw", "body": json.dumps(answer) + "\r\n\r\n"}])
    before = len(standin.requests())
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=CLIENT_KEY, http_client=client)
    chunks = list(sdk.chat.completions.create(model="ignores-stream", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert len(standin.requests()) == before + 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    (delta_call,) = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert (delta_call.index, delta_call.id, delta_call.function.arguments) == (0, "call_1", '{"q": "frogs"}')
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and chunks[-1].usage.total_tokens == 5
    assert {c.model for c in chunks} == {"ignores-stream"}


def test_an_event_stream_answered_to_a_plain_request_is_relayed_as_its_completion(
    gateway: GatewayProcess, standin: StandIn, client: httpx.Client
) -> None:
    """The reverse: a paid stream was junk ("not JSON"), retried and answered 502; now it is the completion
    its chunks add up to."""
    standin.script(upstream_id("streams-anyway"), [raw_stream(
        chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"),
        'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}\n\n', "data: [DONE]\n\n",
    )])
    before = len(standin.requests())
    response = ask(client, gateway, "streams-anyway", stream=False)
    assert response.status_code == 200, response.text
    assert len(standin.requests()) == before + 1
    answer = response.json()
    assert (answer["object"], answer["model"], answer["usage"]["total_tokens"]) == ("chat.completion", "streams-anyway", 4)
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}]


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_a_json_error_answered_with_200_is_judged_by_its_code_in_both_modes(
    gateway: GatewayProcess, standin: StandIn, client: httpx.Client, stream: bool
) -> None:
    """Answered as JSON to a stream request too, it is the same 400 upstream_rejected, not a retried 502."""
    error = {"error": {"code": 400, "message": "the prompt is malformed upstream"}}
    standin.script(upstream_id("json-to-stream"), [{"kind": "raw", "body": json.dumps(error)}])
    before = len(standin.requests())
    response = ask(client, gateway, "json-to-stream", stream=stream)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "upstream_rejected"
    assert "malformed upstream" in response.json()["error"]["message"]
    assert len(standin.requests()) == before + 1  # judged, not retried


def test_an_error_event_mid_stream_keeps_the_key_out_of_the_log_and_the_answer(
    gateway: GatewayProcess, standin: StandIn, client: httpx.Client
) -> None:
    standin.script(upstream_id("echo-key"), [raw_stream(
        chunk({"role": "assistant", "content": "partly"}),
        f'data: {json.dumps({"error": {"message": f"boom {UPSTREAM_KEY}", "code": 500}})}\n\n',
    )])
    response = ask(client, gateway, "echo-key", stream=True)
    assert response.status_code == 200 and "boom [redacted]" in response.text
    assert UPSTREAM_KEY not in response.text
    assert "boom [redacted]" in gateway.process.log_text() and UPSTREAM_KEY not in gateway.process.log_text()


def test_a_long_reason_is_shortened_after_its_key_is_taken_out(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """Cut first, the key's first characters came through, past every pattern that knows a whole key."""
    message = "x " * 145 + UPSTREAM_KEY  # 306 characters: cut at 297, inside the key
    standin.script(upstream_id("long-reason"), [{"kind": "raw", "status": 500, "body": json.dumps({"error": {"message": message}})}])
    response = ask(client, gateway, "long-reason", stream=False)
    assert response.status_code == 502, response.text
    text = response.json()["error"]["message"]
    assert "[redacted]" in text and UPSTREAM_KEY[:7] not in text


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_a_gzip_bomb_is_refused_in_bounded_memory(gateway: GatewayProcess, standin: StandIn, client: httpx.Client, stream: bool) -> None:
    """256 MiB of spaces in 256 KiB of gzip: refused at the answer's bound (64 MiB read) or the unpacking
    one (128 MiB), whichever one socket read reaches first, never unpacked whole."""
    standin.script(upstream_id("bomb"), [{"kind": "raw", "gzip_spaces": 256 << 20}])
    response = ask(client, gateway, "bomb", stream=stream)
    assert response.status_code == 502, response.text
    message = response.json()["error"]["message"]
    assert "larger than 64 MiB" in message or "unpacks to more than 128 MiB" in message, message
    assert group_rss_bytes(gateway.pid, "VmHWM") < 600 << 20  # the gateway's processes' peaks, all together
    assert ask(client, gateway, "bom", stream=True).status_code == 200
