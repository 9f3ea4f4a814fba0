"""Read an upstream's error answer, whatever its dialect, into (kind, reason).

Dialects seen in the wild: OpenAI and OpenRouter (``{"error": {...}}`` with a
string or numeric ``code``), vLLM (a flat ``{"object": "error", ...}``),
llama.cpp (``{"error": {"type": "exceed_context_size_error", ...}}``, sometimes
with status 500), and plain text. A context-window refusal is recognised in
all of them, because the plan moves on to a target with a larger window.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import msgspec

CONTEXT_PATTERN = re.compile(
    r"context length|context window|context size|maximum context|too many tokens|prompt is too long|"
    r"exceeds? the (?:available )?context|reduce the length",
    re.IGNORECASE,
)
CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"})


@attrs.frozen
class UpstreamErrorInfo:
    reason: str
    code: str | None
    is_context_length: bool


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def read_upstream_error(body: bytes) -> UpstreamErrorInfo:
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data = None
    reason: str | None = None
    code: str | None = None
    kind: str | None = None
    if isinstance(data, dict):
        inner = data.get("error") if isinstance(data.get("error"), dict) else data
        reason = _text(inner.get("message")) or _text(data.get("detail")) or _text(data.get("error"))
        raw_code = inner.get("code")
        code = str(raw_code) if raw_code is not None else None
        kind = _text(inner.get("type"))
    if reason is None:
        reason = body[:200].decode("utf-8", "replace").strip() or "no reason given"
    is_context = bool(
        (code in CONTEXT_CODES) or (kind in CONTEXT_CODES) or CONTEXT_PATTERN.search(reason)
    )
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return UpstreamErrorInfo(reason=reason, code=code, is_context_length=is_context)
