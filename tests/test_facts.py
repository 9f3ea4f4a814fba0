"""Unit tests of ``gateway.facts``: the request's shape against the OpenAI schema, and its facts.

Shape rules come from ``contracts/openai-chat.openapi.yaml``: which fields are nullable,
which JSON type each known field has, which roles and content part types exist, and
where ``content`` may be null.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import yaml

from conftest import peak_allocation
from gateway.errors import GatewayError, Location
from gateway.facts import (
    FIELD_TYPES,
    INTEGER,
    MAX_CHARS_PER_TOKEN,
    NUMBER,
    PART_MODALITIES,
    RequestFacts,
    inspect_request,
)
from harness import REPO_ROOT
from strategies import image_part, image_uri, part_of

USER = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}


def body(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages or [USER]), **fields}


def refusal(value: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        inspect_request(value)
    return info.value


def refused_at(value: Any) -> tuple[str, Location | None]:
    error = refusal(value)
    return error.code, error.at


# ---------------------------------------------------------------- top level


def _schema_types(schemas: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The JSON types a contract schema admits, null aside ($ref, anyOf and oneOf followed)."""
    while "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    if "type" in schema:
        return {schema["type"]} - {"null"}
    admitted: set[str] = set()
    for choice in (*schema.get("anyOf", ()), *schema.get("oneOf", ())):
        admitted |= _schema_types(schemas, choice)
    if not admitted and ("properties" in schema or "allOf" in schema):
        admitted = {"object"}
    return admitted


def _request_properties(schemas: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    properties: dict[str, Any] = {}
    for part in schema.get("allOf", ()):
        properties |= _request_properties(schemas, part)
    return properties | schema.get("properties", {})


def test_every_field_of_the_contract_has_its_json_type_checked() -> None:
    """FIELD_TYPES is the contract's: each request field but model and messages (checked on their own),
    with the JSON types the contract admits. A field left out would pass unchecked, whatever its type."""
    contract = REPO_ROOT.parent / "shared" / "contracts" / "openai-chat.openapi.yaml"
    schemas = yaml.safe_load(contract.read_text(encoding="utf-8"))["components"]["schemas"]
    fields = _request_properties(schemas, schemas["CreateChatCompletionRequest"])
    expected = {name: _schema_types(schemas, schema) for name, schema in fields.items() if name not in ("model", "messages")}
    assert {name: set(kinds) for name, kinds in FIELD_TYPES.items()} == expected


@pytest.mark.parametrize("field", sorted(FIELD_TYPES))
def test_every_known_field_accepts_null_as_absent(field: str) -> None:
    """A null in any known field is accepted: the schema's nullable fields mean "absent" (SPEC §2)."""
    facts = inspect_request(body(**{field: None}))
    assert facts.token_limits == () and facts.stream is False and facts.tools_at is None


@pytest.mark.parametrize("field", sorted(f for f, kinds in FIELD_TYPES.items() if kinds == (INTEGER,)))
@pytest.mark.parametrize("value", [200, 200.0])
def test_integer_fields_take_integers_including_integral_floats(field: str, value: Any) -> None:
    """Integer fields take JSON Schema integers: 200 and 200.0 alike."""
    inspect_request(body(**{field: value}))


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, 0.0, -1, -(2**70)])
def test_token_budgets_below_one_are_refused_at_the_field(field: str, value: Any) -> None:
    """A budget of no tokens is refused for every alias, whatever its min_max_tokens says."""
    error = refusal(body(**{field: value}))
    assert (error.code, error.at) == ("invalid_request", (field,))
    assert f"`{field}` must be at least 1, got {value}" in error.message
    assert inspect_request(body(**{field: 1})).token_limits == ((field, 1),)


@pytest.mark.parametrize(
    ("field", "value", "least"),
    [("n", 0, 1), ("n", -2, 1), ("top_logprobs", -1, 0), ("temperature", -0.5, 0), ("temperature", -(2**70), 0), ("top_p", -0.1, 0)],
)
def test_values_no_upstream_serves_are_refused_at_the_field(field: str, value: float, least: int) -> None:
    """No choice asked for (n = 0 went upstream), a negative temperature, top_p or top_logprobs: refused
    for every alias at the field; the least value itself passes."""
    error = refusal(body(**{field: value}))
    assert (error.code, error.at) == ("invalid_request", (field,))
    assert f"`{field}` must be at least {least}, got {value}" in error.message
    inspect_request(body(**{field: least}))


@pytest.mark.parametrize("value", [0, -3])
def test_seed_takes_any_integer(value: int) -> None:
    inspect_request(body(seed=value))


