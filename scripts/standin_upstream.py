#!/usr/bin/env python3
"""OpenAI-compatible upstream stand-in with scriptable fault injection.

Integration tests run the gateway against this server instead of a real
vLLM / llama.cpp / OpenAI backend.  Each chat request consumes a "step" that
says how to answer: a normal reply, a provider-shaped error, a dropped
connection, a hung or broken stream, and so on.  Control endpoints under
``/_standin/`` let a test script steps per model and inspect what the gateway
actually sent and when it hung up.

Run: ``python scripts/standin_upstream.py --host 127.0.0.1 --port 0``; the first
stdout line is ``listening on http://HOST:PORT``.

Dependencies: stdlib + aiohttp (uvloop if importable).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import signal
import socket
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiohttp import web

MAX_BODY_BYTES = 256 * 1024 * 1024
# Bodies above this are not kept in the request log: tests send 20 MB images
# and only need to know the size arrived intact.
MAX_LOGGED_BODY_BYTES = 1024 * 1024
# Nor bodies nested past what the tests' JSON reader follows inside the log's own nesting.
MAX_LOGGED_NESTING = 200
# Every wait the stand-in does is capped so a forgotten hang cannot outlive a CI run.
MAX_SLEEP_S = 600.0
DEFAULT_MODEL_IDS = ("standin-model",)

STREAM_FAULT_KINDS = {"stream_cut", "stream_stall", "malformed_chunk", "no_done", "error_event"}
# What a stream fault means when the request did not ask for a stream.
NON_STREAM_FALLBACK = {"stream_cut": "reset", "stream_stall": "hang"}

Step = dict[str, Any]
Json = dict[str, Any]


# --------------------------------------------------------------------------- images


def _png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    checksum = zlib.crc32(chunk_type + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", checksum)


def make_tiny_png() -> bytes:
    """A valid 1x1 opaque red RGB PNG."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit, truecolour
    scanline = b"\x00" + b"\xff\x00\x00"  # filter byte 0, then one red pixel
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanline))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def make_tiny_jpeg() -> bytes:
    """A valid 8x8 mid-grey baseline JPEG.

    One component, one block whose DC and AC coefficients are all zero, so each
    Huffman table needs a single one-bit code (symbol 0): the scan is the bits
    "0" (DC category 0) and "0" (end of block), padded with ones.
    """
    jfif = b"JFIF\x00" + bytes([1, 1, 0]) + struct.pack(">HH", 1, 1) + bytes([0, 0])
    quant = bytes([0]) + bytes([1] * 64)
    frame = bytes([8]) + struct.pack(">HH", 8, 8) + bytes([1, 1, 0x11, 0])
    one_code_table = bytes([1] + [0] * 15) + bytes([0])
    scan_header = bytes([1, 1, 0x00, 0, 63, 0])
    return (
        b"\xff\xd8"
        + _jpeg_segment(0xE0, jfif)
        + _jpeg_segment(0xDB, quant)
        + _jpeg_segment(0xC0, frame)
        + _jpeg_segment(0xC4, bytes([0x00]) + one_code_table)
        + _jpeg_segment(0xC4, bytes([0x10]) + one_code_table)
        + _jpeg_segment(0xDA, scan_header)
        + b"\x3f"
        + b"\xff\xd9"
    )


TINY_PNG = make_tiny_png()
TINY_JPEG = make_tiny_jpeg()


def image_parts(step: Step) -> list[Json]:
    """The `images` array of an assistant message, honouring image_format / image_mime."""
    if step.get("image_format") == "jpeg":
        data, mime = TINY_JPEG, "image/jpeg"
    else:
        data, mime = TINY_PNG, "image/png"
    mime = step.get("image_mime", mime)
    url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return [{"type": "image_url", "image_url": {"url": url}}]


# --------------------------------------------------------------------------- state


@dataclass
class ModelScript:
    steps: list[Step]
    next_index: int = 0

    def take(self) -> Step:
        # Past the end the last step repeats, so a one-step script is "always".
        step = self.steps[min(self.next_index, len(self.steps) - 1)]
        self.next_index += 1
        return step


@dataclass
class StandInState:
    scripts: dict[str, ModelScript] = field(default_factory=dict)
    requests: list[Json] = field(default_factory=list)
    cancelled: list[Json] = field(default_factory=list)
    seen_models: set[str] = field(default_factory=set)
    in_flight: int = 0

    def reset(self) -> None:
        self.scripts.clear()
        self.requests.clear()
        self.cancelled.clear()

    def step_for(self, model: str | None, body: Json | None) -> Step:
        override = body.get("standin_step") if body else None
        if isinstance(override, dict):
            return override
        script = self.scripts.get(model) if model is not None else None
        return script.take() if script else {"kind": "ok"}


