"""Tests for ``POST /c1/chat``: the rebuild, the location mapping, and the endpoint over the wire.

The rebuild and mapping are pure (``gateway.c1``), so the unit and property
tests run the same pipeline as the endpoint (rebuild → request facts → the
alias's rules → relocate) without a server. The integration tests start one
real gateway for the module in front of the session's upstream stand-in, run
the seed page's ``/c1/chat`` curl recipes as written (only the host changed),
and read what the upstream received at ``/_standin/requests``.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import CLIENT_KEY, UPSTREAM_KEY, backend_toml
from gateway.c1 import C1_FIELDS, C1ChatRequest, rebuild_chat_body, translate_c1
from gateway.errors import GatewayError, Location, render_param, render_pointer
from gateway.facts import inspect_request
from gateway.rules import AliasRules
from harness import GatewayProcess, StandIn, local_client, start_gateway, tiny_jpeg

# --- a tiny valid JPEG and helpers --------------------------------------------------------------


JPEG = tiny_jpeg()
JPEG_B64 = base64.b64encode(JPEG).decode("ascii")
JPEG_URI = f"data:image/jpeg;base64,{JPEG_B64}"
HTTPS_URL = "https://example.com/logo.png"
BAD_BASE64_URI = "data:image/jpeg;base64,@@@@"

VISION = AliasRules(alias="vision", input=frozenset({"text", "image"}), output=frozenset({"text"}))
TEXT_ONLY = attrs.evolve(VISION, alias="text", input=frozenset({"text"}))

_MISSING = object()


def resolve(document: Any, pointer: str) -> Any:
    """The value an RFC 6901 pointer names in ``document``, or ``_MISSING``."""
    node = document
    if pointer == "":
        return node
    for token in pointer[1:].split("/"):
        key = token.replace("~1", "/").replace("~0", "~")
        if type(node) is dict and key in node:
            node = node[key]
        elif type(node) is list and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return _MISSING
    return node


def c1_refusal(body: Any, rules: AliasRules = VISION) -> GatewayError | None:
    """What ``/c1/chat`` refuses ``body`` with (the endpoint's pipeline, without a server), or None."""
    relocate: Any = lambda at: at
    try:
        chat, relocate = translate_c1(body)
        rules.check(inspect_request(chat))
    except GatewayError as error:
        return error.relocated(relocate(error.at)) if error.at is not None else error
    return None


def refusal(body: Any, rules: AliasRules = VISION) -> GatewayError:
    error = c1_refusal(body, rules)
    assert error is not None, body
    return error


# --- the rebuild ---------------------------------------------------------------------------------


def test_string_message_and_images_become_one_user_message_of_parts() -> None:
    """A string message plus images is one user message: a text part, then an image_url part per image."""
    body = {"model": "m", "message": "Describe", "images": [{"url": JPEG_URI, "detail": "low"}, JPEG_URI]}
    chat = rebuild_chat_body(body).body
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": JPEG_URI, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": JPEG_URI}},
            ],
        }
    ]


def test_string_message_without_images_stays_a_string() -> None:
    """Text alone is sent as a string content, which text-only servers also accept."""
    assert rebuild_chat_body({"model": "m", "message": "Hi", "images": []}).body["messages"] == [
        {"role": "user", "content": "Hi"}
    ]


def test_empty_string_message_with_images_sends_no_empty_text_part() -> None:
    """An empty `message` with images sends only the images: some providers refuse empty text parts."""
    rebuilt = rebuild_chat_body({"model": "m", "message": "", "images": [HTTPS_URL]})
    assert rebuilt.body["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": HTTPS_URL}}]
    assert rebuilt.layout.relocate(("messages", 0, "content", 0, "image_url", "url")) == ("images", 0)