@pytest.mark.parametrize("field", sorted(f for f, kinds in FIELD_TYPES.items() if kinds == (INTEGER,)))
@pytest.mark.parametrize("value", ["200", 1.5, True, [200], {"n": 1}])
def test_integer_fields_refuse_other_types_at_the_field(field: str, value: Any) -> None:
    """A string, fraction, boolean, array or object in an integer field is refused at that field."""
    assert refused_at(body(**{field: value})) == ("invalid_request", (field,))


@pytest.mark.parametrize("field", sorted(f for f, kinds in FIELD_TYPES.items() if kinds == (NUMBER,)))
def test_number_fields_take_numbers_and_refuse_the_rest(field: str) -> None:
    """Number fields take ints and floats; a string or boolean is refused at the field."""
    inspect_request(body(**{field: 0.7}))
    inspect_request(body(**{field: 1}))
    for wrong in ("0.7", False):
        assert refused_at(body(**{field: wrong})) == ("invalid_request", (field,))


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("stream", True, "true"),
        ("stop", ["a", "b"], [1]),
        ("stop", "END", 5),
        ("tool_choice", "auto", 1),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}, ["auto"]),
        ("response_format", {"type": "text"}, "json"),
        ("response_format", {"type": "json_object"}, {}),  # no type: a 400 at the field, not a fault
        ("tools", [{"type": "function", "function": {"name": "f"}}], {"type": "function"}),
        ("modalities", ["text", "image"], "image"),
        ("reasoning_effort", "low", 2),
        ("logit_bias", {"50256": -100}, [1]),
    ],
)
def test_typed_fields_take_their_schema_type(field: str, good: Any, bad: Any) -> None:
    """A known field takes its schema type and refuses another, pointing into the field."""
    inspect_request(body(**{field: good}))
    code, at = refused_at(body(**{field: bad}))
    assert code == "invalid_request" and at is not None and at[0] == field


def test_unknown_fields_pass_unchecked() -> None:
    """Fields the gateway does not know pass, whatever their type (they go to the upstream)."""
    inspect_request(body(provider={"order": ["x"]}, top_k=5, chat_template_kwargs=[1], repetition_penalty="x"))


@pytest.mark.parametrize(
    ("value", "at"),
    [
        ([], None),
        ("hello", None),
        ({"messages": [USER]}, None),
        ({"model": 5, "messages": [USER]}, ("model",)),
        ({"model": "m"}, None),
        ({"model": "m", "messages": {}}, ("messages",)),
        ({"model": "m", "messages": []}, ("messages",)),
    ],
)
def test_model_and_messages_are_required_and_typed(value: Any, at: Location | None) -> None:
    """`model` is a string and `messages` a non-empty array; a missing one points at the body (null)."""
    error = refusal(value)
    assert error.code == "invalid_request"
    assert (error.at or None) == at
    assert error.envelope()["error"]["param"] == (None if at is None else at[0])


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_every_schema_role_is_known(role: str) -> None:
    """The six roles of the schema's message union are accepted with string content."""
    inspect_request(body({"role": role, "content": "x", "tool_call_id": "c1", "name": "f"}))


@pytest.mark.parametrize(
    ("message", "at"),
    [
        ({"role": "wizard", "content": "x"}, ("messages", 0, "role")),
        ({"role": 3, "content": "x"}, ("messages", 0, "role")),
        ({"content": "x"}, ("messages", 0)),
        ("hello", ("messages", 0)),
        ({"role": "user", "content": "x", "name": 5}, ("messages", 0, "name")),
        ({"role": "tool", "content": "x", "tool_call_id": 7}, ("messages", 0, "tool_call_id")),
    ],
)
def test_a_bad_message_is_refused_where_it_is_wrong(message: Any, at: Location) -> None:
    """An unknown or missing role, a non-object message or a mistyped name points at that place."""
    assert refused_at(body(message)) == ("invalid_request", at)


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_content_null_is_refused_for_roles_that_require_it(role: str) -> None:
    """`content` null or missing is refused for system, developer, user and tool messages."""
    assert refused_at(body({"role": role, "content": None})) == ("invalid_request", ("messages", 0, "content"))
    assert refused_at(body({"role": role})) == ("invalid_request", ("messages", 0))


def test_assistant_content_may_be_null_only_with_tool_calls_a_refusal_or_audio() -> None:
    """An assistant message may have null content with tool_calls (or function_call), or as the
    refusal or audio answer a client sends back as it got it; not otherwise."""
    inspect_request(body(USER, {"role": "assistant", "content": None, "refusal": "I can't help with that."}))
    inspect_request(body(USER, {"role": "assistant", "audio": {"id": "audio_abc"}}))
    assert refused_at(body(USER, {"role": "assistant", "content": None, "refusal": 3})) == ("invalid_request", ("messages", 1, "refusal"))
    assert refused_at(body(USER, {"role": "assistant", "audio": "audio_abc"})) == ("invalid_request", ("messages", 1, "audio"))
    assert refused_at(body(USER, {"role": "assistant", "content": None, "refusal": None, "audio": None})) == (
        "invalid_request",
        ("messages", 1, "content"),
    )
    inspect_request(body(USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}))
    inspect_request(body(USER, {"role": "assistant", "tool_calls": [CALL]}))
    inspect_request(body(USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}))
    inspect_request(body(USER, {"role": "assistant", "content": [], "tool_calls": [CALL]}))
    assert refused_at(body(USER, {"role": "assistant", "content": None})) == ("invalid_request", ("messages", 1, "content"))
    assert refused_at(body(USER, {"role": "assistant", "content": None, "tool_calls": []})) == (
        "invalid_request",
        ("messages", 1, "content"),
    )