STATE_KEY = web.AppKey("standin_state", StandInState)


# --------------------------------------------------------------------------- request helpers


def message_text(content: Any) -> str:
    """Text of a message content that is either a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def last_user_text(body: Json) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def prompt_token_estimate(body: Json) -> int:
    chars = sum(
        len(message_text(m.get("content"))) for m in body.get("messages") or [] if isinstance(m, dict)
    )
    return max(1, chars // 4)


def wants_images(body: Json, step: Step) -> bool:
    modalities = body.get("modalities") or []
    return isinstance(modalities, list) and "image" in modalities and step.get("kind") != "no_image"


def wants_usage_chunk(body: Json) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def non_negative_int(step: Step, name: str, default: int) -> int:
    try:
        return max(0, int(step.get(name, default)))
    except (TypeError, ValueError):
        return default


def bounded_seconds(value: Any, default: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = default
    return min(max(0.0, seconds), MAX_SLEEP_S)


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json", headers=headers)


# --------------------------------------------------------------------------- completions


@dataclass
class Completion:
    """Everything one reply needs, so the ok / stream / fault paths share it."""

    model: str
    body: Json
    step: Step
    completion_id: str = field(default_factory=lambda: f"chatcmpl-standin-{uuid.uuid4().hex[:16]}")
    created: int = field(default_factory=lambda: int(time.time()))
    # SSE events written so far; a cancellation reports it as chunks_sent.
    events_sent: int = 0

    @property
    def reply_text(self) -> str:
        content = self.step.get("content")  # a scripted answer, e.g. JSON for a response_format
        return content if isinstance(content, str) else f"echo: {last_user_text(self.body)[:60]}"

    @property
    def tool_call(self) -> Json | None:
        """The call a ``tool_call`` step answers with: the step's ``name`` (else the request's first
        tool) and ``arguments`` (a JSON text, "{}" if none)."""
        if self.step.get("kind") != "tool_call":
            return None
        name = self.step.get("name")
        if not isinstance(name, str):
            tools = self.body.get("tools")
            first = tools[0] if isinstance(tools, list) and tools and isinstance(tools[0], dict) else {}
            function = first.get("function")
            name = function.get("name") if isinstance(function, dict) else None
        arguments = self.step.get("arguments", "{}")
        return {
            "id": f"call_{self.completion_id[-12:]}",
            "type": "function",
            "function": {"name": name if isinstance(name, str) else "tool", "arguments": str(arguments)},
        }

    def usage(self, completion_tokens: int) -> Json:
        prompt_tokens = prompt_token_estimate(self.body)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def full_response(self) -> Json:
        # As OpenAI answers: refusal and logprobs are required by the contract, null when unused.
        message: Json = {"role": "assistant", "content": self.reply_text, "refusal": None}
        finish_reason = "stop"
        if self.tool_call is not None:
            message.update(content=None, tool_calls=[self.tool_call])
            finish_reason = "tool_calls"
        if wants_images(self.body, self.step):
            message["images"] = image_parts(self.step)
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": self.usage(max(1, len(self.reply_text) // 4)),
        }

    def chunk(self, delta: Json, finish_reason: str | None = None) -> Json:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def usage_chunk(self, content_chunks: int) -> Json:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(content_chunks * 3),
        }


def content_piece(index: int) -> str:
    return f"stand-in part {index + 1} "


class SseWriter:
    """Writes `data:` events and counts them on the completion, so a cancellation can report progress."""

    def __init__(self, response: web.StreamResponse, completion: Completion, interval_s: float) -> None:
        self.response = response
        self.completion = completion
        self.interval_s = interval_s

    async def send_raw(self, payload: str) -> None:
        await self.response.write(f"data: {payload}\n\n".encode())
        self.completion.events_sent += 1

    async def send(self, event: Json) -> None:
        await self.send_raw(json.dumps(event))

    async def send_paced(self, deltas: Iterable[Json]) -> None:
        """One chunk per delta, each after the step's interval."""
        for delta in deltas:
            if self.interval_s:
                await asyncio.sleep(self.interval_s)
            await self.send(self.completion.chunk(delta))

    async def send_content(self, count: int, start: int = 0) -> None:
        await self.send_paced({"content": content_piece(index)} for index in range(start, start + count))

    async def send_text(self, text: str, count: int) -> None:
        """A scripted answer's text in ``count`` pieces."""
        await self.send_paced({"content": piece} for piece in pieces(text, count))

    async def send_tool_call(self, call: Json, count: int) -> None:
        """As OpenAI streams a call: id and name first, then the arguments' text in ``count`` pieces."""
        head = {"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
        await self.send(self.completion.chunk({"tool_calls": [head]}))
        await self.send_paced({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in pieces(call["function"]["arguments"], count))


def pieces(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, count)))
    return [text[start:start + size] for start in range(0, len(text), size)]


