#!/usr/bin/env python3
"""The server's floor for the benchmark: a bare ASGI app under the gateway's own granian settings.

It reads each request's whole body and answers a fixed ``chat.completion``: no
auth, no rules, no upstream. ``scripts/bench.py`` sends it the image phase's
requests, so the report shows how much of the gateway's added time is granian
receiving the body (paid by any app it serves) and how much is the gateway's own
work. It runs with the options ``gateway serve`` gives granian
(``gateway.cli.server_options``) and the same allocator tuning, one worker.

Usage: ``python scripts/floor_app.py --port PORT``; ready when ``GET /`` answers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ANSWER = (
    b'{"id":"chatcmpl-floor","object":"chat.completion","created":1700000000,"model":"floor",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


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
    args = parser.parse_args(argv)
    from granian.server import MPServer

    from gateway.cli import server_options

    # The worker imports this module by name: it must find it next to this file.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    options = server_options(argparse.Namespace(host=args.host, port=args.port, workers=1))
    options.update(factory=False, respawn_failed_workers=False)
    MPServer("floor_app:app", **options).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
