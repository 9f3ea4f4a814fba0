#!/usr/bin/env python3
"""The server's floor for the benchmark: a bare ASGI app under the gateway's own granian settings.

It reads each request's whole body and answers a fixed ``chat.completion``: no
auth, no rules, no upstream. ``scripts/bench.py`` sends it the image phase's
requests, so the report shows how much of the gateway's added time is granian
receiving the body (paid by any app it serves) and how much is the gateway's own
work. It runs with the options ``gateway serve`` gives granian
(``gateway.cli.server_options``) and the same allocator tuning, one worker.

With ``--forward URL`` it is a bare proxy instead: it reads the whole body, then
sends it as it came to ``URL`` over a kept-alive connection and answers with the
upstream's answer. That is the least any proxy must do that judges a request
before it sends it on, as the gateway does: the floor under the gateway's image
figure, with the upstream's time in it as in the gateway's.

Usage: ``python scripts/floor_app.py --port PORT [--forward URL]``; ready when ``GET /`` answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ANSWER = (
    b'{"id":"chatcmpl-floor","object":"chat.completion","created":1700000000,"model":"floor",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
# Set by main() before the worker starts: the worker imports this module afresh.
FORWARD_ENV = "FLOOR_FORWARD_URL"
FORWARD = urlsplit(os.environ.get(FORWARD_ENV, ""))
FORWARDING = bool(FORWARD.hostname)
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
idle_connections: list[Connection] = []


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The upstream's status and body; only ``content-length`` framing (what the stand-ins send a non-streaming call)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head[:-4].split(b"\r\n")
    fields = dict(line.lower().split(b":", 1) for line in header_lines)
    return int(status_line.split()[1]), await reader.readexactly(int(fields[b"content-length"]))


async def forward(body: list[bytes]) -> tuple[int, bytes]:
    if idle_connections:
        connection = idle_connections.pop()
    else:
        connection = await asyncio.open_connection(FORWARD.hostname, FORWARD.port or 80)
    reader, writer = connection
    head = (
        f"POST {FORWARD.path or '/'} HTTP/1.1\r\nhost: {FORWARD.netloc}\r\n"
        f"content-type: application/json\r\ncontent-length: {sum(map(len, body))}\r\n\r\n"
    ).encode()
    try:
        writer.writelines((head, *body))
        answer = await _read_answer(reader)
    except BaseException:
        writer.close()
        raise
    idle_connections.append(connection)
    return answer


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    body: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if FORWARDING:
            body.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    status, answer = await forward(body) if FORWARDING and scope["method"] == "POST" else (200, ANSWER)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def _tune_allocator() -> None:
    # As the gateway's worker does at start (gateway.memory); without it large
    # bodies fault in fresh pages and the floor would be slower than the gateway.
    try:
        from gateway.memory import keep_large_buffers_in_heap
    except ImportError:
        return
    keep_large_buffers_in_heap()


_tune_allocator()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--forward", metavar="URL", help="forward each POST to this http:// URL after reading its body")
    args = parser.parse_args(argv)
    if args.forward:
        os.environ[FORWARD_ENV] = args.forward
    from granian.server import MPServer

    from gateway.cli import DEFAULT_SHUTDOWN_TIMEOUT_S, server_options

    # The worker imports this module by name: it must find it next to this file.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    options = server_options(argparse.Namespace(host=args.host, port=args.port, workers=1, shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT_S))
    options.update(factory=False, respawn_failed_workers=False)
    MPServer("floor_app:app", **options).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
