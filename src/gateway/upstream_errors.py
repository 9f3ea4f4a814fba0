"""Read an upstream's error answer, whatever its dialect, and scrub it for clients.

Dialects seen in the wild:
- OpenAI and OpenRouter: ``{"error": {"message", "type", "param", "code"}}``, the
  code a string (``"context_length_exceeded"``) or a number (OpenRouter's
  ``400``); OpenRouter may wrap the provider's own error in ``metadata.raw``;
- vLLM: a flat ``{"object": "error", "message", "type", "param", "code"}``;
- llama.cpp: ``{"error": {"code", "message", "type": "exceed_context_size_error"}}``,
  the context refusal sometimes sent with status 500;
- FastAPI-style ``{"detail": ...}``, a bare ``{"error": "text"}``, and plain text.

A context-window refusal is recognised in all of them (by code, type or
wording), because the plan moves on to a target that may have a larger window;
a rate-limit answer is never taken for one, even when it speaks of tokens.

Reasons go into messages clients read, so ``scrub`` removes what must never
leave the gateway: a backend's key, its URL or host, bearer tokens, and
credentials in any URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import attrs
import msgspec

CONTEXT_PATTERN = re.compile(
    r"context length|context window|context size|maximum context|too many tokens|prompt is too long|"
    r"input is too long|exceeds? the (?:available )?context|maximum model length|"
    r"reduce the length of the (?:messages|input|prompt)",
    re.IGNORECASE,
)
CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"})
FILTER_PATTERN = re.compile(r"content (?:management )?policy|content filter|flagged|moderation", re.IGNORECASE)
FILTER_CODES = frozenset({"content_filter", "content_policy_violation", "moderation", "flagged"})
# Rate limits and busy answers speak of tokens too ("too many tokens per minute"):
# they are never a context refusal.
NOT_CONTEXT_STATUSES = frozenset({408, 409, 429})
MAX_REASON_CHARS = 300

SECRET_PATTERNS = (
    re.compile(r"(?i)bearer\s+[^\s\"',;]+"),
    re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}"),
    re.compile(r"(?i)\b(api[_-]?key|key|token)=[^\s&\"',;]+"),
)
URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]+@")


@attrs.frozen
class UpstreamErrorInfo:
    """What an upstream error answer says, in our terms."""

    reason: str
    code: str | None = None
    type: str | None = None
    param: str | None = None
    numeric_code: int | None = None   # a status-like number inside the body (error events, 200-with-error)
    is_context_length: bool = False
    is_content_filter: bool = False


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _detail_text(detail: Any) -> str | None:
    if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}]
        messages = [_text(item.get("msg")) for item in detail if isinstance(item, dict)]
        return "; ".join(m for m in messages if m) or None
    return _text(detail)


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def read_upstream_error(body: bytes, status: int | None = None, secrets: Iterable[str | None] = ()) -> UpstreamErrorInfo:
    """The reason, code and kind of an upstream error answer (``status`` is the HTTP status, when there is one).

    The reason is scrubbed of ``secrets`` before it is shortened: shortened first, a key
    cut in two would leave a prefix no pattern recognises.
    """
    secrets = tuple(secrets)
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        data = None
    reason: str | None = None
    code: str | None = None
    numeric: int | None = None
    kind: str | None = None
    param: str | None = None
    raw_detail: str | None = None
    if isinstance(data, dict):
        inner = data["error"] if isinstance(data.get("error"), dict) else data
        reason = _text(inner.get("message")) or _detail_text(data.get("detail")) or _text(data.get("error"))
        raw_code = inner.get("code")
        if isinstance(raw_code, bool):
            raw_code = None
        if isinstance(raw_code, int):
            numeric = raw_code
        elif isinstance(raw_code, str) and raw_code.isdigit():
            numeric = int(raw_code)
        code = str(raw_code) if raw_code is not None else None
        kind = _text(inner.get("type"))
        param = _text(inner.get("param"))
        metadata = inner.get("metadata")
        if isinstance(metadata, dict):
            # OpenRouter: the provider's own error, often the only place a context refusal shows.
            raw = metadata.get("raw")
            raw_detail = _text(raw) if isinstance(raw, str) else (msgspec.json.encode(raw).decode() if raw else None)
    if reason is None:
        reason = _leading_text(body, 4 * MAX_REASON_CHARS, secrets).strip() or "no reason given"
    if raw_detail and raw_detail not in reason:
        reason = f"{reason}: {raw_detail}"
    words = f"{reason} {code or ''} {kind or ''}"
    is_context = status not in NOT_CONTEXT_STATUSES and bool(
        code in CONTEXT_CODES or kind in CONTEXT_CODES or CONTEXT_PATTERN.search(words)
    )
    is_filter = bool(code in FILTER_CODES or kind in FILTER_CODES or FILTER_PATTERN.search(reason))
    return UpstreamErrorInfo(
        reason=_shorten(scrub(reason, secrets)),
        code=code,
        type=kind,
        param=param,
        numeric_code=numeric,
        is_context_length=is_context,
        is_content_filter=is_filter,
    )


def _leading_text(body: bytes, size: int, secrets: Iterable[str | None]) -> str:
    """The first ``size`` bytes of ``body`` as text, with the secrets redacted before the cut.

    Cut first, a secret across the cut would lose its end and survive as a prefix,
    which whitespace folding can then pull into the reason a client reads. So the
    bytes are read on by the longest secret's length and redacted; a secret that
    starts before the cut is then whole, and one that starts after it is cut away.
    """
    marks = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
    window = body[: size + (len(marks[0]) if marks else 0)]
    for mark in marks:
        window = window.replace(mark, b"[redacted]")
    return window[:size].decode("utf-8", "replace")


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` without the given secrets (keys, backend URLs and hosts), bearer tokens or URL credentials."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    text = URL_CREDENTIALS.sub(r"\1[redacted]@", text)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub("[redacted]", text)
    return text
