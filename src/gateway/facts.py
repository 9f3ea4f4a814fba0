"""Read a chat request once: check its shape and collect the facts the rules need.

Everything here is independent of the alias: the body's shape (OpenAI Chat
Completions), the content parts and their modalities, every image (validated
once, however many aliases of a plan look at it afterwards), the token fields
and a lower-bound token estimate. ``rules.AliasRules.check`` then judges the
facts against one alias's entry without looking at the body again.

Locations are path tuples into the body as sent (see ``errors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from gateway.errors import GatewayError, Location
from gateway.images import inspect_image_url

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
ROLES_WITH_OPTIONAL_CONTENT = frozenset({"assistant", "function"})

# Each content part type and the modality it carries ("text" needs no declaration).
PART_MODALITIES: Mapping[str, str] = {
    "text": "text",
    "refusal": "text",
    "image_url": "image",
    "input_audio": "audio",
    "file": "file",
    "video_url": "video",
}

# Top-level fields whose JSON type the gateway checks (others pass through untouched).
# A value of None is always accepted: the OpenAI schema marks these nullable.
INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs")
NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
BOOLEAN_FIELDS = ("stream", "logprobs", "parallel_tool_calls", "store")
OBJECT_FIELDS = ("stream_options", "response_format", "logit_bias", "metadata")
ARRAY_FIELDS = ("tools", "functions")
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
THINKING_FIELDS = ("reasoning_effort", "reasoning", "thinking")

# The estimate must never exceed the real prompt size: real text runs ~4 characters per
# token, so assuming 16 only refuses what certainly cannot fit (SPEC §4).
CHARS_PER_TOKEN_BOUND = 16


@attrs.frozen
class ImagePart:
    at: Location
    decoded_bytes: int


@attrs.frozen
class ModalPart:
    at: Location
    modality: str


@attrs.frozen
class RequestFacts:
    """What the rules and routing need to know about one request."""

    model: str
    stream: bool
    parts: tuple[ModalPart, ...]          # every non-text part, in body order
    images: tuple[ImagePart, ...]
    token_limits: tuple[tuple[str, int], ...]  # (field, value) for max_tokens / max_completion_tokens
    prompt_tokens_lower_bound: int
    uses_tools: bool
    structured_output_at: Location | None
    thinking_at: Location | None

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(part.modality for part in self.parts)


def _invalid(at: Location, message: str) -> GatewayError:
    return GatewayError("invalid_request", message, at=at)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_fields(body: Mapping[str, Any]) -> None:
    def expect(field: str, ok: bool, what: str) -> None:
        if not ok:
            raise _invalid((field,), f"`{field}` must be {what}, got {_type_name(body[field])}")

    for field in INTEGER_FIELDS:
        value = body.get(field)
        if value is not None:
            expect(field, type(value) is int, "an integer")
    for field in NUMBER_FIELDS:
        value = body.get(field)
        if value is not None:
            expect(field, type(value) in (int, float), "a number")
    for field in BOOLEAN_FIELDS:
        value = body.get(field)
        if value is not None:
            expect(field, type(value) is bool, "true or false")
    for field in OBJECT_FIELDS:
        value = body.get(field)
        if value is not None:
            expect(field, type(value) is dict, "an object")
    for field in ARRAY_FIELDS:
        value = body.get(field)
        if value is not None:
            expect(field, type(value) is list, "an array")
    stop = body.get("stop")
    if stop is not None and not (type(stop) is str or (type(stop) is list and all(type(s) is str for s in stop))):
        raise _invalid(("stop",), "`stop` must be a string or an array of strings")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and type(tool_choice) not in (str, dict):
        raise _invalid(("tool_choice",), "`tool_choice` must be a string or an object")
    response_format = body.get("response_format")
    if response_format is not None and type(response_format.get("type")) is not str:
        raise _invalid(("response_format", "type"), "`response_format.type` must be a string such as \"text\" or \"json_schema\"")


class _PartCollector:
    """Walks the messages once, collecting modal parts, images and text size."""

    def __init__(self) -> None:
        self.parts: list[ModalPart] = []
        self.images: list[ImagePart] = []
        self.text_chars = 0

    def message(self, i: int, message: Any) -> None:
        at: Location = ("messages", i)
        if type(message) is not dict:
            raise _invalid(at, f"each message must be an object, got {_type_name(message)}")
        role = message.get("role")
        if type(role) is not str:
            raise _invalid(at + ("role",), "each message needs a `role` string (system, user, assistant, tool)")
        if role not in ROLES:
            raise _invalid(at + ("role",), f"unknown role {role!r}; one of {', '.join(sorted(ROLES))}")
        if "content" not in message or message["content"] is None:
            if role in ROLES_WITH_OPTIONAL_CONTENT:
                return
            raise _invalid(at + ("content",), f"a {role} message needs `content`: a string or an array of content parts")
        content = message["content"]
        if type(content) is str:
            self.text_chars += len(content)
        elif type(content) is list:
            for j, part in enumerate(content):
                self.part(at + ("content", j), part)
        else:
            raise _invalid(at + ("content",), f"`content` must be a string or an array of content parts, got {_type_name(content)}")

    def part(self, at: Location, part: Any) -> None:
        if type(part) is not dict:
            raise _invalid(at, f"each content part must be an object, got {_type_name(part)}")
        kind = part.get("type")
        if kind not in PART_MODALITIES:
            known = ", ".join(PART_MODALITIES)
            raise _invalid(at + ("type",), f"unknown content part type {kind!r}; one of {known}")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if type(text) is not str:
                raise _invalid(at + (kind,), f"a {kind} part needs a `{kind}` string")
            self.text_chars += len(text)
            return
        payload = part.get(kind)
        if type(payload) is not dict:
            raise _invalid(at + (kind,), f"a {kind} part needs a `{kind}` object")
        self.parts.append(ModalPart(at, PART_MODALITIES[kind]))
        if kind == "image_url":
            url_at = at + ("image_url", "url")
            if "url" not in payload:
                raise _invalid(url_at, "an image_url part needs `image_url.url`: a data:image/...;base64, URI")
            facts = inspect_image_url(payload["url"], max_image_bytes=None, at=url_at)
            self.images.append(ImagePart(url_at, facts.decoded_bytes))


def inspect_request(body: Any) -> RequestFacts:
    """Check a decoded Chat Completions body and return its facts, or raise ``GatewayError``."""
    if type(body) is not dict:
        raise _invalid((), f"the body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if type(model) is not str:
        raise _invalid(("model",), "`model` must be a string naming an alias (see GET /v1/models)")
    messages = body.get("messages")
    if type(messages) is not list:
        raise _invalid(("messages",), "`messages` must be an array of message objects")
    if not messages:
        raise _invalid(("messages",), "`messages` must hold at least one message")
    _check_fields(body)
    collector = _PartCollector()
    for i, message in enumerate(messages):
        collector.message(i, message)

    response_format = body.get("response_format")
    structured = response_format is not None and response_format.get("type") in ("json_object", "json_schema")
    thinking_field = next((f for f in THINKING_FIELDS if body.get(f) is not None), None)
    return RequestFacts(
        model=model,
        stream=body.get("stream") is True,
        parts=tuple(collector.parts),
        images=tuple(collector.images),
        token_limits=tuple((f, body[f]) for f in TOKEN_FIELDS if body.get(f) is not None),
        prompt_tokens_lower_bound=collector.text_chars // CHARS_PER_TOKEN_BOUND,
        uses_tools=bool(body.get("tools")) or bool(body.get("functions")),
        structured_output_at=("response_format", "type") if structured else None,
        thinking_at=(thinking_field,) if thinking_field else None,
    )