def test_parts_message_is_the_content_with_images_appended() -> None:
    """A content-parts message is used as the content, and top-level images come after its parts."""
    parts = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": JPEG_URI}}]
    chat = rebuild_chat_body({"model": "m", "message": parts, "images": [JPEG_URI]}).body
    assert chat["messages"][0]["content"] == [*parts, {"type": "image_url", "image_url": {"url": JPEG_URI}}]


def test_system_and_history_come_before_the_new_user_turn() -> None:
    """`system` becomes the first message, `messages` the prior turns, and `message` the last user turn."""
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    chat = rebuild_chat_body({"model": "m", "system": "Be brief.", "messages": history, "message": "three"}).body
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        *history,
        {"role": "user", "content": "three"},
    ]


def test_other_fields_pass_through_and_c1_fields_do_not() -> None:
    """Chat parameters and unknown fields pass through untouched; message, images, system are consumed."""
    body = {
        "model": "m",
        "message": "x",
        "images": [],
        "system": None,
        "tools": [],
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "stream": False,
        "max_tokens": 200,
        "x_vendor": {"keep": [1, 2]},
    }
    chat = rebuild_chat_body(body).body
    assert {k: v for k, v in chat.items() if k != "messages"} == {k: v for k, v in body.items() if k not in C1_FIELDS}


def test_rebuild_does_not_change_the_c1_body() -> None:
    """The c1 body stays as sent, so error locations are resolved against what the client sent."""
    body = {"model": "m", "message": [{"type": "text", "text": "a"}], "images": [{"url": JPEG_URI}]}
    before = copy.deepcopy(body)
    chat = rebuild_chat_body(body).body
    chat["messages"][0]["content"][1]["image_url"]["url"] = "changed"
    assert body == before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, None),  # absent: no place in the body to name (SPEC §4)
        ({"model": "m", "message": None}, "message"),
        ({"model": "m", "message": 42}, "message"),
        ({"model": "m", "message": {"type": "text", "text": "x"}}, "message"),
        ({"model": "m", "message": []}, "message"),
        ({"model": "m", "message": "x", "images": {"url": JPEG_URI}}, "images"),
        ({"model": "m", "message": "x", "images": [JPEG_URI, 7]}, "images[1]"),
        ({"model": "m", "message": "x", "images": [{"detail": "low"}]}, "images[0]"),
        ({"model": "m", "message": "x", "system": 1}, "system"),
        ({"model": "m", "message": "x", "messages": "earlier"}, "messages"),
        ([{"model": "m"}], None),
    ],
)
def test_malformed_c1_fields_are_invalid_request_at_that_field(body: Any, param: str | None) -> None:
    """A missing or wrongly typed c1 field is 400 invalid_request pointing at that field."""
    error = refusal(body)
    assert (error.code, error.status, render_param(error.at)) == ("invalid_request", 400, param)


def test_c1_request_schema_documents_every_field_the_rebuild_reads() -> None:
    """The OpenAPI request schema names message, images, system and messages."""
    assert C1_FIELDS <= set(C1ChatRequest.__struct_fields__)


# --- locations map back into the c1 body ---------------------------------------------------------


def test_https_image_in_images_points_at_its_url() -> None:
    """An https image in images[1] is image_url_not_supported at images[1].url, /images/1/url."""
    error = refusal({"model": "m", "message": "x", "images": [{"url": JPEG_URI}, {"url": HTTPS_URL}]})
    assert error.code == "image_url_not_supported"
    assert (render_param(error.at), render_pointer(error.at)) == ("images[1].url", "/images/1/url")


def test_https_image_in_parts_message_points_into_message() -> None:
    """An https image in a parts-array message is at message[2].image_url.url."""
    parts = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": JPEG_URI}},
        {"type": "image_url", "image_url": {"url": HTTPS_URL}},
    ]
    error = refusal({"model": "m", "message": parts, "images": [{"url": JPEG_URI}]})
    assert (error.code, render_param(error.at)) == ("image_url_not_supported", "message[2].image_url.url")


