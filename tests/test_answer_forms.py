"""An answer in the other form (gateway.answer_forms): a whole completion as stream events, a stream as one completion."""

from __future__ import annotations

import json
from typing import Any

from gateway.answer_forms import Folded, completion_as_events, events_as_completion
from gateway.config import parse_config
from gateway.dispatch import MOVE_ON, OK, STOP, answer_verdict
from gateway.shaping import gather_part_images
from gateway.snapshot import build_snapshot

SNAPSHOT = build_snapshot(parse_config(
    b'[backends.b]\nbase_url = "http://127.0.0.1:9/v1"\n[models.m]\nbackend = "b"\nmodel = "x"\n'
    b'[models.painter]\nbackend = "b"\nmodel = "p"\ninput = ["text", "image"]\noutput = ["image", "text"]\n'
), environ={})
TARGET, PAINTER = SNAPSHOT.aliases["m"].targets[0], SNAPSHOT.aliases["painter"].targets[0]

CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "frogs"}'}}
COMPLETION: dict[str, Any] = {
    "id": "c9", "object": "chat.completion", "created": 7, "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there", "tool_calls": [CALL]}, "finish_reason": "tool_calls"},
        {"index": 1, "message": {"role": "assistant", "content": "Other"}, "finish_reason": "stop"},
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def sse(events: list[bytes | None]) -> bytes:
    return b"".join(b"data: " + (e or b"") + b"\n\n" for e in events)


def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    body = {"id": "c9", "object": "chat.completion.chunk", "created": 7, "model": "m", **extra,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return json.dumps(body).encode()


def test_a_completion_and_its_events_are_the_same_answer() -> None:
    """Turned into events and back, a completion is itself: text, indexed tool calls, choices, usage."""
    events = completion_as_events(COMPLETION)
    assert events[-1] == b"[DONE]"
    first = json.loads(events[0] or b"")
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert "usage" not in first and json.loads(events[-2] or b"")["usage"] == COMPLETION["usage"]
    back = events_as_completion(sse(events)).answer
    assert back is not None
    for choice in back["choices"]:
        for call in choice["message"].get("tool_calls", []):
            call.pop("index", None)
    assert back == COMPLETION


def test_deltas_in_pieces_are_joined() -> None:
    """Text and a tool call's arguments arrive in pieces, the call named by its first; interleaved choices."""
    raw = sse([
        chunk(0, {"role": "assistant", "content": ""}),
        chunk(0, {"content": "Hel"}),
        chunk(1, {"role": "assistant", "content": "B"}),
        chunk(0, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}]}),
        chunk(0, {"content": "lo", "tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}),
        chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": '"frogs"}'}}]}, "tool_calls"),
        b": keep-alive",
        chunk(1, {}, "stop"),
        json.dumps({"id": "c9", "choices": [], "usage": {"total_tokens": 9}}).encode(),
        b"[DONE]",
    ])
    answer = events_as_completion(raw).answer
    assert answer is not None and answer["object"] == "chat.completion" and answer["usage"] == {"total_tokens": 9}
    first, second = answer["choices"]
    assert first["message"]["content"] == "Hello" and first["finish_reason"] == "tool_calls"
    assert first["message"]["tool_calls"] == [CALL]
    assert (second["index"], second["message"]["content"], second["finish_reason"]) == (1, "B", "stop")


def test_a_cut_stream_adds_up_to_no_answer() -> None:
    """A choice without its finish reason, or no chunk at all, is no whole answer."""
    assert events_as_completion(sse([chunk(0, {"content": "half an ans"})])) == Folded()
    assert events_as_completion(sse([chunk(0, {"content": "A"}, "stop"), chunk(1, {"content": "B"})])) == Folded()
    assert events_as_completion(b": keep-alive\n\ndata: [DONE]\n\n") == Folded()


def test_a_stream_that_opens_with_a_comment_or_a_field_is_read_as_one() -> None:
    """The fold is tried for any event stream's opening: a comment (": ok"), `event:`, `id:`, `data:`."""
    body = sse([chunk(0, {"content": "A"}, "stop"), b"[DONE]"])
    for opening in (b": OPENROUTER PROCESSING\n\n", b"event: message\n", b"id: 1\n", b"\xef\xbb\xbf", b""):
        assert answer_verdict(TARGET, opening + body).action == OK, opening


