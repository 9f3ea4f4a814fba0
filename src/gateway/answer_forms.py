"""An answer in the other form: a whole completion as stream events, or a stream's events as one completion.

Some upstreams ignore ``stream``: they answer a stream request with the whole
``chat.completion``, or a plain request with an event stream. Either answer is
paid for and whole, so the gateway gives the client the form it asked for
instead of taking it for junk, retrying it (paying again) and answering 502.
Pure functions, tested without a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import msgspec

from gateway.shaping import choices_of, decode_answer, encode
from gateway.sse import DONE, SSEDecoder

# What a completion and its chunks share, besides their choices and usage.
_HEAD_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")
# Objects of a delta whose string members arrive in pieces, joined; the rest taken as given.
_JOINED_IN = {"function_call": ("name", "arguments"), "audio": ("data", "transcript")}
# Where a folded tool call keeps the upstream's number for it while the stream is folded.
_UPSTREAM_INDEX = "\x00index"
# Text fields of a delta that arrive in pieces and are joined (content has its own joining, for parts).
_JOINED_TEXT = ("reasoning", "reasoning_content", "refusal")


def completion_as_events(answer: Mapping[str, Any]) -> list[bytes | None]:
    """A whole ``chat.completion`` as the event data a stream of it would have sent, ``[DONE]`` last.

    For an upstream that answers a stream request with the whole answer (some ignore
    ``stream``): one chunk per choice, its delta the message (tool calls indexed, as
    deltas carry them) with its finish reason; the usage rides on the last chunk, not
    a chunk of its own with no choices, which a client that did not ask for one may
    not expect.
    """
    base = _head(answer, "chat.completion.chunk")
    chunks: list[dict[str, Any]] = []
    for position, choice in enumerate(choices_of(answer)):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        delta = dict(message) if isinstance(message, dict) else {}
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            delta["tool_calls"] = [{"index": n, **call} if isinstance(call, dict) else call for n, call in enumerate(calls)]
        part = {"index": choice.get("index", position), "delta": delta, "finish_reason": choice.get("finish_reason")}
        if "logprobs" in choice:
            part["logprobs"] = choice["logprobs"]
        chunks.append({**base, "choices": [part]})
    if isinstance(answer.get("usage"), dict):
        if not chunks:
            chunks.append({**base, "choices": []})
        chunks[-1]["usage"] = answer["usage"]
    return [*(encode(chunk) for chunk in chunks), DONE]


def _head(source: Mapping[str, Any], kind: str) -> dict[str, Any]:
    head: dict[str, Any] = {key: source[key] for key in _HEAD_KEYS if key in source}
    head["object"] = kind
    return head


class Folded(NamedTuple):
    """What an event stream adds up to: a completion, or the error event it ended with, or neither (junk, or cut)."""

    answer: dict[str, Any] | None = None
    error: bytes | None = None


def events_as_completion(raw: bytes) -> Folded:
    """The ``chat.completion`` an event stream's chunks add up to, or its error event.

    Neither when ``raw`` holds no chunk, or a choice without its finish reason:
    a cut stream is not an answer.
    """
    decoder = SSEDecoder()
    chunks: list[dict[str, Any]] = []
    done = False
    for data in [*decoder.feed(raw), *decoder.finish()]:
        if data is not None and data.strip() == DONE:
            done = True
        if data is None or done:
            continue
        try:
            chunk = decode_answer(data)
        except (msgspec.DecodeError, RecursionError):
            continue  # dropped, as the relay drops a malformed chunk
        if isinstance(chunk, dict) and chunk.get("error") is not None:
            return Folded(error=data)  # judged as the relay judges one: by the status it names
        if isinstance(chunk, dict):
            chunks.append(chunk)
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk["usage"] if isinstance(chunk.get("usage"), dict) else usage
        for part in choices_of(chunk):
            if isinstance(part, dict):
                _fold_choice(choices, part)
    unfinished = [choice for choice in choices.values() if choice.get("finish_reason") is None]
    if not choices or unfinished and not done:
        return Folded()
    for choice in unfinished:
        choice["finish_reason"] = "stop"  # [DONE] said the answer is whole, as the relay takes it
    for choice in choices.values():
        for call in choice["message"].get("tool_calls", ()):
            call.pop(_UPSTREAM_INDEX, None)
    answer = _head(chunks[0], "chat.completion")
    answer["choices"] = [choices[index] for index in sorted(choices)]
    if usage is not None:
        answer["usage"] = usage
    return Folded(answer=answer)


def _fold_choice(choices: dict[int, dict[str, Any]], part: Mapping[str, Any]) -> None:
    index = part.get("index", 0)
    index = index if type(index) is int else 0
    choice = choices.setdefault(index, {"index": index, "message": {"role": "assistant"}, "finish_reason": None})
    message = choice["message"]
    # A chunk that holds a whole message (some servers' last event) is read as its delta.
    delta = part.get("delta") if "delta" in part else part.get("message")
    for key, value in (delta.items() if isinstance(delta, dict) else ()):
        if key == "content":
            _fold_content(message, value)
        elif key in _JOINED_TEXT and isinstance(value, str):
            message[key] = (message.get(key) or "") + value
        elif key in _JOINED_IN and isinstance(value, dict):
            held = message.setdefault(key, {})
            for inner, piece in value.items():
                joined = inner in _JOINED_IN[key] and isinstance(piece, str) and isinstance(held.get(inner), str)
                held[inner] = held[inner] + piece if joined else piece
        elif key == "tool_calls" and isinstance(value, list):
            _fold_tool_calls(message.setdefault("tool_calls", []), value)
        elif isinstance(value, list) and isinstance(message.get(key), list):
            message[key].extend(value)  # images, reasoning_details: each chunk brings more
        elif value is not None:
            message[key] = list(value) if isinstance(value, list) else value
    if part.get("finish_reason") is not None:
        choice["finish_reason"] = part["finish_reason"]
    logprobs = part.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        held = choice.setdefault("logprobs", {"content": []})
        held.setdefault("content", []).extend(logprobs["content"])


def _fold_content(message: dict[str, Any], value: Any) -> None:
    """Join content deltas: text to text; once a delta brings parts (an image, say), a list of parts."""
    held = message.get("content")
    if value is None:
        message.setdefault("content", None)  # said with tool calls: no text, and no reason to make parts
        return
    if isinstance(value, str) and (held is None or isinstance(held, str)):
        message["content"] = (held or "") + value
        return
    parts = [{"type": "text", "text": held}] if isinstance(held, str) and held else list(held) if isinstance(held, list) else []
    for piece in value if isinstance(value, list) else [value] if isinstance(value, str) else []:
        if isinstance(piece, str):
            piece = {"type": "text", "text": piece}
        if isinstance(piece, dict) and piece.get("type") == "text" and parts and parts[-1].get("type") == "text":
            parts[-1] = {**parts[-1], "text": str(parts[-1].get("text", "")) + str(piece.get("text", ""))}
        else:
            parts.append(piece)
    message["content"] = parts


def _fold_tool_calls(calls: list[dict[str, Any]], pieces: Iterable[Any]) -> None:
    """Join tool-call deltas: by their ``index``, else by their ``id``; a piece with neither goes on the
    last call. The first piece names a call, later ones add to its arguments."""
    for piece in pieces:
        if not isinstance(piece, dict):
            continue
        call = _call_for(calls, piece)
        for key in ("id", "type"):
            if isinstance(piece.get(key), str):
                call[key] = piece[key]
        function = piece.get("function")
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    call["function"][key] += function[key]


def _call_for(calls: list[dict[str, Any]], piece: Mapping[str, Any]) -> dict[str, Any]:
    """The call a piece adds to: the one of its ``index`` (numbered as the upstream likes, from 1 say),
    else of its ``id``; a piece with neither goes on the last call. A new one otherwise."""
    index, key = piece.get("index"), piece.get("id")
    if type(index) is int:
        same = [call for call in calls if call.get(_UPSTREAM_INDEX) == index]
    else:
        same = [call for call in calls if key is not None and call.get("id") == key]
        if not same and key is None and calls:
            same = calls[-1:]
    if same:
        return same[0]
    call: dict[str, Any] = {"type": "function", "function": {"name": "", "arguments": ""}}
    if type(index) is int:
        call[_UPSTREAM_INDEX] = index  # taken out once the stream is folded
    calls.append(call)
    return call