def test_bare_string_image_points_at_the_string() -> None:
    """A bare-string image has no `url` key, so its errors point at images[i] itself."""
    error = refusal({"model": "m", "message": "x", "images": [JPEG_URI, HTTPS_URL]})
    assert (error.code, render_pointer(error.at)) == ("image_url_not_supported", "/images/1")


def test_images_to_a_text_only_alias_are_modality_not_supported_at_the_image() -> None:
    """Images sent to a text-only alias are refused at images[0]."""
    error = refusal({"model": "m", "message": "x", "images": [{"url": JPEG_URI}]}, TEXT_ONLY)
    assert (error.code, render_param(error.at)) == ("modality_not_supported", "images[0]")


def test_history_errors_point_into_messages() -> None:
    """A fault in a prior turn points at messages[h] of the c1 body, past the system prompt."""
    history = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": HTTPS_URL}}]},
    ]
    error = refusal({"model": "m", "system": "s", "messages": history, "message": "x"})
    assert render_param(error.at) == "messages[1].content[0].image_url.url"


def test_system_parts_errors_point_into_system() -> None:
    """A fault in a parts-array system prompt points at system[j]."""
    error = refusal({"model": "m", "system": [{"type": "text", "text": 5}], "message": "x"})
    assert (error.code, render_param(error.at)) == ("invalid_request", "system[0].text")


def test_context_length_points_at_message_or_history() -> None:
    """A conversation too long for the window points at `message`, or at `messages` when history was sent."""
    rules = attrs.evolve(VISION, context_window=1)
    long_text = "word " * 2000
    assert render_param(refusal({"model": "m", "message": long_text}, rules).at) == "message"
    body = {"model": "m", "messages": [{"role": "user", "content": long_text}], "message": "x"}
    assert render_param(refusal(body, rules).at) == "messages"


@pytest.mark.parametrize(
    ("rules", "extra", "code", "param"),
    [
        (attrs.evolve(VISION, min_max_tokens=200), {"max_tokens": 10}, "max_tokens_too_small", "max_tokens"),
        (
            attrs.evolve(VISION, max_output_tokens=100),
            {"max_completion_tokens": 1000},
            "max_tokens_too_large",
            "max_completion_tokens",
        ),
        (attrs.evolve(VISION, streaming=False), {"stream": True}, "stream_not_supported", "stream"),
        (
            attrs.evolve(VISION, tools=False),
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "capability_not_supported",
            "tools",
        ),
        (
            attrs.evolve(VISION, structured_output=False),
            {"response_format": {"type": "json_object"}},
            "capability_not_supported",
            "response_format.type",
        ),
        (
            attrs.evolve(VISION, thinking=False),
            {"reasoning_effort": "high"},
            "capability_not_supported",
            "reasoning_effort",
        ),
        (
            attrs.evolve(VISION, max_images=1),
            {"images": [JPEG_URI, {"url": JPEG_URI}]},
            "too_many_images",
            "images[1].url",
        ),
        (attrs.evolve(VISION, max_image_bytes=10), {"images": [JPEG_URI]}, "image_too_large", "images[0]"),
        (VISION, {"images": [{"url": BAD_BASE64_URI}]}, "invalid_image", "images[0].url"),
        (VISION, {"temperature": "hot"}, "invalid_request", "temperature"),
    ],
)
def test_chat_rules_apply_through_c1_with_c1_locations(
    rules: AliasRules, extra: dict[str, Any], code: str, param: str
) -> None:
    """Every rule of /v1/chat/completions applies to a c1 body, with `param` naming the c1 field."""
    error = refusal({"model": "m", "message": "x", **extra}, rules)
    assert (error.code, render_param(error.at)) == (code, param)


def test_a_missing_key_is_reported_at_its_existing_parent() -> None:
    """A text part without `text` is refused at message[0], the deepest place that exists in the c1 body."""
    error = refusal({"model": "m", "message": [{"type": "text"}]})
    assert (error.code, render_pointer(error.at)) == ("invalid_request", "/message/0")


