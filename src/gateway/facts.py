"""Read a chat request once: check its shape and collect the facts the rules need.

Everything here is independent of the alias: the body's shape (OpenAI Chat
Completions), the content parts and their modalities, every image (validated
once, however many aliases of a plan look at it afterwards), the token fields,
the features the request uses and a lower-bound token estimate.
``rules.AliasRules.check`` then judges the facts against one alias's entry
without looking at the body again.

How the shape is checked (against the OpenAI schema,
``contracts/openai-chat.openapi.yaml``):
1. ``model`` is a string; ``messages`` a non-empty array of objects, each with a
   known ``role``.
2. ``content`` is a string, an array of content parts of a known type, or null
   where the schema allows it: an assistant message with ``tool_calls`` (or the
   deprecated ``function_call``), and the deprecated ``function`` role.
3. Known top-level fields have their JSON type (``FIELD_TYPES``); a null is
   accepted for every one of them and means "absent" (SPEC §2). Values no
   provider serves are refused (``LEAST_VALUES``: no choice or token asked for,
   a negative temperature); upper bounds (``temperature`` up to 2, ``n`` up to
   128, ...) are left to the upstream: providers differ, and a gateway that is
   stricter than its upstream refuses requests the model would serve.
4. Which part types a role may carry is not policed either (Anthropic takes
   images in tool results, OpenAI does not): what the alias accepts is what its
   ``input`` modalities say, judged by the rules.
Unknown fields, at any level, pass through unchecked.

Locations are path tuples into the body as sent (see ``errors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs

from gateway.errors import GatewayError, Location, json_type_name
from gateway.images import inspect_image_url

ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# Each content part type and the modality it carries ("text" needs no declaration).
PART_MODALITIES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "text": "text",
        "refusal": "text",
        "image_url": "image",
        "input_audio": "audio",
        "file": "file",
        "video_url": "video",
    }
)
TEXT_PARTS: Final = frozenset({"text", "refusal"})

# The JSON types of the top-level fields the gateway knows, from the OpenAI schema
# (``video_url`` parts and ``reasoning`` are provider extensions and pass unchecked).
# "integer" follows JSON Schema: 200.0 is an integer, 200.5 and true are not.
INTEGER, NUMBER, BOOLEAN, STRING, OBJECT, ARRAY = "integer", "number", "boolean", "string", "object", "array"
FIELD_TYPES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "max_tokens": (INTEGER,),
        "max_completion_tokens": (INTEGER,),
        "n": (INTEGER,),
        "seed": (INTEGER,),
        "top_logprobs": (INTEGER,),
        "temperature": (NUMBER,),
        "top_p": (NUMBER,),
        "presence_penalty": (NUMBER,),
        "frequency_penalty": (NUMBER,),
        "stream": (BOOLEAN,),
        "logprobs": (BOOLEAN,),
        "parallel_tool_calls": (BOOLEAN,),
        "store": (BOOLEAN,),
        "stream_options": (OBJECT,),
        "response_format": (OBJECT,),
        "logit_bias": (OBJECT,),
        "metadata": (OBJECT,),
        "audio": (OBJECT,),
        "prediction": (OBJECT,),
        "web_search_options": (OBJECT,),
        "tools": (ARRAY,),
        "functions": (ARRAY,),
        "modalities": (ARRAY,),
        "user": (STRING,),
        "reasoning_effort": (STRING,),
        "service_tier": (STRING,),
        "verbosity": (STRING,),
        "safety_identifier": (STRING,),
        "prompt_cache_key": (STRING,),
        "prompt_cache_retention": (STRING,),
        "prompt_cache_options": (OBJECT,),
        "moderation": (OBJECT,),
        "stop": (STRING, ARRAY),
        "tool_choice": (STRING, OBJECT),
        "function_call": (STRING, OBJECT),
    }
)
TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens")
# The least value of each field that asks for anything: no upstream serves fewer than one
# choice or token, a negative temperature or probability mass, and OpenAI refuses them too,
# so they fail here, at their field, not upstream in each provider's words.
LEAST_VALUES: Final[Mapping[str, int]] = MappingProxyType(
    {"max_tokens": 1, "max_completion_tokens": 1, "n": 1, "top_logprobs": 0, "temperature": 0, "top_p": 0}
)

# The lower bound of the prompt's size in tokens is its text length divided by the
# longest a single token can be. Byte-level BPE vocabularies (GPT-2, cl100k, o200k,
# Llama 3, Qwen, Mistral Tekken) and SentencePiece ones (Gemma, Llama 2) have no token
# longer than 256 bytes -- their longest are runs of spaces or punctuation -- and a
# character is at least one byte, so no tokenizer turns n characters into fewer than
# n / 256 tokens. Chat templates, images and tool definitions only add tokens. The
# estimate therefore never exceeds the true prompt size: the context pre-check only
# refuses what certainly cannot fit (SPEC §5), at the price of catching only gross
# excess (real text runs near 4 characters per token).
MAX_CHARS_PER_TOKEN: Final = 256


@attrs.frozen
class ImagePart:
    """One image of the request: where its URL is, and its decoded size."""

    at: Location
    decoded_bytes: int


@attrs.frozen
class ModalPart:
    """One non-text thing the request sends or asks for, with where it is."""

    at: Location
    modality: str


@attrs.frozen
class RequestFacts:
    """What the rules and routing need to know about one request."""

    model: str
    stream: bool
    parts: tuple[ModalPart, ...]  # every non-text content part, in body order
    images: tuple[ImagePart, ...]
    token_limits: tuple[tuple[str, int], ...]  # (field, value) for max_tokens / max_completion_tokens
    prompt_tokens_lower_bound: int
    tools_at: Location | None = None  # `tools` (or `functions`) when non-empty
    structured_output_at: Location | None = None  # `response_format.type` of json_object / json_schema
    thinking_at: Location | None = None  # the field that turns reasoning on
    outputs: tuple[ModalPart, ...] = ()  # output modalities asked for (`modalities[i]`, `audio`)
    prompt_chars: int = 0  # characters of text in the messages (rate limits estimate tokens from it)

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(part.modality for part in self.parts)

    @property
    def uses_tools(self) -> bool:
        return self.tools_at is not None


def _invalid(at: Location, message: str) -> GatewayError:
    return GatewayError("invalid_request", message, at=at)


def _field_at(container: Mapping[str, Any], at: Location, field: str) -> Location:
    """Where a field's error points: the field, or its object when the field is missing (SPEC §4:
    a location always exists in the body sent)."""
    return at + (field,) if field in container else at


def _got(container: Mapping[str, Any], field: str) -> str:
    return f"got {json_type_name(container[field])}" if field in container else "it is missing"


def _is(value: Any, kind: str) -> bool:
    cls = type(value)
    if kind == INTEGER:
        return cls is int or (cls is float and value.is_integer())
    if kind == NUMBER:
        return cls is int or cls is float
    if kind == BOOLEAN:
        return cls is bool
    if kind == STRING:
        return cls is str
    if kind == OBJECT:
        return cls is dict
    return cls is list


_ARTICLE = {INTEGER: "an integer", NUMBER: "a number", BOOLEAN: "true or false", STRING: "a string", OBJECT: "an object", ARRAY: "an array"}


def _expect(value: Any, kinds: tuple[str, ...], at: Location, what: str) -> None:
    if not any(_is(value, kind) for kind in kinds):
        wanted = " or ".join(_ARTICLE[kind] for kind in kinds)
        raise _invalid(at, f"`{what}` must be {wanted} (or null), got {json_type_name(value)}")


def _check_fields(body: Mapping[str, Any]) -> None:
    for field, value in body.items():  # the body's few fields, not the 32 known ones
        kinds = FIELD_TYPES.get(field)
        if kinds is not None and value is not None:
            _expect(value, kinds, (field,), field)
    for field, least in LEAST_VALUES.items():
        value = body.get(field)
        if value is not None and value < least:
            raise _invalid((field,), f"`{field}` must be at least {least}, got {value}")
    stop = body.get("stop")
    if type(stop) is list:
        for i, item in enumerate(stop):
            if type(item) is not str:
                raise _invalid(("stop", i), f"`stop` must be a string or an array of strings, got {json_type_name(item)} at [{i}]")
    for field in ("modalities", "tools", "functions"):
        items = body.get(field)
        wanted = STRING if field == "modalities" else OBJECT
        for i, item in enumerate(items if type(items) is list else ()):
            if not _is(item, wanted):
                raise _invalid((field, i), f"each entry of `{field}` must be {_ARTICLE[wanted]}, got {json_type_name(item)}")
    response_format = body.get("response_format")
    if response_format is not None and type(response_format.get("type")) is not str:
        raise _invalid(
            _field_at(response_format, ("response_format",), "type"),
            f'`response_format.type` must be a string such as "text" or "json_schema", {_got(response_format, "type")}',
        )


def _text_len(value: Any) -> int:
    return len(value) if type(value) is str else 0


class _MessageWalker:
    """Walks the messages once, collecting modal parts, images and text size."""

    def __init__(self) -> None:
        self.parts: list[ModalPart] = []
        self.images: list[ImagePart] = []
        self.text_chars = 0

    def message(self, i: int, message: Any) -> None:
        at: Location = ("messages", i)
        if type(message) is not dict:
            raise _invalid(at, f"each message must be an object, got {json_type_name(message)}")
        role = message.get("role")
        if type(role) is not str:
            raise _invalid(
                _field_at(message, at, "role"),
                f"each message needs a `role` string (system, developer, user, assistant or tool), {_got(message, 'role')}",
            )
        if role not in ROLES:
            raise _invalid(at + ("role",), f"unknown role {role[:40]!r}; one of {', '.join(sorted(ROLES))}")
        for field in ("name", "tool_call_id"):
            value = message.get(field)
            if value is not None and type(value) is not str:
                raise _invalid(at + (field,), f"`{field}` must be a string, got {json_type_name(value)}")
        may_omit_content = role == "function" or (role == "assistant" and (self._calls(at, message) or self._answered_otherwise(at, message)))
        content = message.get("content")
        if content is None:
            if may_omit_content:
                return
            why = (
                "an assistant message needs `content` unless it has `tool_calls`, `function_call`, `refusal` or `audio`"
                if role == "assistant"
                else f"a {role} message needs `content`"
            )
            raise _invalid(_field_at(message, at, "content"), f"{why}: a string or an array of content parts, {_got(message, 'content')}")
        if type(content) is str:
            self.text_chars += len(content)
        elif type(content) is list:
            if not content and not may_omit_content:
                raise _invalid(at + ("content",), "`content` must hold at least one content part (or be a string)")
            for j, part in enumerate(content):
                self.part(at + ("content", j), part)
        else:
            raise _invalid(at + ("content",), f"`content` must be a string or an array of content parts, got {json_type_name(content)}")

    def _calls(self, at: Location, message: Mapping[str, Any]) -> bool:
        """Whether an assistant message calls tools (so its content may be null); checks their shape."""
        calls = message.get("tool_calls")
        if calls is not None:
            if type(calls) is not list:
                raise _invalid(at + ("tool_calls",), f"`tool_calls` must be an array, got {json_type_name(calls)}")
            for k, call in enumerate(calls):
                if type(call) is not dict:
                    raise _invalid(at + ("tool_calls", k), f"each tool call must be an object, got {json_type_name(call)}")
                function = call.get("function")
                if type(function) is dict:
                    self.text_chars += _text_len(function.get("arguments")) + _text_len(function.get("name"))
        function_call = message.get("function_call")
        if function_call is not None and type(function_call) is not dict:
            raise _invalid(at + ("function_call",), f"`function_call` must be an object, got {json_type_name(function_call)}")
        return bool(calls) or function_call is not None

    def _answered_otherwise(self, at: Location, message: Mapping[str, Any]) -> bool:
        """Whether an assistant message is a model's refusal or audio answer, which come with null
        content: clients send them back as they got them (``messages.append(choice.message)``)."""
        refusal = message.get("refusal")
        if refusal is not None:
            if type(refusal) is not str:
                raise _invalid(at + ("refusal",), f"`refusal` must be a string, got {json_type_name(refusal)}")
            self.text_chars += len(refusal)
            return True
        audio = message.get("audio")
        if audio is not None and type(audio) is not dict:
            raise _invalid(at + ("audio",), f"`audio` must be an object (the earlier answer's `id`), got {json_type_name(audio)}")
        return audio is not None

    def part(self, at: Location, part: Any) -> None:
        if type(part) is not dict:
            raise _invalid(at, f"each content part must be an object, got {json_type_name(part)}")
        kind = part.get("type")
        if type(kind) is not str or kind not in PART_MODALITIES:
            shown = repr(kind[:40]) if type(kind) is str else json_type_name(kind)
            if "type" not in part:
                raise _invalid(at, f"each content part needs a `type`: one of {', '.join(PART_MODALITIES)}")
            raise _invalid(at + ("type",), f"unknown content part type {shown}; one of {', '.join(PART_MODALITIES)}")
        payload = part.get(kind)
        if kind in TEXT_PARTS:
            if type(payload) is not str:
                raise _invalid(_field_at(part, at, kind), f"a {kind} part needs a `{kind}` string, {_got(part, kind)}")
            self.text_chars += len(payload)
            return
        if type(payload) is not dict:
            raise _invalid(_field_at(part, at, kind), f"a {kind} part needs a `{kind}` object, {_got(part, kind)}")
        self.parts.append(ModalPart(at, PART_MODALITIES[kind]))
        if kind == "image_url":
            self._image(at + ("image_url",), payload)
        elif kind == "input_audio":
            _required_strings(at + ("input_audio",), payload, "data", "format")
        elif kind == "video_url":
            _required_strings(at + ("video_url",), payload, "url")
        else:
            _optional_strings(at + ("file",), payload, "file_data", "file_id", "filename")

    def _image(self, at: Location, payload: Mapping[str, Any]) -> None:
        _optional_strings(at, payload, "detail")
        if "url" not in payload:
            raise _invalid(at, "an image_url part needs `image_url.url`: a data:image/...;base64, URI")
        # Validated once here, without a size limit: the limit is the alias's, judged by the rules.
        image = inspect_image_url(payload["url"], max_image_bytes=None, at=at + ("url",))
        self.images.append(ImagePart(at + ("url",), image.decoded_bytes))


def _required_strings(at: Location, payload: Mapping[str, Any], *fields: str) -> None:
    for field in fields:
        value = payload.get(field)
        if type(value) is not str:
            raise _invalid(_field_at(payload, at, field), f"`{at[-1]}.{field}` must be a string, {_got(payload, field)}")


def _optional_strings(at: Location, payload: Mapping[str, Any], *fields: str) -> None:
    for field in fields:
        value = payload.get(field)
        if value is not None and type(value) is not str:
            raise _invalid(at + (field,), f"`{at[-1]}.{field}` must be a string, got {json_type_name(value)}")


def _thinking_at(body: Mapping[str, Any]) -> Location | None:
    """The field that turns reasoning on; an explicit "off" (effort none, disabled) is not thinking."""
    effort = body.get("reasoning_effort")
    if effort is not None and effort != "none":
        return ("reasoning_effort",)
    reasoning = body.get("reasoning")  # OpenRouter: {"effort": ..., "max_tokens": ..., "enabled": ...}
    if type(reasoning) is dict and reasoning and reasoning.get("enabled") is not False and reasoning.get("effort") != "none":
        return ("reasoning",)
    thinking = body.get("thinking")  # Anthropic-style: {"type": "enabled" | "disabled", ...}
    if type(thinking) is dict and thinking.get("type") != "disabled":
        return ("thinking",)
    kwargs = body.get("chat_template_kwargs")  # vLLM / Qwen3: {"enable_thinking": true}
    if type(kwargs) is dict and kwargs.get("enable_thinking") is True:
        return ("chat_template_kwargs", "enable_thinking")
    return None


def _outputs(body: Mapping[str, Any]) -> tuple[ModalPart, ...]:
    asked = [ModalPart(("modalities", i), m) for i, m in enumerate(body.get("modalities") or ()) if m != "text"]
    if body.get("audio") is not None:
        asked.append(ModalPart(("audio",), "audio"))
    return tuple(asked)


def _token_limits(body: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple((field, int(body[field])) for field in TOKEN_FIELDS if body.get(field) is not None)


def inspect_request(body: Any) -> RequestFacts:
    """Check a decoded Chat Completions body and return its facts, or raise ``GatewayError``."""
    if type(body) is not dict:
        raise _invalid((), f"the body must be a JSON object, got {json_type_name(body)}")
    model = body.get("model")
    if type(model) is not str:
        raise _invalid(_field_at(body, (), "model"), f"`model` must be a string naming an alias (see GET /v1/models), {_got(body, 'model')}")
    messages = body.get("messages")
    if type(messages) is not list:
        raise _invalid(_field_at(body, (), "messages"), f"`messages` must be an array of message objects, {_got(body, 'messages')}")
    if not messages:
        raise _invalid(("messages",), "`messages` must hold at least one message")
    _check_fields(body)
    walker = _MessageWalker()
    for i, message in enumerate(messages):
        walker.message(i, message)

    tools_field = next((f for f in ("tools", "functions") if body.get(f)), None)
    response_format = body.get("response_format")
    structured = response_format is not None and response_format["type"] in ("json_object", "json_schema")
    return RequestFacts(
        model=model,
        stream=body.get("stream") is True,
        parts=tuple(walker.parts),
        images=tuple(walker.images),
        token_limits=_token_limits(body),
        prompt_tokens_lower_bound=-(-walker.text_chars // MAX_CHARS_PER_TOKEN),
        tools_at=(tools_field,) if tools_field else None,
        structured_output_at=("response_format", "type") if structured else None,
        thinking_at=_thinking_at(body),
        outputs=_outputs(body),
        prompt_chars=walker.text_chars,
    )