def test_function_role_content_is_nullable() -> None:
    """The deprecated function role's content is nullable in the schema."""
    inspect_request(body(USER, {"role": "function", "name": "f", "content": None}))


def test_tool_calls_must_be_an_array_of_objects() -> None:
    """`tool_calls` is an array of objects; another shape points at it."""
    assert refused_at(body({"role": "assistant", "tool_calls": {"id": 1}})) == ("invalid_request", ("messages", 0, "tool_calls"))
    assert refused_at(body({"role": "assistant", "tool_calls": ["x"]})) == ("invalid_request", ("messages", 0, "tool_calls", 0))


@pytest.mark.parametrize("content", [5, True, {"type": "text", "text": "x"}])
def test_content_must_be_a_string_or_an_array(content: Any) -> None:
    """`content` of another JSON type is refused at `content`."""
    assert refused_at(body({"role": "user", "content": content})) == ("invalid_request", ("messages", 0, "content"))


def test_an_empty_parts_array_is_refused() -> None:
    """The schema's content arrays have minItems 1."""
    assert refused_at(body({"role": "user", "content": []})) == ("invalid_request", ("messages", 0, "content"))


# ---------------------------------------------------------------- content parts


@pytest.mark.parametrize(
    ("part", "modality"),
    [
        ({"type": "text", "text": "x"}, None),
        ({"type": "refusal", "refusal": "no"}, None),
        (image_part(), "image"),
        (part_of("audio"), "audio"),
        (part_of("file"), "file"),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "file"),
        (part_of("video"), "video"),
    ],
)
def test_each_part_type_maps_to_its_modality(part: dict[str, Any], modality: str | None) -> None:
    """text and refusal are text; image_url, input_audio, file and video_url carry their modality."""
    facts = inspect_request(body({"role": "user", "content": [{"type": "text", "text": "x"}, part]}))
    expected = () if modality is None else ((("messages", 0, "content", 1), modality),)
    assert tuple((p.at, p.modality) for p in facts.parts) == expected


def test_part_types_are_exactly_the_schemas_plus_video() -> None:
    """The known part types: the schema's five, plus video_url (vLLM, OpenRouter)."""
    assert set(PART_MODALITIES) == {"text", "refusal", "image_url", "input_audio", "file", "video_url"}


@pytest.mark.parametrize(
    ("part", "at"),
    [
        ({"type": "image"}, (0, "type")),
        ({"type": 5}, (0, "type")),
        ({"text": "x"}, (0,)),
        ("just text", (0,)),
        ({"type": "text", "text": 5}, (0, "text")),
        ({"type": "text"}, (0,)),
        ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, (0, "image_url")),
        ({"type": "image_url", "image_url": {}}, (0, "image_url")),
        ({"type": "image_url", "image_url": {"url": 5}}, (0, "image_url", "url")),
        ({"type": "image_url", "image_url": {"url": image_uri("png", 20), "detail": 1}}, (0, "image_url", "detail")),
        ({"type": "input_audio", "input_audio": {"data": "UklGRg=="}}, (0, "input_audio")),
        ({"type": "input_audio", "input_audio": {"data": 1, "format": "wav"}}, (0, "input_audio", "data")),
        ({"type": "video_url", "video_url": {"url": None}}, (0, "video_url", "url")),
        ({"type": "file", "file": {"file_id": 3}}, (0, "file", "file_id")),
    ],
)
def test_a_bad_part_is_refused_at_the_offending_field(part: Any, at: tuple[Any, ...]) -> None:
    """A part of unknown type, or with a missing or mistyped field, points at that field (or the part)."""
    value = body({"role": "user", "content": [part]})
    error = refusal(value)
    assert (error.code, error.at) == ("invalid_request", ("messages", 0, "content", *at))


def test_image_errors_point_at_the_url() -> None:
    """A URL that is not a data URI is image_url_not_supported at image_url.url, as in the seed."""
    parts = [{"type": "text", "text": "What logo?"}, {"type": "image_url", "image_url": {"url": "https://example.com/logo.png"}}]
    error = refusal(body({"role": "user", "content": parts}))
    assert error.code == "image_url_not_supported"
    assert error.envelope()["error"]["param"] == "messages[0].content[1].image_url.url"
    assert error.envelope()["error"]["pointer"] == "/messages/0/content/1/image_url/url"