# --- properties ----------------------------------------------------------------------------------

text = st.text(max_size=12)
image_urls = st.sampled_from([JPEG_URI])
text_parts = st.builds(lambda t: {"type": "text", "text": t}, text)
image_parts = st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, image_urls)
top_images = st.one_of(
    image_urls,
    st.builds(lambda u: {"url": u}, image_urls),
    st.builds(lambda u: {"url": u, "detail": "low"}, image_urls),
)
history_messages = st.one_of(
    st.builds(lambda r, t: {"role": r, "content": t}, st.sampled_from(["user", "assistant"]), text),
    st.builds(
        lambda parts: {"role": "user", "content": parts},
        st.lists(st.one_of(text_parts, image_parts), min_size=1, max_size=3),
    ),
)


@st.composite
def c1_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Valid c1 bodies: any form of message, images, system, history and pass-through fields."""
    body: dict[str, Any] = {"model": "vision"}
    body["message"] = draw(st.one_of(text, st.lists(st.one_of(text_parts, image_parts), min_size=1, max_size=3)))
    if draw(st.booleans()):
        body["images"] = draw(st.lists(top_images, max_size=3))
    if draw(st.booleans()):
        body["system"] = draw(st.one_of(text, st.lists(text_parts, min_size=1, max_size=2)))
    if draw(st.booleans()):
        body["messages"] = draw(st.lists(history_messages, max_size=3))
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        body["tools"], body["tool_choice"] = [], "auto"
    return body


def image_sites(body: dict[str, Any]) -> list[tuple[Location, Location]]:
    """(part location, url location) of every image in the c1 body, in the order the chat body holds them."""
    sites: list[tuple[Location, Location]] = []
    for h, message in enumerate(body.get("messages") or []):
        if type(message["content"]) is list:
            for j, part in enumerate(message["content"]):
                if part["type"] == "image_url":
                    sites.append((("messages", h, "content", j), ("messages", h, "content", j, "image_url", "url")))
    if type(body["message"]) is list:
        for j, part in enumerate(body["message"]):
            if part["type"] == "image_url":
                sites.append((("message", j), ("message", j, "image_url", "url")))
    for i, image in enumerate(body.get("images") or []):
        sites.append((("images", i), ("images", i, "url") if type(image) is dict else ("images", i)))
    return sites


def set_at(document: Any, at: Location, value: Any) -> None:
    node = document
    for key in at[:-1]:
        node = node[key]
    node[at[-1]] = value


def with_an_image(body: dict[str, Any]) -> dict[str, Any]:
    if not image_sites(body):
        body["images"] = [*(body.get("images") or []), {"url": JPEG_URI}]
    return body


VIOLATIONS = (
    "https_url",
    "bad_base64",
    "field_type",
    "part_type",
    "history_role",
    "message_type",
    "image_item_type",
    "system_type",
    "text_only",
    "too_many_images",
    "max_tokens_too_small",
    "context_length",
    "stream_not_supported",
    "tools_not_supported",
)


def inject(data: st.DataObject, body: dict[str, Any], kind: str) -> tuple[AliasRules, str, Location]:
    """Inject one violation of ``kind`` into ``body``; return the rules to check, and the expected code and location."""
    if kind in ("https_url", "bad_base64", "text_only", "too_many_images"):
        sites = image_sites(with_an_image(body))
        if kind == "text_only":
            return TEXT_ONLY, "modality_not_supported", sites[0][0]
        if kind == "too_many_images":
            return attrs.evolve(VISION, max_images=len(sites) - 1), "too_many_images", sites[-1][1]
        url_at = data.draw(st.sampled_from([url for _, url in sites]))
        set_at(body, url_at, HTTPS_URL if kind == "https_url" else BAD_BASE64_URI)
        return VISION, "image_url_not_supported" if kind == "https_url" else "invalid_image", url_at
    if kind == "field_type":
        field, value = data.draw(
            st.sampled_from(
                [("max_tokens", "many"), ("temperature", "hot"), ("stream", "yes"), ("tools", {}), ("stop", 3)]
            )
        )
        body[field] = value
        return VISION, "invalid_request", (field,)
    if kind == "part_type":
        parts = body["message"] if type(body["message"]) is list else [{"type": "text", "text": body["message"]}]
        j = data.draw(st.integers(0, len(parts)))
        body["message"] = [*parts[:j], {"type": "bogus"}, *parts[j:]]
        return VISION, "invalid_request", ("message", j, "type")
    if kind == "history_role":
        body["messages"] = body.get("messages") or [{"role": "user", "content": "earlier"}]
        h = data.draw(st.integers(0, len(body["messages"]) - 1))
        body["messages"][h]["role"] = "wizard"
        return VISION, "invalid_request", ("messages", h, "role")
    if kind == "message_type":
        body["message"] = data.draw(st.sampled_from([42, True, {"text": "x"}, 1.5]))
        return VISION, "invalid_request", ("message",)
    if kind == "image_item_type":
        body["images"] = [*(body.get("images") or []), data.draw(st.sampled_from([7, None, ["x"], False]))]
        return VISION, "invalid_request", ("images", len(body["images"]) - 1)
    if kind == "system_type":
        body["system"] = data.draw(st.sampled_from([1, True, {"text": "x"}]))
        return VISION, "invalid_request", ("system",)
    if kind == "max_tokens_too_small":
        body["max_tokens"] = data.draw(st.integers(1, 199))
        return attrs.evolve(VISION, min_max_tokens=200), "max_tokens_too_small", ("max_tokens",)
    if kind == "context_length":
        body["message"] = "word " * 2000
        return (
            attrs.evolve(VISION, context_window=1),
            "context_length_exceeded",
            ("messages",) if body.get("messages") else ("message",),
        )
    if kind == "stream_not_supported":
        body["stream"] = True
        return attrs.evolve(VISION, streaming=False), "stream_not_supported", ("stream",)
    body["tools"] = [{"type": "function", "function": {"name": "f"}}]
    return attrs.evolve(VISION, tools=False), "capability_not_supported", ("tools",)


@given(c1_bodies())
def test_valid_c1_bodies_pass_every_rule(body: dict[str, Any]) -> None:
    """The property tests start from bodies the pipeline accepts."""
    assert c1_refusal(body) is None


@given(c1_bodies(), st.sampled_from(VIOLATIONS), st.data())
def test_injected_violation_is_reported_where_it_was_injected(
    body: dict[str, Any], kind: str, data: st.DataObject
) -> None:
    """For any one violation injected into a c1 body, the error names that place, and its pointer resolves there."""
    rules, code, expected = inject(data, body, kind)
    error = refusal(body, rules)
    assert (error.code, error.at) == (code, expected)
    assert resolve(body, render_pointer(error.at) or "") is not _MISSING


def all_locations(document: Any, at: Location = ()) -> Iterator[Location]:
    yield at
    if type(document) is dict:
        for key, value in document.items():
            yield from all_locations(value, (*at, key))
    elif type(document) is list:
        for index, value in enumerate(document):
            yield from all_locations(value, (*at, index))


def value_at(document: Any, at: Location) -> Any:
    return resolve(document, render_pointer(at) or "")


@given(c1_bodies())
def test_every_chat_location_maps_to_the_c1_place_holding_the_same_value(body: dict[str, Any]) -> None:
    """Each location in the rebuilt body maps to one that exists in the c1 body; copied leaves keep their value there."""
    rebuilt = rebuild_chat_body(body)
    for at in all_locations(rebuilt.body):
        mapped = rebuilt.layout.relocate(at)
        found = value_at(body, mapped)
        assert found is not _MISSING, (at, mapped)
        leaf = value_at(rebuilt.body, at)
        # Only "role" and "type" strings are made up by the rebuild; every other leaf is the client's.
        if not isinstance(leaf, (dict, list)) and at[-1:] not in (("role",), ("type",)):
            assert found == leaf, (at, mapped)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5) | st.sampled_from([HTTPS_URL, JPEG_URI]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["url", "type", "text", "role", "content"]), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(c1_bodies(), st.data())
def test_any_mutation_is_refused_at_a_location_in_the_c1_body(body: dict[str, Any], data: st.DataObject) -> None:
    """Replace or delete any part of a valid c1 body: a refusal is a GatewayError whose pointer exists in that body."""
    at = data.draw(st.sampled_from(list(all_locations(body))[1:]))
    parent = value_at(body, at[:-1])
    if type(parent) is dict and data.draw(st.booleans()):
        del parent[at[-1]]
    else:
        parent[at[-1]] = data.draw(json_values)
    error = c1_refusal(body)
    if error is None or error.at is None:
        return
    if value_at(body, error.at) is _MISSING:
        # Only a required top-level field is named although absent, as /v1/chat/completions does.
        assert error.at in (("model",), ("message",)), (error, body)


# --- the endpoint over the wire ------------------------------------------------------------------

VISION_MODEL = "c1-test-vision-upstream"
TEXT_MODEL = "c1-test-text-upstream"
PRO_MODEL = "c1-test-pro-upstream"
SEED_HOST = "https://dgx-spark-4236.spass.fun"

# The seed page's recipe, verbatim.
SEED_RECIPE = r"""B64=$(base64 -w 0 photo.jpg)

