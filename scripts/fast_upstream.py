#!/usr/bin/env python3
"""A fast OpenAI-compatible upstream stand-in for the gateway benchmark.

The benchmark wants an upstream that costs as little CPU as possible, so that
what it measures is the gateway. This one is a raw asyncio protocol (uvloop
when installed), HTTP/1.1 with keep-alive, no framework:

  POST .../chat/completions
      a fixed small ``chat.completion`` echoing the requested ``model``; or,
      for ``"stream": true``, an SSE stream of N ``chat.completion.chunk``
      events ``interval_ms`` apart, a usage chunk when
      ``stream_options.include_usage`` is true, then ``data: [DONE]``.
  GET /health     ``{"status": "ok"}``
  GET /stats      chat requests answered and request body bytes received

How it stays cheap:

1. Answers are built once per (model, pacing, usage, keep-alive) and cached.
2. A body of 256 KiB or more is received straight into a per-connection,
   grow-only buffer (``BufferedProtocol``: no per-read ``bytes`` objects), and
   is scanned, not parsed: a big request is big because of one value (an
   image data URI), so ``model`` and ``stream`` sit in its first or last 64 KiB.
3. Pacing is per request: a model id ending in ``@<chunks>x<interval_ms>``
   (``bench-model@20x50``) overrides ``--chunks``/``--interval-ms``, so one
   process serves fast and slow streams and a gateway can reach both through
   two aliases of one backend.

The first line on stdout is ``listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any

_decode_json: Callable[[bytes], Any]
try:
    import msgspec

    _decode_json = msgspec.json.decode
except ImportError:  # the stdlib parser is slower but enough
    _decode_json = json.loads

HOST = "127.0.0.1"  # loopback only: this is a benchmark fixture, never a server
CREATED = 1_700_000_000
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
BIG_BODY_BYTES = 256 * 1024
SCAN_EDGE_BYTES = 64 * 1024
READ_BUFFER_BYTES = 256 * 1024
MAX_CACHED_ANSWERS = 512

PACING_SUFFIX = re.compile(r"@(\d{1,4})x(\d{1,6}(?:\.\d+)?)$")
_SCAN_VALUE = {
    b"model": re.compile(rb'\s*:\s*"((?:[^"\\]|\\.)*)"'),
    b"stream": re.compile(rb"\s*:\s*true"),
    b"include_usage": re.compile(rb"\s*:\s*true"),
}


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Answers:
    """Pre-rendered HTTP answers; everything a request needs is one dict lookup after the first."""

    def __init__(self, chunks: int, interval_ms: float) -> None:
        self.chunks = chunks
        self.interval_s = interval_ms / 1000.0
        self._plain: dict[tuple[str, bool], bytes] = {}
        self._streams: dict[tuple[str, bool, bool], tuple[list[bytes], float]] = {}

    def pacing(self, model: str) -> tuple[int, float]:
        """(chunks, interval_s) for a model id: its ``@NxMS`` suffix, else the defaults."""
        match = PACING_SUFFIX.search(model)
        if match is None:
            return self.chunks, self.interval_s
        return int(match.group(1)), float(match.group(2)) / 1000.0

    def plain(self, model: str, keep_alive: bool) -> bytes:
        key = (model, keep_alive)
        answer = self._plain.get(key)
        if answer is None:
            answer = _http(b"200 OK", b"application/json", _completion(model), keep_alive)
            if len(self._plain) < MAX_CACHED_ANSWERS:
                self._plain[key] = answer
        return answer

    def stream(self, model: str, include_usage: bool, keep_alive: bool) -> tuple[list[bytes], float]:
        """The writes of one SSE answer (head + first event first) and the pause between them."""
        key = (model, include_usage, keep_alive)
        cached = self._streams.get(key)
        if cached is None:
            chunks, interval_s = self.pacing(model)
            cached = (_stream_writes(model, chunks, include_usage, keep_alive), interval_s)
            if len(self._streams) < MAX_CACHED_ANSWERS:
                self._streams[key] = cached
        return cached


def _http(status: bytes, content_type: bytes, body: bytes, keep_alive: bool) -> bytes:
    close = b"" if keep_alive else b"Connection: close\r\n"
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        content_type,
        len(body),
        close,
        body,
    )


def _completion(model: str) -> bytes:
    return _dump(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the fast upstream."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        }
    )


def _sse_chunk(obj: Any) -> bytes:
    event = b"data: " + (obj if isinstance(obj, bytes) else _dump(obj)) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _stream_writes(model: str, chunks: int, include_usage: bool, keep_alive: bool) -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": model}
    events: list[bytes] = []
    for i in range(chunks):
        delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
        finish = "stop" if i == chunks - 1 else None
        events.append(_sse_chunk({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
    tail = b""
    if include_usage:
        usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        tail += _sse_chunk({**base, "choices": [], "usage": usage})
    tail += _sse_chunk(b"[DONE]") + b"0\r\n\r\n"
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n" + (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n"
    )
    # The head travels with the first event, and the trailer with the last one:
    # that is when a real server's bytes leave, and it saves two writes.
    if not events:
        return [head + tail]
    writes = [head + events[0], *events[1:]]
    writes[-1] += tail
    return writes


def scan_big_body(body: memoryview) -> tuple[str, bool, bool]:
    """(model, stream, include_usage) of a large JSON body, read from its edges without parsing it."""
    data = body.obj if isinstance(body.obj, (bytes, bytearray)) else bytes(body)
    n = len(body)
    if data[:1] != b"{":
        raise ValueError("the body is not a JSON object")
    raw_model = _scan_key(data, n, b"model")
    model = json.loads(b'"' + raw_model + b'"') if raw_model is not None else "unknown"
    stream = _scan_key(data, n, b"stream") is not None
    usage = _scan_key(data, n, b"include_usage") is not None
    return model, stream, usage


def _scan_key(data: bytes | bytearray, n: int, key: bytes) -> bytes | None:
    needle = b'"' + key + b'"'
    for lo, hi in ((0, min(n, SCAN_EDGE_BYTES)), (max(0, n - SCAN_EDGE_BYTES), n)):
        at = data.find(needle, lo, hi)
        while at >= 0:
            match = _SCAN_VALUE[key].match(data, at + len(needle), n)
            if match is not None:
                return bytes(match.group(1)) if match.groups() else b"true"
            at = data.find(needle, at + 1, hi)
    return None


def read_small_body(body: bytes) -> tuple[str, bool, bool]:
    """(model, stream, include_usage) of a small JSON body."""
    request = _decode_json(body)
    if not isinstance(request, dict):
        raise TypeError("the body is not a JSON object")
    options = request.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    return str(request.get("model") or "unknown"), request.get("stream") is True, usage


class Stats:
    """What the benchmark checks: every client request reached us, with its whole body."""

    chat_requests = 0
    body_bytes = 0


class Http11(asyncio.BufferedProtocol):
    """One connection: parse heads, collect bodies, answer; one request at a time (no pipelining reorder)."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()  # bytes read but not yet consumed
        self.scratch = memoryview(bytearray(READ_BUFFER_BYTES))
        self.big_store = bytearray()  # grow-only home of large bodies, reused per connection
        self.big_view: memoryview | None = None
        self.big_got = 0
        self.head: tuple[bytes, bytes, dict[bytes, bytes], bool] | None = None
        self.body_len = 0
        self.busy = False  # a paced stream is being written
        self.closed = False

    # -- asyncio plumbing
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.big_view is not None:
            return self.big_view[self.big_got :]
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.big_view is not None:
            self.big_got += nbytes
            if self.big_got < self.body_len:
                return
            body, self.big_view = self.big_view, None
            self._answer(body)
        else:
            self.pending += self.scratch[:nbytes]
        self._serve_pending()

    # -- parsing
    def _serve_pending(self) -> None:
        while not self.busy and not self.closed:
            if self.head is None and not self._parse_head():
                return
            body = self._take_body()
            if body is None:
                return
            self._answer(body)

    def _parse_head(self) -> bool:
        end = self.pending.find(b"\r\n\r\n")
        if end < 0:
            if len(self.pending) > MAX_HEAD_BYTES:
                self._refuse(b"431 Request Header Fields Too Large")
            return False
        lines = bytes(self.pending[:end]).split(b"\r\n")
        del self.pending[: end + 4]
        try:
            method, target, version = lines[0].split(b" ", 2)
        except ValueError:
            self._refuse(b"400 Bad Request")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        keep_alive = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            # Every client the benchmark uses sends Content-Length; a chunked decoder would be dead code.
            self._refuse(b"411 Length Required")
            return False
        self.body_len = int(headers.get(b"content-length", b"0") or 0)
        if self.body_len > MAX_BODY_BYTES:
            self._refuse(b"413 Content Too Large")
            return False
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.head = (method, target, headers, keep_alive)
        return True

    def _take_body(self) -> bytes | memoryview | None:
        have = len(self.pending)
        if have >= self.body_len:
            body = bytes(self.pending[: self.body_len])
            del self.pending[: self.body_len]
            return body
        if self.body_len >= BIG_BODY_BYTES:
            # Receive the rest in place: the kernel copies straight into our buffer.
            if len(self.big_store) < self.body_len:
                self.big_store = bytearray(self.body_len)
            self.big_view = memoryview(self.big_store)[: self.body_len]
            self.big_view[:have] = self.pending
            self.big_got = have
            self.pending.clear()
        return None

    # -- answering
    def _answer(self, body: bytes | memoryview) -> None:
        assert self.head is not None
        method, target, _, keep_alive = self.head
        self.head = None
        path = target.split(b"?", 1)[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            self._chat(body, keep_alive)
        elif method == b"GET" and path == b"/health":
            self._write(_http(b"200 OK", b"application/json", b'{"status":"ok"}', keep_alive))
        elif method == b"GET" and path == b"/stats":
            stats = {"chat_requests": Stats.chat_requests, "body_bytes": Stats.body_bytes}
            self._write(_http(b"200 OK", b"application/json", _dump(stats), keep_alive))
        else:
            self._write(_http(b"404 Not Found", b"application/json", b'{"error":"not found"}', keep_alive))
        if not keep_alive and not self.busy:
            self._close()

    def _chat(self, body: bytes | memoryview, keep_alive: bool) -> None:
        Stats.chat_requests += 1
        Stats.body_bytes += len(body)
        try:
            if len(body) >= BIG_BODY_BYTES:
                model, stream, usage = scan_big_body(body if isinstance(body, memoryview) else memoryview(body))
            else:
                model, stream, usage = read_small_body(bytes(body))
        except (ValueError, TypeError):  # msgspec.DecodeError is a ValueError
            error = b'{"error":{"message":"invalid JSON body","type":"invalid_request_error"}}'
            self._write(_http(b"400 Bad Request", b"application/json", error, keep_alive))
            return
        if not stream:
            self._write(self.answers.plain(model, keep_alive))
            return
        writes, interval_s = self.answers.stream(model, usage, keep_alive)
        if interval_s <= 0 or len(writes) == 1:
            self._write(b"".join(writes))
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._paced(writes, interval_s, keep_alive))

    async def _paced(self, writes: list[bytes], interval_s: float, keep_alive: bool) -> None:
        try:
            for i, data in enumerate(writes):
                if self.closed:
                    return
                if i:
                    await asyncio.sleep(interval_s)
                self._write(data)
        finally:
            self.busy = False
        if not keep_alive:
            self._close()
        elif self.pending:
            self._serve_pending()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _refuse(self, status: bytes) -> None:
        self._write(_http(status, b"application/json", b'{"error":"bad request"}', False))
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream (20)")
    parser.add_argument(
        "--interval-ms", type=float, default=1.0, help="pause between stream chunks (1 ms; 0: one write)"
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    answers = Answers(args.chunks, args.interval_ms)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http11(answers), HOST, args.port, backlog=4096, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://{HOST}:{port}", flush=True)
    print(
        f"fast upstream: {type(loop).__module__}, {args.chunks} chunks {args.interval_ms:g} ms apart", file=sys.stderr
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