def test_images_are_counted_with_their_decoded_size() -> None:
    """Every image is collected once, in body order, with its decoded size."""
    parts = [image_part("png", 100), {"type": "text", "text": "x"}, image_part("jpeg", 300)]
    facts = inspect_request(body({"role": "user", "content": parts}, {"role": "user", "content": [image_part("gif", 50)]}))
    assert [(i.at, i.decoded_bytes) for i in facts.images] == [
        (("messages", 0, "content", 0, "image_url", "url"), 100),
        (("messages", 0, "content", 2, "image_url", "url"), 300),
        (("messages", 1, "content", 0, "image_url", "url"), 50),
    ]


def test_a_20_mb_image_is_validated_without_copying_it() -> None:
    """Inspecting a request with a 20 MB image allocates far less than the image (no copy, no decode)."""
    size = 20 * 1024 * 1024
    payload = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(size - 8)).decode("ascii")
    request = body({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}}]})
    found: list[RequestFacts] = []
    peak = peak_allocation(lambda: found.append(inspect_request(request)))
    assert found[0].images[0].decoded_bytes == size
    assert peak < 1024 * 1024, peak  # bounded work slices, never a copy of the 27 MB of base64


# ---------------------------------------------------------------- facts the rules use


def facts_of(**fields: Any) -> RequestFacts:
    return inspect_request(body(**fields))


def test_token_fields_are_collected_as_integers() -> None:
    """max_tokens and max_completion_tokens are collected (integral floats as ints); null is absent."""
    assert facts_of(max_tokens=200.0, max_completion_tokens=300).token_limits == (("max_tokens", 200), ("max_completion_tokens", 300))
    assert facts_of(max_tokens=None).token_limits == ()


@pytest.mark.parametrize(
    ("fields", "at"),
    [
        ({"reasoning_effort": "high"}, ("reasoning_effort",)),
        ({"reasoning_effort": "none"}, None),
        ({"reasoning": {"effort": "high"}}, ("reasoning",)),
        ({"reasoning": {"enabled": False}}, None),
        ({"reasoning": {"effort": "none"}}, None),
        ({"reasoning": {}}, None),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, ("thinking",)),
        ({"thinking": {"type": "disabled"}}, None),
        ({"chat_template_kwargs": {"enable_thinking": True}}, ("chat_template_kwargs", "enable_thinking")),
        ({"chat_template_kwargs": {"enable_thinking": False}}, None),
    ],
)
def test_thinking_is_what_turns_reasoning_on(fields: dict[str, Any], at: Location | None) -> None:
    """Reasoning asked for by any common field counts as thinking; an explicit "off" does not."""
    assert facts_of(**fields).thinking_at == at


def test_tools_structured_output_and_stream_are_detected() -> None:
    """Non-empty tools, json response formats and stream true are facts; empty or text ones are not."""
    assert facts_of(tools=[{"type": "function", "function": {"name": "f"}}]).tools_at == ("tools",)
    assert facts_of(functions=[{"name": "f"}]).tools_at == ("functions",)
    assert facts_of(tools=[]).tools_at is None
    assert facts_of(response_format={"type": "json_schema", "json_schema": {}}).structured_output_at == ("response_format", "type")
    assert facts_of(response_format={"type": "json_object"}).structured_output_at == ("response_format", "type")
    assert facts_of(response_format={"type": "text"}).structured_output_at is None
    assert facts_of(stream=True).stream and not facts_of(stream=None).stream


def test_output_modalities_asked_for_are_facts() -> None:
    """`modalities` entries other than text, and an `audio` request, are output facts with their place."""
    facts = facts_of(modalities=["text", "image"], audio={"voice": "alloy", "format": "wav"})
    assert [(o.at, o.modality) for o in facts.outputs] == [(("modalities", 1), "image"), (("audio",), "audio")]


def test_prompt_lower_bound_counts_text_over_the_longest_token() -> None:
    """The prompt's lower bound is its text (strings, text parts, tool call arguments) over 256 chars a token."""
    assert MAX_CHARS_PER_TOKEN == 256
    assert inspect_request(body({"role": "user", "content": "x" * 256})).prompt_tokens_lower_bound == 1
    assert inspect_request(body({"role": "user", "content": "x" * 257})).prompt_tokens_lower_bound == 2
    parts = [{"type": "text", "text": "y" * 300}, image_part("png", 4000)]
    call = {**CALL, "function": {"name": "f", "arguments": "z" * 211}}
    facts = inspect_request(body({"role": "user", "content": parts}, {"role": "assistant", "tool_calls": [call]}))
    assert facts.prompt_tokens_lower_bound == 2  # 300 + 1 + 211 = 512 characters; images count nothing