curl -s https://dgx-spark-4236.spass.fun/c1/chat \
  -H "Authorization: Bearer $BEARER" \
  -H "Content-Type: application/json" \
  -d "{
    \"model\": \"qwen3-vl-30b-instruct\",
    \"message\": \"Describe this image\",
    \"images\": [{\"url\": \"data:image/jpeg;base64,$B64\"}],
    \"tools\": [],
    \"tool_choice\": \"auto\",
    \"response_format\": {\"type\": \"text\"},
    \"stream\": false,
    \"max_tokens\": 200
  }"
"""
SEED_STRING_MESSAGE = r"""    \"message\": \"Describe this image\",
    \"images\": [{\"url\": \"data:image/jpeg;base64,$B64\"}],
"""
# The seed's fine-control form of `message`, verbatim.
SEED_PARTS_MESSAGE = """"message": [
  {"type": "text", "text": "Compare these two photos"},
  {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}},
  {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}
]"""


def parts_recipe() -> str:
    """The seed recipe with its `message`/`images` lines replaced by the fine-control `message` ("..." is the photo)."""
    escaped = SEED_PARTS_MESSAGE.replace('"', '\\"').replace("...", "$B64")
    return SEED_RECIPE.replace(SEED_STRING_MESSAGE, escaped + ",\n")


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("c1")
    config = directory / "models.toml"
    config.write_text(
        backend_toml(standin)
        + f'[models."qwen3-vl-30b-instruct"]\nbackend = "local"\nmodel = "{VISION_MODEL}"\ninput = ["text", "image"]\n'
        + f'[models."c1-text"]\nbackend = "local"\nmodel = "{TEXT_MODEL}"\n'
        + f'[models."c1-pro"]\nbackend = "local"\nmodel = "{PRO_MODEL}"\ninput = ["text", "image"]\nmin_max_tokens = 200\n'
    )
    env = {"GATEWAY_API_KEYS": CLIENT_KEY, "STANDIN_KEY": UPSTREAM_KEY}
    with start_gateway(config, env=env, log_dir=directory) as running:
        yield running


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    (tmp_path / "photo.jpg").write_bytes(JPEG)
    return tmp_path


def run_recipe(recipe: str, gateway: GatewayProcess, cwd: Path) -> Any:
    """Run a curl recipe with bash as written, against the test gateway; return the JSON it printed."""
    script = recipe.replace(SEED_HOST, gateway.url)
    # No proxy may see loopback test traffic.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["BEARER"] = CLIENT_KEY
    done = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def last_upstream_body(standin: StandIn, model: str) -> dict[str, Any]:
    bodies = [r["body"] for r in standin.requests() if r["model"] == model]
    assert bodies, f"the upstream saw no request for {model}"
    return bodies[-1]  # type: ignore[no-any-return]


def post_c1(gateway: GatewayProcess, body: Any, **headers: str) -> httpx.Response:
    with local_client(timeout_s=15.0) as client:
        return client.post(
            f"{gateway.url}/c1/chat", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}", **headers}
        )


def test_seed_recipe_answers_and_sends_the_rebuilt_request(
    gateway: GatewayProcess, standin: StandIn, photo_dir: Path
) -> None:
    """The seed's /c1/chat recipe answers; the upstream gets one user message of parts and no empty tools."""
    answer = run_recipe(SEED_RECIPE, gateway, photo_dir)
    assert answer["model"] == "qwen3-vl-30b-instruct"
    assert answer["choices"][0]["message"]["content"] == "echo: Describe this image"
    sent = last_upstream_body(standin, VISION_MODEL)
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this image"},
                {"type": "image_url", "image_url": {"url": JPEG_URI}},
            ],
        }
    ]
    assert "tools" not in sent and "tool_choice" not in sent
    assert (sent["response_format"], sent["stream"], sent["max_tokens"]) == ({"type": "text"}, False, 200)
    assert not {"message", "images"} & set(sent)