async def start_event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


def abort_connection(request: web.Request, *, hard: bool) -> None:
    """Drop the TCP connection as a crashed upstream would.

    hard: send an RST (zero linger).  Otherwise a plain close, so bytes already
    written still reach the client before it sees the truncated body.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if hard and sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class DeliberateAbort(Exception):
    """The stand-in itself dropped the connection; not a client cancellation."""


async def abort_response(request: web.Request, *, hard: bool) -> NoReturn:
    abort_connection(request, hard=hard)
    # aiohttp cancels the handler once it notices the lost connection; the
    # exception marks that as our own doing rather than the client leaving.
    raise DeliberateAbort()


async def stream_reply(request: web.Request, completion: Completion) -> web.StreamResponse:
    """Normal streams and every stream fault."""
    step, kind = completion.step, completion.step.get("kind", "ok")
    content_chunks = non_negative_int(step, "chunks", 5)
    after_chunks = non_negative_int(step, "after_chunks", 0)
    response = await start_event_stream(request)
    writer = SseWriter(response, completion, non_negative_int(step, "interval_ms", 0) / 1000)
    call = completion.tool_call
    await writer.send(completion.chunk({"role": "assistant", "content": None if call else ""}))

    if kind == "stream_cut":
        await writer.send_content(after_chunks)
        await abort_response(request, hard=False)
    if kind == "error_event":
        await writer.send_content(after_chunks)
        await writer.send({"error": {"message": "upstream overloaded", "code": 502}})
        await response.write_eof()
        return response
    if kind == "stream_stall":
        await writer.send_content(after_chunks)
        await asyncio.sleep(bounded_seconds(step.get("stall_s"), MAX_SLEEP_S))
        await writer.send_content(max(0, content_chunks - after_chunks), start=after_chunks)
    elif kind == "deep_json":
        await writer.send_raw(deep_json(completion.chunk({"content": "deep "}), step))
        await writer.send_content(content_chunks)
    elif kind == "malformed_chunk":
        malformed_at = non_negative_int(step, "at", 1)
        await writer.send_content(min(malformed_at, content_chunks))
        await writer.send_raw("{not json")
        await writer.send_content(max(0, content_chunks - malformed_at), start=malformed_at)
    elif call is not None:
        await writer.send_tool_call(call, content_chunks)
    elif isinstance(step.get("content"), str):
        await writer.send_text(completion.reply_text, content_chunks)
    else:
        await writer.send_content(content_chunks)

    if wants_images(completion.body, step):
        await writer.send(completion.chunk({"images": image_parts(step)}))
    await writer.send(completion.chunk({}, finish_reason="tool_calls" if call else "stop"))
    if wants_usage_chunk(completion.body):
        await writer.send(completion.usage_chunk(content_chunks))
    if kind != "no_done":
        await writer.send_raw("[DONE]")
    # A server may end its chunked body in a later write than [DONE] (end_delay_ms after it).
    await asyncio.sleep(bounded_seconds(non_negative_int(step, "end_delay_ms", 0) / 1000, MAX_SLEEP_S))
    await response.write_eof()
    return response


# --------------------------------------------------------------------------- error shapes

OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
LLAMACPP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def error_body(status: int, fmt: str, message: str, code: Any, error_type: str | None) -> Json:
    if fmt == "vllm":
        return {
            "object": "error",
            "message": message,
            "type": error_type or ("BadRequestError" if status < 500 else "InternalServerError"),
            "param": None,
            "code": code if code is not None else status,
        }
    if fmt == "llamacpp":
        return {
            "error": {
                "code": code if code is not None else status,
                "message": message,
                "type": error_type or LLAMACPP_ERROR_TYPES.get(status, "server_error"),
            }
        }
    return {
        "error": {
            "message": message,
            "type": error_type or OPENAI_ERROR_TYPES.get(status, "server_error"),
            "param": None,
            "code": code,
        }
    }


def status_reply(step: Step) -> web.Response:
    status = int(step.get("status", 500))
    fmt = step.get("format", "openai")
    message = step.get("message", f"stand-in error {status}")
    headers = {"Retry-After": str(step["retry_after"])} if "retry_after" in step else None
    if fmt == "text":
        return web.Response(status=status, text=message, content_type="text/plain", headers=headers)
    return json_response(status, error_body(status, fmt, message, step.get("code"), step.get("type")), headers)


CONTEXT_LENGTH_BODIES: dict[str, Json] = {
    "openai": {
        "error": {
            "message": (
                "This model's maximum context length is 8192 tokens. However, your messages resulted in "
                "9000 tokens. Please reduce the length of the messages."
            ),
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
    "vllm": {
        "object": "error",
        "message": (
            "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
            "(8744 in the messages, 256 in the completion). Please reduce the length of the messages "
            "or completion."
        ),
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
    "llamacpp": {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 9000,
            "n_ctx": 8192,
        }
    },
}


def context_length_reply(step: Step) -> web.Response:
    template = CONTEXT_LENGTH_BODIES.get(step.get("format", "openai"), CONTEXT_LENGTH_BODIES["openai"])
    body = copy.deepcopy(template)
    status = int(step.get("status", 400))
    # llama.cpp echoes the HTTP status inside its error object.
    if step.get("format") == "llamacpp":
        body["error"]["code"] = status
    return json_response(status, body)


def content_filter_reply() -> web.Response:
    return json_response(
        400,
        {
            "error": {
                "message": (
                    "The response was filtered due to the prompt triggering the content management policy. "
                    "Please modify your prompt and retry."
                ),
                "type": "invalid_request_error",
                "param": "prompt",
                "code": "content_filter",
            }
        },
    )


# --------------------------------------------------------------------------- chat handler


def effective_kind(step: Step, streaming: bool) -> str:
    kind = step.get("kind", "ok")
    if kind in STREAM_FAULT_KINDS and not streaming:
        return NON_STREAM_FALLBACK.get(kind, "ok")
    return kind


async def answer(request: web.Request, completion: Completion) -> web.StreamResponse:
    step = completion.step
    streaming = bool(completion.body.get("stream"))
    kind = effective_kind(step, streaming)
    delay_s = non_negative_int(step, "delay_ms", 0) / 1000
    if kind == "delay":
        delay_s += non_negative_int(step, "first_byte_ms", 0) / 1000
    if delay_s:
        await asyncio.sleep(min(delay_s, MAX_SLEEP_S))

    if kind == "reset":
        await abort_response(request, hard=True)
    if kind == "hang":
        await asyncio.sleep(bounded_seconds(step.get("hang_s"), MAX_SLEEP_S))
        return json_response(504, error_body(504, "openai", "stand-in hang elapsed", None, None))
    if kind == "status":
        return status_reply(step)
    if kind == "context_length":
        return context_length_reply(step)
    if kind == "content_filter":
        return content_filter_reply()
    if kind == "invalid_json":
        return web.Response(status=200, body=b"not json{", content_type="application/json")
    if kind == "raw":
        return raw_reply(step)
    if kind == "deep_json" and not streaming:
        return web.Response(status=200, body=deep_json(completion.full_response(), step), content_type="application/json")
    if streaming:
        return await stream_reply(request, completion)
    return json_response(200, completion.full_response())


# The largest gzip bomb a step may ask for (unpacked), so a test cannot exhaust the stand-in's time.
MAX_GZIP_SPACES = 1 << 30


def raw_reply(step: Step) -> web.Response:
    """The step's own answer, byte for byte, whatever was asked: a body the gateway must judge
    (`body`, with `status` and `content_type`), or `gzip_spaces` spaces gzipped (a bomb)."""
    headers = {"Content-Type": str(step.get("content_type", "application/json"))}
    spaces = min(non_negative_int(step, "gzip_spaces", 0), MAX_GZIP_SPACES)
    if spaces:
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        block = b" " * (1 << 20)
        body = b"".join([*(packer.compress(block) for _ in range(spaces >> 20)), packer.flush()])
        headers["Content-Encoding"] = "gzip"
    else:
        body = str(step.get("body", "")).encode("utf-8")
    return web.Response(status=non_negative_int(step, "status", 200), body=body, headers=headers)


def deep_json(event: Json, step: Step) -> str:
    """``event`` with a valid field nested ``depth`` arrays deep: deeper than JSON readers follow by default."""
    depth = non_negative_int(step, "depth", 5000)
    return json.dumps(event)[:-1] + ', "x_deep": ' + "[" * depth + "]" * depth + "}"


def parse_body(raw: bytes) -> Json | None:
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def nesting(value: Any) -> int:
    """How many arrays and objects deep ``value`` goes (walked without recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest


def log_request(
    state: StandInState, request: web.Request, arrived: float, raw: bytes, body: Json | None, step: Step
) -> None:
    state.requests.append(
        {
            "t": arrived,
            "model": body.get("model") if body else None,
            "path": request.path,
            "headers": {name.lower(): value for name, value in request.headers.items()},
            "body": body if len(raw) <= MAX_LOGGED_BODY_BYTES and nesting(body) <= MAX_LOGGED_NESTING else None,
            "body_bytes": len(raw),
            "step": step,
        }
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    arrived = time.time()
    raw = await request.read()
    body = parse_body(raw)
    model = body.get("model") if body else None
    step = state.step_for(model if isinstance(model, str) else None, body)
    log_request(state, request, arrived, raw, body, step)
    if body is None:
        return json_response(400, error_body(400, "openai", "request body is not a JSON object", None, None))
    if isinstance(model, str):
        state.seen_models.add(model)

    completion = Completion(model=model if isinstance(model, str) else "", body=body, step=step)
    state.in_flight += 1
    try:
        return await answer(request, completion)
    except DeliberateAbort:
        return await wait_for_own_abort()
    except (asyncio.CancelledError, ConnectionResetError):
        state.cancelled.append({"t": time.time(), "model": completion.model, "chunks_sent": completion.events_sent})
        raise
    finally:
        state.in_flight -= 1


async def wait_for_own_abort() -> web.StreamResponse:
    # Handler cancellation normally ends this at once; the bound covers the case
    # where aiohttp never notices, and the response then goes nowhere.
    await asyncio.sleep(5)
    return web.Response(status=499)


# --------------------------------------------------------------------------- other endpoints


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    model_ids = sorted(set(DEFAULT_MODEL_IDS) | state.seen_models | set(state.scripts))
    created = int(time.time())
    data = [{"id": mid, "object": "model", "created": created, "owned_by": "standin"} for mid in model_ids]
    return json_response(200, {"object": "list", "data": data})


async def set_script(request: web.Request) -> web.Response:
    payload = parse_body(await request.read())
    if payload is None or not isinstance(payload.get("model"), str):
        return json_response(400, {"error": "expected {\"model\": str, \"steps\": [step, ...]}"})
    steps = payload.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        return json_response(400, {"error": "steps must be a non-empty list of objects"})
    request.app[STATE_KEY].scripts[payload["model"]] = ModelScript(steps=steps)
    return json_response(200, {"ok": True, "model": payload["model"], "steps": len(steps)})


async def reset_state(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return json_response(200, {"ok": True})


async def get_requests(request: web.Request) -> web.Response:
    return json_response(200, {"requests": request.app[STATE_KEY].requests})


async def get_connections(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return json_response(200, {"in_flight": state.in_flight, "cancelled": state.cancelled})


async def fallback(request: web.Request) -> web.StreamResponse:
    # Gateways prefix paths differently (/v1, /openai/v1, ...); any */chat/completions counts.
    if request.method == "POST" and request.path.rstrip("/").endswith("/chat/completions"):
        return await chat_completions(request)
    if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
        return await list_models(request)
    return json_response(404, error_body(404, "openai", f"no route for {request.method} {request.path}", None, None))


def build_app() -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = StandInState()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/_standin/script", set_script)
    app.router.add_post("/_standin/reset", reset_state)
    app.router.add_get("/_standin/requests", get_requests)
    app.router.add_get("/_standin/connections", get_connections)
    app.router.add_route("*", "/{tail:.*}", fallback)
    return app


# --------------------------------------------------------------------------- process


async def serve(host: str, port: int) -> None:
    # handler_cancellation: a client hanging up must cancel the handler, which
    # is how hangs and delays get recorded as "cancelled".
    runner = web.AppRunner(build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    bound_port = runner.addresses[0][1]
    print(f"listening on http://{host}:{bound_port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    event_loop_runner()(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
