"""Tests for the upstream stand-in (scripts/standin_upstream.py) and its harness.

Gateway integration tests trust the stand-in to behave like vLLM / llama.cpp /
OpenAI in each fault mode, so every step kind is pinned down here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from harness import ProcessStartError, StandIn, local_client, process_gone, start_gateway, start_standin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
USER_TEXT = "Please describe the weather over the Alps in exactly three sentences, thanks a lot!"


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with start_standin() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def clean_standin(standin: StandIn) -> None:
    standin.reset()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=5.0) as http:
        yield http


@pytest.fixture
def model() -> str:
    # A model id per test keeps request logs and cancellations of tests apart.
    return f"m-{uuid.uuid4().hex[:8]}"


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": USER_TEXT}], **extra}


def post_chat(client: httpx.Client, standin: StandIn, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return client.post(f"{standin.base_url}/chat/completions", json=body, **kwargs)


def sse_payloads(text: str) -> list[str]:
    """The payload of each SSE event, asserting every event is exactly `data: ...`."""
    assert text.endswith("\n\n"), repr(text[-40:])
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event[len("data: "):] for event in events]


def decoded_events(payloads: list[str]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def stream_chat(client: httpx.Client, standin: StandIn, body: dict[str, Any]) -> list[str]:
    response = post_chat(client, standin, {**body, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_payloads(response.text)


def read_stream_until_error(client: httpx.Client, standin: StandIn, body: dict[str, Any]) -> tuple[list[str], Exception | None]:
    """Stream a chat and collect the raw `data:` payloads until the transfer fails or ends."""
    payloads: list[str] = []
    error: Exception | None = None
    try:
        with client.stream("POST", f"{standin.base_url}/chat/completions", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    payloads.append(line[len("data: "):])
    except httpx.TransportError as exc:
        error = exc
    return payloads, error


def image_bytes(image: dict[str, Any], expected_mime: str) -> bytes:
    assert image["type"] == "image_url"
    prefix = f"data:{expected_mime};base64,"
    url = image["image_url"]["url"]
    assert url.startswith(prefix), url[:40]
    return base64.b64decode(url[len(prefix):])


# ---------------------------------------------------------------------------- ok replies


def test_ok_non_stream_shape(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A plain request gets a chat.completion echoing the last user text, with usage."""
    response = post_chat(client, standin, chat_body(model))
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == model
    assert data["id"] and isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": f"echo: {USER_TEXT[:60]}", "refusal": None}
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(USER_TEXT) // 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_ok_echo_uses_text_parts(standin: StandIn, client: httpx.Client, model: str) -> None:
    """Content given as a list of parts is echoed from its text parts."""
    content = [{"type": "text", "text": "hello parts"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    assert post_chat(client, standin, body).json()["choices"][0]["message"]["content"] == "echo: hello parts"


def test_ok_stream_events(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A stream is role chunk, N content chunks, a stop chunk, then [DONE] last, without usage."""
    payloads = stream_chat(client, standin, chat_body(model, standin_step={"kind": "ok", "chunks": 3}))
    assert payloads[-1] == "[DONE]"
    events = decoded_events(payloads)
    assert len(events) == 5
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == model for e in events)
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["choices"][0]["delta"]["content"] for e in events[1:4])
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all("usage" not in e for e in events)


def test_stream_usage_chunk_when_asked(standin: StandIn, client: httpx.Client, model: str) -> None:
    """With stream_options.include_usage the last chunk before [DONE] has empty choices and usage."""
    payloads = stream_chat(client, standin, chat_body(model, stream_options={"include_usage": True}))
    assert payloads[-1] == "[DONE]"
    events = decoded_events(payloads)
    assert len(events) == 1 + 5 + 1 + 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_stream_interval_paces_chunks(standin: StandIn, client: httpx.Client, model: str) -> None:
    """interval_ms spaces content chunks out in time."""
    started = time.monotonic()
    stream_chat(client, standin, chat_body(model, standin_step={"kind": "ok", "chunks": 4, "interval_ms": 50}))
    assert time.monotonic() - started >= 0.2


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


def test_tool_call_step(standin: StandIn, client: httpx.Client, model: str) -> None:
    """tool_call answers as OpenAI does a function call: null content, the request's first tool by name."""
    step = {"kind": "tool_call", "arguments": '{"city": "Oslo"}'}
    data = post_chat(client, standin, chat_body(model, tools=[WEATHER_TOOL], standin_step=step)).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    named = post_chat(client, standin, chat_body(model, standin_step={"kind": "tool_call", "name": "other"})).json()
    assert named["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "other", "arguments": "{}"}


def test_tool_call_stream(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A streamed call: id and name in the first tool delta, then the arguments' text in `chunks` pieces."""
    arguments = '{"city": "Oslo", "unit": "celsius"}'
    step = {"kind": "tool_call", "arguments": arguments, "chunks": 4}
    events = decoded_events(stream_chat(client, standin, chat_body(model, tools=[WEATHER_TOOL], standin_step=step)))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    deltas = [e["choices"][0]["delta"]["tool_calls"][0] for e in events if "tool_calls" in e["choices"][0]["delta"]]
    assert len(deltas) == 1 + 4
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["function"]["arguments"] for d in deltas) == arguments
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}


def test_scripted_content(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A step's `content` is the answer's text; a stream gives it in `chunks` pieces."""
    step = {"kind": "ok", "content": '{"answer": 42}', "chunks": 3}
    message = post_chat(client, standin, chat_body(model, standin_step=step)).json()["choices"][0]["message"]
    assert message["content"] == '{"answer": 42}'
    events = decoded_events(stream_chat(client, standin, chat_body(model, standin_step=step)))
    texts = [e["choices"][0]["delta"]["content"] for e in events[1:-1]]
    assert len(texts) == 3 and "".join(texts) == '{"answer": 42}'


# ---------------------------------------------------------------------------- images


def test_image_output_png(standin: StandIn, client: httpx.Client, model: str) -> None:
    """Image modality adds a real PNG data URI to the message."""
    message = post_chat(client, standin, chat_body(model, modalities=["text", "image"])).json()["choices"][0]["message"]
    assert message["content"].startswith("echo: ")
    (image,) = message["images"]
    assert image_bytes(image, "image/png").startswith(PNG_SIGNATURE)


def test_image_output_jpeg_and_lying_mime(standin: StandIn, client: httpx.Client, model: str) -> None:
    """image_format=jpeg returns a real JPEG; image_mime overrides only the declared type."""
    step = {"kind": "ok", "image_format": "jpeg", "image_mime": "image/png"}
    message = post_chat(client, standin, chat_body(model, modalities=["image"], standin_step=step)).json()
    data = image_bytes(message["choices"][0]["message"]["images"][0], "image/png")
    assert data.startswith(JPEG_SIGNATURE) and data.endswith(b"\xff\xd9")


def test_image_in_stream(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A streamed image reply carries exactly one chunk whose delta has images."""
    events = decoded_events(stream_chat(client, standin, chat_body(model, modalities=["image"])))
    image_deltas = [e["choices"][0]["delta"]["images"] for e in events if "images" in e["choices"][0]["delta"]]
    assert len(image_deltas) == 1
    assert image_bytes(image_deltas[0][0], "image/png").startswith(PNG_SIGNATURE)


def test_no_image_step(standin: StandIn, client: httpx.Client, model: str) -> None:
    """no_image answers with text only even when image modality was asked."""
    body = chat_body(model, modalities=["image"], standin_step={"kind": "no_image"})
    message = post_chat(client, standin, body).json()["choices"][0]["message"]
    assert message["content"].startswith("echo: ") and "images" not in message
    events = decoded_events(stream_chat(client, standin, body))
    assert not any("images" in e["choices"][0]["delta"] for e in events)


# ---------------------------------------------------------------------------- errors


def test_status_openai_format(standin: StandIn, client: httpx.Client, model: str) -> None:
    """status/openai gives the OpenAI error object and a Retry-After header."""
    step = {"kind": "status", "status": 429, "format": "openai", "message": "slow down", "code": "rate_limit_exceeded", "retry_after": "2"}
    response = post_chat(client, standin, chat_body(model, standin_step=step))
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert response.json() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}


def test_status_vllm_format(standin: StandIn, client: httpx.Client, model: str) -> None:
    """status/vllm gives vLLM's flat error object with the integer status as code."""
    step = {"kind": "status", "status": 500, "format": "vllm", "message": "engine dead"}
    response = post_chat(client, standin, chat_body(model, standin_step=step))
    assert response.status_code == 500 and "retry-after" not in response.headers
    assert response.json() == {"object": "error", "message": "engine dead", "type": "InternalServerError", "param": None, "code": 500}
    bad = post_chat(client, standin, chat_body(model, standin_step={**step, "status": 400})).json()
    assert bad["type"] == "BadRequestError" and bad["code"] == 400


def test_status_llamacpp_format(standin: StandIn, client: httpx.Client, model: str) -> None:
    """status/llamacpp gives llama.cpp's {error: {code, message, type}} with Retry-After."""
    step = {"kind": "status", "status": 503, "format": "llamacpp", "message": "Loading model", "retry_after": "5"}
    response = post_chat(client, standin, chat_body(model, standin_step=step))
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json() == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


def test_status_text_format(standin: StandIn, client: httpx.Client, model: str) -> None:
    """status/text gives a plain-text body."""
    step = {"kind": "status", "status": 502, "format": "text", "message": "Bad Gateway from nginx"}
    response = post_chat(client, standin, chat_body(model, standin_step=step))
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Bad Gateway from nginx"


@pytest.mark.parametrize(
    ("fmt", "status", "marker"),
    [
        ("openai", 400, "context_length_exceeded"),
        ("vllm", 400, "maximum context length is 8192 tokens"),
        ("llamacpp", 400, "exceed_context_size_error"),
        ("llamacpp", 500, "exceed_context_size_error"),
    ],
)
def test_context_length(standin: StandIn, client: httpx.Client, model: str, fmt: str, status: int, marker: str) -> None:
    """context_length gives each provider's real context-overflow refusal at the given status."""
    step = {"kind": "context_length", "format": fmt, "status": status}
    response = post_chat(client, standin, chat_body(model, standin_step=step))
    assert response.status_code == status
    data = response.json()
    assert marker in response.text
    if fmt == "openai":
        assert data["error"]["param"] == "messages" and data["error"]["type"] == "invalid_request_error"
    elif fmt == "vllm":
        assert data["object"] == "error" and data["type"] == "BadRequestError" and data["code"] == 400
    else:
        assert data["error"]["n_prompt_tokens"] == 9000 and data["error"]["n_ctx"] == 8192
        assert data["error"]["code"] == status


def test_content_filter(standin: StandIn, client: httpx.Client, model: str) -> None:
    """content_filter gives a 400 with code content_filter."""
    response = post_chat(client, standin, chat_body(model, standin_step={"kind": "content_filter"}))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "content_filter" and "content management policy" in error["message"]


def test_invalid_json(standin: StandIn, client: httpx.Client, model: str) -> None:
    """invalid_json answers 200 application/json with an unparsable body."""
    response = post_chat(client, standin, chat_body(model, standin_step={"kind": "invalid_json"}))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.content == b"not json{"


def test_reset_is_transport_error(standin: StandIn, client: httpx.Client, model: str) -> None:
    """reset drops the connection before any response, which the client sees as a transport error."""
    with pytest.raises(httpx.TransportError):
        post_chat(client, standin, chat_body(model, standin_step={"kind": "reset"}))
    assert standin.connections()["cancelled"] == []
    assert post_chat(client, standin, chat_body(model)).status_code == 200


# ---------------------------------------------------------------------------- hangs, delays, cancellation


def assert_cancel_seen_within_a_second(standin: StandIn, model: str, client_left_at: float) -> dict[str, Any]:
    cancelled = [c for c in standin.wait_for_cancelled(timeout_s=1.0) if c["model"] == model]
    assert cancelled, standin.connections()
    assert cancelled[0]["t"] - client_left_at < 1.0
    return cancelled[0]


def test_hang_records_cancellation(standin: StandIn, model: str) -> None:
    """hang never answers; when the client gives up the stand-in records a cancellation."""
    with local_client(timeout_s=0.3) as short_client, pytest.raises(httpx.ReadTimeout):
        post_chat(short_client, standin, chat_body(model, standin_step={"kind": "hang"}))
    client_left_at = time.time()
    entry = assert_cancel_seen_within_a_second(standin, model, client_left_at)
    assert entry["chunks_sent"] == 0
    assert standin.connections()["in_flight"] == 0


def test_delay_step(standin: StandIn, client: httpx.Client, model: str) -> None:
    """delay waits first_byte_ms before an ok reply; a client leaving early is recorded."""
    step = {"kind": "delay", "first_byte_ms": 400}
    with local_client(timeout_s=0.1) as short_client, pytest.raises(httpx.ReadTimeout):
        post_chat(short_client, standin, chat_body(model, standin_step=step))
    assert_cancel_seen_within_a_second(standin, model, time.time())
    started = time.monotonic()
    response = post_chat(client, standin, chat_body(model, standin_step=step))
    assert response.status_code == 200 and time.monotonic() - started >= 0.4


def test_delay_ms_on_any_step(standin: StandIn, client: httpx.Client, model: str) -> None:
    """delay_ms on any step postpones its first byte, here of an error."""
    started = time.monotonic()
    response = post_chat(client, standin, chat_body(model, standin_step={"kind": "status", "status": 503, "delay_ms": 250}))
    assert response.status_code == 503 and time.monotonic() - started >= 0.25


def test_in_flight_counts_open_requests(standin: StandIn, model: str) -> None:
    """in_flight counts chat requests still being answered."""
    async def hold_and_count() -> int:
        async with httpx.AsyncClient(timeout=0.6, trust_env=False) as async_client:
            hang = asyncio.create_task(
                async_client.post(f"{standin.base_url}/chat/completions", json=chat_body(model, standin_step={"kind": "hang"}))
            )
            await asyncio.sleep(0.3)
            count = (await async_client.get(f"{standin.root_url}/_standin/connections")).json()["in_flight"]
            with pytest.raises(httpx.ReadTimeout):
                await hang
            return int(count)

    assert asyncio.run(hold_and_count()) == 1
    assert_cancel_seen_within_a_second(standin, model, time.time())


# ---------------------------------------------------------------------------- stream faults


def test_stream_cut(standin: StandIn, client: httpx.Client, model: str) -> None:
    """stream_cut sends the role chunk and k content chunks, then drops the connection."""
    payloads, error = read_stream_until_error(client, standin, chat_body(model, standin_step={"kind": "stream_cut", "after_chunks": 2}))
    assert error is not None
    events = decoded_events(payloads)
    assert len(events) == 3 and "[DONE]" not in payloads
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"


def test_stream_stall(standin: StandIn, model: str) -> None:
    """stream_stall sends k content chunks then goes silent; the client leaving is recorded with chunks_sent."""
    body = chat_body(model, stream=True, standin_step={"kind": "stream_stall", "after_chunks": 2, "stall_s": 30})
    payloads: list[str] = []
    with (
        local_client(timeout_s=0.4) as short_client,
        pytest.raises(httpx.ReadTimeout),
        short_client.stream("POST", f"{standin.base_url}/chat/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[len("data: "):])
    entry = assert_cancel_seen_within_a_second(standin, model, time.time())
    assert len(payloads) == 3
    assert entry["chunks_sent"] == 3


def test_stream_stall_then_resumes(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A short stall_s ends and the stream completes normally."""
    step = {"kind": "stream_stall", "after_chunks": 1, "stall_s": 0.2, "chunks": 3}
    payloads = stream_chat(client, standin, chat_body(model, standin_step=step))
    assert payloads[-1] == "[DONE]" and len(decoded_events(payloads)) == 5


def test_malformed_chunk(standin: StandIn, client: httpx.Client, model: str) -> None:
    """malformed_chunk inserts `data: {not json` after content chunk k of an otherwise normal stream."""
    payloads = stream_chat(client, standin, chat_body(model, standin_step={"kind": "malformed_chunk", "at": 2, "chunks": 4}))
    assert payloads[3] == "{not json"
    assert payloads[-1] == "[DONE]"
    well_formed = [json.loads(p) for p in payloads if p not in ("{not json", "[DONE]")]
    assert len(well_formed) == 1 + 4 + 1


def test_no_done(standin: StandIn, client: httpx.Client, model: str) -> None:
    """no_done ends a normal stream (usage included when asked) cleanly without [DONE]."""
    body = chat_body(model, stream_options={"include_usage": True}, standin_step={"kind": "no_done"})
    payloads = stream_chat(client, standin, body)
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["usage"]["total_tokens"] > 0


def test_error_event(standin: StandIn, client: httpx.Client, model: str) -> None:
    """error_event sends k content chunks, then an error event, and no [DONE]."""
    payloads = stream_chat(client, standin, chat_body(model, standin_step={"kind": "error_event", "after_chunks": 1}))
    assert "[DONE]" not in payloads
    assert len(payloads) == 3
    assert json.loads(payloads[-1]) == {"error": {"message": "upstream overloaded", "code": 502}}


def test_stream_faults_on_non_stream_requests(standin: StandIn, model: str) -> None:
    """Without stream: stream_cut acts as reset, stream_stall as hang, the others as ok."""
    with local_client(timeout_s=0.3) as short_client:
        with pytest.raises(httpx.TransportError) as cut:
            post_chat(short_client, standin, chat_body(model, standin_step={"kind": "stream_cut"}))
        assert not isinstance(cut.value, httpx.TimeoutException)
        with pytest.raises(httpx.ReadTimeout):
            post_chat(short_client, standin, chat_body(model, standin_step={"kind": "stream_stall"}))
        for kind in ("malformed_chunk", "no_done", "error_event"):
            response = post_chat(short_client, standin, chat_body(model, standin_step={"kind": kind}))
            assert response.json()["object"] == "chat.completion", kind


# ---------------------------------------------------------------------------- scripts and control


def test_script_consumed_in_order_with_sticky_last(standin: StandIn, client: httpx.Client, model: str) -> None:
    """Scripted steps are consumed per request and the last one repeats."""
    standin.script(model, [{"kind": "status", "status": 503}, {"kind": "status", "status": 429}, {"kind": "ok"}])
    statuses = [post_chat(client, standin, chat_body(model)).status_code for _ in range(5)]
    assert statuses == [503, 429, 200, 200, 200]
    assert post_chat(client, standin, chat_body("other-model")).status_code == 200


def test_script_repost_replaces(standin: StandIn, client: httpx.Client, model: str) -> None:
    """Posting a new script for a model replaces the old one and restarts it."""
    standin.script(model, [{"kind": "status", "status": 500}])
    assert post_chat(client, standin, chat_body(model)).status_code == 500
    standin.script(model, [{"kind": "content_filter"}, {"kind": "ok"}])
    assert [post_chat(client, standin, chat_body(model)).status_code for _ in range(3)] == [400, 200, 200]


def test_standin_step_overrides_script(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A body's standin_step wins over the script and does not consume it."""
    standin.script(model, [{"kind": "status", "status": 503}, {"kind": "status", "status": 504}])
    assert post_chat(client, standin, chat_body(model, standin_step={"kind": "ok"})).status_code == 200
    assert post_chat(client, standin, chat_body(model)).status_code == 503


def test_script_rejects_bad_payload(standin: StandIn, client: httpx.Client) -> None:
    """The script endpoint refuses a payload without a model or steps."""
    assert client.post(f"{standin.root_url}/_standin/script", json={"steps": []}).status_code == 400


def test_request_log(standin: StandIn, client: httpx.Client, model: str) -> None:
    """The request log keeps arrival time, model, path, lower-cased headers, body and step."""
    before = time.time()
    standin.script(model, [{"kind": "status", "status": 418}])
    payload = json.dumps(chat_body(model)).encode()
    headers = {"Authorization": "Bearer sk-test", "X-Trace-Id": "abc", "Content-Type": "application/json"}
    client.post(f"{standin.base_url}/chat/completions", content=payload, headers=headers)
    (entry,) = standin.requests()
    assert before <= entry["t"] <= time.time()
    assert entry["model"] == model and entry["path"] == "/v1/chat/completions"
    assert entry["headers"]["authorization"] == "Bearer sk-test"
    assert entry["headers"]["x-trace-id"] == "abc"
    assert entry["body"] == chat_body(model)
    assert entry["body_bytes"] == len(payload)
    assert entry["step"] == {"kind": "status", "status": 418}


def test_large_body_accepted_but_not_logged(standin: StandIn, client: httpx.Client, model: str) -> None:
    """A 20 MB body is accepted; the log keeps its size but not its content."""
    image_url = "data:image/png;base64," + "A" * (20 * 1024 * 1024)
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": image_url}}]
    payload = json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()
    response = client.post(f"{standin.base_url}/chat/completions", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: what is this"
    (entry,) = standin.requests()
    assert entry["body"] is None and entry["body_bytes"] == len(payload) and entry["model"] == model


def test_any_chat_completions_path(standin: StandIn, client: httpx.Client, model: str) -> None:
    """Any path ending in /chat/completions is served and logged with its path."""
    response = client.post(f"{standin.root_url}/openai/deployments/x/chat/completions", json=chat_body(model))
    assert response.status_code == 200
    assert standin.requests()[0]["path"] == "/openai/deployments/x/chat/completions"


def test_models_list(standin: StandIn, client: httpx.Client, model: str) -> None:
    """GET /v1/models lists scripted models in the OpenAI list shape."""
    standin.script(model, [{"kind": "ok"}])
    data = client.get(f"{standin.base_url}/models").json()
    assert data["object"] == "list"
    assert model in {m["id"] for m in data["data"]}
    assert all(m["object"] == "model" for m in data["data"])


def test_reset_clears_state(standin: StandIn, client: httpx.Client, model: str) -> None:
    """/_standin/reset clears scripts, the request log and cancellations."""
    standin.script(model, [{"kind": "status", "status": 500}])
    post_chat(client, standin, chat_body(model))
    standin.reset()
    assert standin.requests() == []
    assert standin.connections() == {"in_flight": 0, "cancelled": []}
    assert post_chat(client, standin, chat_body(model)).status_code == 200


def test_many_concurrent_streams(standin: StandIn, model: str) -> None:
    """250 concurrent paced streams all complete."""
    async def run_streams(count: int) -> list[str]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(timeout=10.0, limits=limits, trust_env=False) as async_client:
            body = chat_body(model, stream=True, standin_step={"kind": "ok", "chunks": 5, "interval_ms": 20})

            async def one() -> str:
                response = await async_client.post(f"{standin.base_url}/chat/completions", json=body)
                return sse_payloads(response.text)[-1]

            return await asyncio.gather(*(one() for _ in range(count)))

    assert asyncio.run(run_streams(250)) == ["[DONE]"] * 250


# ---------------------------------------------------------------------------- harness: start_gateway

FAKE_GATEWAY_MAIN = '''
"""Stands in for `python -m gateway serve`: forks a worker, serves /healthz and /facts."""
import argparse, json, os, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("command")
parser.add_argument("--config")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
parser.add_argument("--workers", type=int)
args = parser.parse_args()
if os.environ.get("FAKE_GATEWAY_FAIL"):
    print("fake gateway: config is broken", flush=True)
    sys.exit(3)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
facts = {"argv": sys.argv[1:], "worker_pid": worker.pid, "marker": os.environ.get("FAKE_MARKER")}

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(facts).encode()
        self.send_response(200 if self.path in ("/healthz", "/facts") else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

# Ignoring SIGTERM shows that stop() escalates to SIGKILL for the whole group.
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
HTTPServer((args.host, args.port), Handler).serve_forever()
'''


@pytest.fixture
def fake_gateway_path(tmp_path: Any) -> str:
    package = tmp_path / "gateway"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_GATEWAY_MAIN)
    return str(tmp_path)


def test_start_gateway_contract_and_group_kill(fake_gateway_path: str, tmp_path: Any) -> None:
    """start_gateway runs `-m gateway serve` with the agreed flags, waits for /healthz, and stop() kills its workers."""
    config = tmp_path / "gateway.toml"
    gateway = start_gateway(config, env={"PYTHONPATH": fake_gateway_path, "FAKE_MARKER": "yes"}, workers=3, log_dir=tmp_path)
    try:
        with local_client() as http:
            facts = http.get(f"{gateway.url}/facts").json()
        assert facts["argv"] == ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(gateway.port), "--workers", "3"]
        assert facts["marker"] == "yes"
    finally:
        gateway.stop(grace_s=0.5)
    assert process_gone(gateway.pid) and process_gone(facts["worker_pid"])


def test_start_gateway_failure_shows_log(fake_gateway_path: str, tmp_path: Any) -> None:
    """A gateway that exits early fails start_gateway fast, with its log tail in the error."""
    env = {"PYTHONPATH": fake_gateway_path, "FAKE_GATEWAY_FAIL": "1"}
    started = time.monotonic()
    with pytest.raises(ProcessStartError, match="config is broken"):
        start_gateway(tmp_path / "gateway.toml", env=env)
    assert time.monotonic() - started < 10