def test_content_in_parts_is_kept_and_an_image_part_is_an_image() -> None:
    """List content (an image as a part) overwrote what came before: text was lost, and an image-output
    alias answered 502 no_image_generated over the image it had."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    raw = sse([
        chunk(0, {"role": "assistant", "content": "text first"}),
        chunk(0, {"content": [image]}),
        chunk(0, {"content": [{"type": "text", "text": " and"}]}),
        chunk(0, {"content": " done", "reasoning_details": [{"text": "a"}]}),
        chunk(0, {"reasoning_details": [{"text": "b"}]}, "stop"),
    ])
    answer = events_as_completion(raw).answer
    assert answer is not None
    message = answer["choices"][0]["message"]
    assert message["content"] == [{"type": "text", "text": "text first"}, image, {"type": "text", "text": " and done"}]
    assert message["reasoning_details"] == [{"text": "a"}, {"text": "b"}]
    assert answer_verdict(PAINTER, raw).action == OK  # an image-output alias has its image


def test_tool_call_pieces_without_an_index_join_by_id_or_the_last_call() -> None:
    first = {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x":'}}
    raw = sse([
        chunk(0, {"tool_calls": [first]}),
        chunk(0, {"tool_calls": [{"function": {"arguments": "1}"}}]}),
        chunk(0, {"tool_calls": [{"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk(0, {"tool_calls": [{"id": "call_a", "function": {"arguments": ""}}]}, "tool_calls"),
    ])
    answer = events_as_completion(raw).answer
    assert answer is not None
    calls = answer["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("call_a", "f", '{"x":1}'), ("call_b", "g", "{}")]


def test_an_error_event_in_a_folded_stream_is_judged_by_its_status() -> None:
    """It was junk ("not JSON"), retried on the same target: a 401 or 400 in disguise is no transient fault."""
    refused = sse([json.dumps({"error": {"message": "bad parameter", "code": 400}}).encode()])
    assert answer_verdict(TARGET, refused).action == STOP
    unauthorised = sse([chunk(0, {"content": "A"}), json.dumps({"error": {"message": "no key", "code": 401}}).encode()])
    assert answer_verdict(TARGET, unauthorised).action == MOVE_ON


def folded(*events: bytes | None) -> dict[str, Any]:
    answer = events_as_completion(sse(list(events))).answer
    assert answer is not None
    return answer


def test_null_content_beside_tool_calls_stays_null() -> None:
    """`"content": null` (OpenAI's tool-call deltas, llama.cpp's every chunk) made the content a list of parts."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = folded(chunk(0, {"role": "assistant", "content": None, "tool_calls": [call]}), chunk(0, {"content": None}, "tool_calls"))["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "f"
    text = folded(chunk(0, {"content": None, "reasoning_content": "Think"}), chunk(0, {"content": "Ans"}, "stop"))["choices"][0]["message"]
    assert (text["content"], text["reasoning_content"]) == ("Ans", "Think")


def test_function_call_and_audio_pieces_are_joined() -> None:
    answer = folded(
        chunk(0, {"function_call": {"name": "get_weather", "arguments": ""}, "audio": {"id": "audio_1", "transcript": "Hel"}}),
        chunk(0, {"function_call": {"arguments": '{"city":'}, "audio": {"transcript": "lo", "data": "UklG"}}),
        chunk(0, {"function_call": {"arguments": '"Paris"}'}, "audio": {"data": "RiQA"}}),
        chunk(0, {"audio": {"expires_at": 17}}, "function_call"),
    )
    message = answer["choices"][0]["message"]
    assert message["function_call"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert message["audio"] == {"id": "audio_1", "transcript": "Hello", "data": "UklGRiQA", "expires_at": 17}


def test_done_without_a_finish_reason_is_a_whole_answer() -> None:
    """The relay takes [DONE] as the end; folded, the same stream was junk, retried and answered 502."""
    answer = folded(chunk(0, {"role": "assistant", "content": "Hel"}), chunk(0, {"content": "lo"}), b"[DONE]")
    assert answer["choices"][0]["message"]["content"] == "Hello" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer_verdict(TARGET, sse([chunk(0, {"content": "cut"})])).outcome == "invalid_stream"


def test_tool_call_numbers_need_not_start_at_zero() -> None:
    """An upstream numbering calls from 1 left an empty call at 0 that the next turn sent back."""
    call = {"index": 1, "id": "call_z", "type": "function", "function": {"name": "g", "arguments": "{"}}
    answer = folded(chunk(0, {"tool_calls": [call]}), chunk(0, {"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]}, "tool_calls"))
    assert answer["choices"][0]["message"]["tool_calls"] == [{"id": "call_z", "type": "function", "function": {"name": "g", "arguments": "{}"}}]


def test_an_event_holding_a_whole_message_is_read() -> None:
    """Some servers send the whole message in one event, under `message`: its text was lost."""
    whole = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole"}, "finish_reason": "stop"}]})
    assert folded(whole.encode(), b"[DONE]")["choices"][0]["message"]["content"] == "Whole"


def test_a_whole_answers_image_parts_are_its_images_once() -> None:
    """Gathered to judge the answer, then again as its stream was relayed: the client got each image twice."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": [{"type": "text", "text": "here"}, image]}, "finish_reason": "stop"}]}
    verdict = answer_verdict(PAINTER, json.dumps(answer).encode())
    assert verdict.action == OK
    (first, _done) = completion_as_events(verdict.answer.answer)
    delta = json.loads(first or b"")["choices"][0]["delta"]
    gather_part_images(delta)
    assert delta["images"] == [image]