def test_seed_parts_message_recipe_sends_its_parts(gateway: GatewayProcess, standin: StandIn, photo_dir: Path) -> None:
    """The seed's fine-control `message` array is sent upstream as the user message's content."""
    answer = run_recipe(parts_recipe(), gateway, photo_dir)
    assert answer["choices"][0]["message"]["content"] == "echo: Compare these two photos"
    image = {"type": "image_url", "image_url": {"url": JPEG_URI}}
    assert last_upstream_body(standin, VISION_MODEL)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Compare these two photos"}, image, image]}
    ]


def test_served_headers_are_those_of_chat_completions(gateway: GatewayProcess) -> None:
    """A /c1/chat answer carries x-gateway-served-by, x-gateway-attempts and the echoed x-request-id."""
    response = post_c1(gateway, {"model": "c1-text", "message": "Hello"}, **{"x-request-id": "c1-req-1"})
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-served-by"] == "c1-text"
    assert response.headers["x-gateway-attempts"] == "1"
    assert response.headers["x-request-id"] == "c1-req-1"


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "pointer"),
    [
        (
            {"model": "qwen3-vl-30b-instruct", "message": "x", "images": [{"url": JPEG_URI}, {"url": HTTPS_URL}]},
            400,
            "image_url_not_supported",
            "images[1].url",
            "/images/1/url",
        ),
        (
            {
                "model": "qwen3-vl-30b-instruct",
                "message": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": JPEG_URI}},
                    {"type": "image_url", "image_url": {"url": HTTPS_URL}},
                ],
            },
            400,
            "image_url_not_supported",
            "message[2].image_url.url",
            "/message/2/image_url/url",
        ),
        ({"model": "qwen3-vl-30b-instruct"}, 400, "invalid_request", None, None),
        ({"model": "qwen3-vl-30b-instruct", "message": {"text": "x"}}, 400, "invalid_request", "message", "/message"),
        (
            {"model": "c1-text", "message": "x", "images": [{"url": JPEG_URI}]},
            400,
            "modality_not_supported",
            "images[0]",
            "/images/0",
        ),
        (
            {"model": "c1-pro", "message": "x", "max_tokens": 50},
            400,
            "max_tokens_too_small",
            "max_tokens",
            "/max_tokens",
        ),
        ({"model": "c1-nope", "message": "x"}, 404, "model_not_found", "model", "/model"),
    ],
)
def test_errors_point_into_the_c1_body(
    gateway: GatewayProcess, body: Any, status: int, code: str, param: str, pointer: str
) -> None:
    """/c1/chat refuses in the OpenAI envelope with `param` and `pointer` naming the place in the c1 body."""
    response = post_c1(gateway, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["pointer"]) == (code, param, pointer)


