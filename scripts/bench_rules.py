#!/usr/bin/env python3
"""Microbenchmark: what validating a request costs before any upstream call.

Validation is ``inspect_request`` (shape, parts, images, facts) plus the alias's
``rules.check``, against the shipped models.toml. Two requests:
1. one user message with a 4 MB image (a PNG data URI, ~5.6 MB of base64);
2. a 200-message text conversation (alternating user/assistant, ~400 characters each).
Each is timed with ``timeit`` (best of several repeats, to filter out a busy machine)
and printed in microseconds per validation. JSON decoding of the same body is
printed beside it for scale: the gateway decodes once, then validates.

Run: ``.venv/bin/python scripts/bench_rules.py [--config models.toml]``
"""

from __future__ import annotations

import argparse
import base64
import os
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gateway.config import load_config
from gateway.facts import inspect_request
from gateway.snapshot import Snapshot, build_snapshot

IMAGE_BYTES = 4 * 1024 * 1024
MESSAGES = 200
REPEATS = 7


def image_request(alias: str) -> dict[str, Any]:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(IMAGE_BYTES - 8)
    url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    parts = [{"type": "text", "text": "Describe this image."}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": alias, "messages": [{"role": "user", "content": parts}], "max_tokens": 300}


def conversation_request(alias: str) -> dict[str, Any]:
    sentence = "The quick brown fox jumps over the lazy dog while the gateway checks the request. "
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(MESSAGES - 1):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: " + sentence * 5})
    return {"model": alias, "messages": messages, "max_tokens": 500, "temperature": 0.2, "stream": True}


def per_call_us(call: Callable[[], object]) -> float:
    """Best-of-REPEATS microseconds per call, with enough calls per repeat to last ~0.2 s."""
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    number = max(1, number)
    return min(timer.repeat(repeat=REPEATS, number=number)) / number * 1e6


def validate(snapshot: Snapshot, body: dict[str, Any]) -> None:
    facts = inspect_request(body)
    snapshot.lookup(facts.model).rules.check(facts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "models.toml"))
    args = parser.parse_args()
    snapshot = build_snapshot(load_config(args.config), environ={})
    cases = [
        ("one 4 MB image (llama-4-scout)", image_request("llama-4-scout")),
        (f"{MESSAGES}-message text conversation (gemma-4-31b)", conversation_request("gemma-4-31b")),
    ]
    print(f"{'request':<44} {'body':>10} {'validate':>14} {'json decode':>14}")
    for name, body in cases:
        raw = msgspec.json.encode(body)
        validate(snapshot, body)  # it must pass before it is worth timing
        validate_us = per_call_us(lambda body=body: validate(snapshot, body))  # type: ignore[misc]
        decode_us = per_call_us(lambda raw=raw: msgspec.json.decode(raw))  # type: ignore[misc]
        print(f"{name:<44} {len(raw) / 1e6:>7.2f} MB {validate_us:>11.1f} µs {decode_us:>11.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