def test_streaming_through_c1(gateway: GatewayProcess, standin: StandIn) -> None:
    """`"stream": true` on /c1/chat relays the upstream's SSE chunks under the alias and ends with [DONE]."""
    body = {"model": "qwen3-vl-30b-instruct", "message": "Stream it", "images": [JPEG_URI], "stream": True}
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    with (
        local_client(timeout_s=15.0) as client,
        client.stream("POST", f"{gateway.url}/c1/chat", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-gateway-served-by"] == "qwen3-vl-30b-instruct"
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"qwen3-vl-30b-instruct"}
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert text.startswith("stand-in part 1 ")
    sent = last_upstream_body(standin, VISION_MODEL)
    assert sent["stream"] is True and sent["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": JPEG_URI},
    }


def test_system_and_history_reach_the_upstream_in_order(gateway: GatewayProcess, standin: StandIn) -> None:
    """`system`, then the `messages` history, then the new user turn is what the upstream receives."""
    history = [{"role": "user", "content": "Earlier"}, {"role": "assistant", "content": "Answer"}]
    response = post_c1(gateway, {"model": "c1-text", "system": "Be brief.", "messages": history, "message": "Now"})
    assert response.status_code == 200, response.text
    assert last_upstream_body(standin, TEXT_MODEL)["messages"] == [
        {"role": "system", "content": "Be brief."},
        *history,
        {"role": "user", "content": "Now"},
    ]


def test_c1_needs_the_client_key_and_post(gateway: GatewayProcess) -> None:
    """/c1/chat refuses a missing key with 401 missing_api_key and a GET with 405, in the envelope."""
    with local_client() as client:
        unauthenticated = client.post(f"{gateway.url}/c1/chat", json={"model": "c1-text", "message": "x"})
        wrong_method = client.get(f"{gateway.url}/c1/chat", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert (unauthenticated.status_code, unauthenticated.json()["error"]["code"]) == (401, "missing_api_key")
    assert (wrong_method.status_code, wrong_method.json()["error"]["code"]) == (405, "method_not_allowed")


def test_openapi_document_describes_c1_chat(gateway: GatewayProcess) -> None:
    """The served OpenAPI document has POST /c1/chat with its request schema (message, images, ...)."""
    with local_client() as client:
        document = client.get(f"{gateway.url}/openapi/openapi.json").json()
    operation = document["paths"]["/c1/chat"]["post"]
    reference = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = resolve(document, reference.removeprefix("#"))
    assert schema is not _MISSING
    assert {
        "model",
        "message",
        "images",
        "system",
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "stream",
        "max_tokens",
    } <= set(schema["properties"])
    assert set(schema["required"]) == {"model", "message"}


@pytest.mark.parametrize(
    ("images", "param"),
    [([{"url": "data:image/jpeg;base64,"}], "images[0].url"), (["data:image/jpeg;base64,"], "images[0]")],
)
def test_image_messages_name_the_c1_field(images: list[Any], param: str) -> None:
    """An image's refusal names the field where the c1 body holds it, as its `param` does, not image_url.url."""
    error = refusal({"model": "m", "message": "x", "images": images})
    assert (error.code, render_param(error.at)) == ("invalid_image", param)
    assert error.message.startswith(f"{param} has no data after 'base64,'"), error.message
    assert "image_url" not in error.message


def test_image_messages_inside_a_parts_message_keep_their_name() -> None:
    """An image part of a parts-array message is an image_url.url in the c1 body too: its message is unchanged."""
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"}}]
    error = refusal({"model": "m", "message": parts})
    assert render_param(error.at) == "message[0].image_url.url"
    assert error.message.startswith("image_url.url has no data"), error.message
