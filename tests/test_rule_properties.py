"""Property tests of the generated rules, against generated configs and requests.

For any generated models.toml and any alias in it:
- a request built to satisfy the alias's entry is accepted, and routing has a target for it;
- the same request with exactly one violation injected is refused with exactly the
  expected code, at exactly the expected location, which exists in the body sent;
- a composite accepts exactly when its own keys and one of its members accept.
And any JSON value at all as a body is accepted or refused with the envelope, never an
exception, with a location that exists in the body.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import msgspec
import pytest
import tomli_w
from hypothesis import given, note
from hypothesis import strategies as st

from gateway.config import load_config, parse_config
from gateway.errors import CATALOG, GatewayError, Location
from gateway.facts import FIELD_TYPES, INTEGER, MAX_CHARS_PER_TOKEN, NUMBER, inspect_request
from gateway.routing import plan_attempts
from gateway.rules import AliasRules
from gateway.shaping import upstream_body
from gateway.snapshot import CompiledAlias, Snapshot, build_snapshot
from strategies import (
    IMAGE_MAGIC,
    Document,
    config_documents,
    image_part,
    image_uri,
    part_of,
    request_for,
    resolve_param,
    resolve_pointer,
)

SEED_CONFIG = Path(__file__).resolve().parent.parent / "models.toml"
SEED = build_snapshot(load_config(SEED_CONFIG), environ={})


def snapshot_of(doc: Document) -> Snapshot:
    return build_snapshot(parse_config(tomli_w.dumps(doc).encode("utf-8")), environ={})


def judge(snapshot: Snapshot, body: Any) -> GatewayError | None:
    """The gateway's verdict on a body before any upstream call: None (accepted) or the refusal."""
    try:
        facts = inspect_request(body)
        snapshot.lookup(facts.model).rules.check(facts)
    except GatewayError as error:
        return error
    return None


def assert_locates_into(error: GatewayError, body: Any) -> None:
    """The envelope's `param` and `pointer` both name a place that exists in ``body`` (or are null)."""
    envelope = msgspec.json.decode(msgspec.json.encode(error.envelope()))["error"]
    assert envelope["code"] in CATALOG
    param, pointer = envelope["param"], envelope["pointer"]
    assert (param is None) == (pointer is None)
    if pointer is not None:
        resolve_pointer(body, pointer)  # raises when it names nothing
        resolve_param(body, param)


# ---------------------------------------------------------------- accepted requests


@st.composite
def alias_and_request(draw: Any, composites: bool = True) -> tuple[Snapshot, CompiledAlias, Document]:
    snapshot = snapshot_of(draw(config_documents(max_aliases=5)))
    names = [n for n, a in snapshot.aliases.items() if composites or not a.rules.members]
    alias = snapshot.aliases[draw(st.sampled_from(names), label="alias")]
    return snapshot, alias, draw(request_for(alias.name, alias.rules))


@given(alias_and_request())
def test_a_request_built_for_an_alias_is_accepted_and_routed(case: tuple[Snapshot, CompiledAlias, Document]) -> None:
    """A request inside an alias's entry passes its rules, has a target, and shapes for each target."""
    snapshot, alias, body = case
    sent = copy.deepcopy(body)
    error = judge(snapshot, body)
    assert error is None, error
    facts = inspect_request(body)
    targets = plan_attempts(alias, facts)
    assert targets, "accepted but no target can serve it"
    for target in targets:
        shaped = msgspec.json.decode(upstream_body(body, target))
        assert shaped["model"] == target.model
        assert shaped["messages"] == body["messages"]
    assert body == sent, "checking or shaping changed the client's body"


# ---------------------------------------------------------------- one violation

Injection = tuple[str, Location]
Injector = Callable[[st.DataObject, Document, AliasRules], Injection | None]


def _user_parts(data: st.DataObject, body: Document) -> tuple[int, list[Any]]:
    """A user message of the body, its content made a parts array; its index and that array."""
    users = [i for i, m in enumerate(body["messages"]) if m["role"] == "user"]
    i = data.draw(st.sampled_from(users), label="user message")
    message = body["messages"][i]
    if isinstance(message["content"], str):
        message["content"] = [{"type": "text", "text": message["content"]}]
    return i, message["content"]


def _add_part(data: st.DataObject, body: Document, part: Document) -> Location:
    i, parts = _user_parts(data, body)
    j = data.draw(st.integers(0, len(parts)), label="position")
    parts.insert(j, part)
    return ("messages", i, "content", j)


def _image_locations(body: Document) -> list[Location]:
    found = []
    for i, message in enumerate(body["messages"]):
        if isinstance(message.get("content"), list):
            for j, part in enumerate(message["content"]):
                if part.get("type") == "image_url":
                    found.append(("messages", i, "content", j, "image_url", "url"))
    return found


def bad_role(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    i = data.draw(st.integers(0, len(body["messages"]) - 1))
    body["messages"][i]["role"] = data.draw(st.sampled_from(["wizard", "User", ""]))
    return "invalid_request", ("messages", i, "role")


def null_user_content(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    i, _ = _user_parts(data, body)
    body["messages"][i]["content"] = data.draw(st.sampled_from([None, 5, {"text": "x"}]))
    return "invalid_request", ("messages", i, "content")


def unknown_part(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    at = _add_part(data, body, {"type": data.draw(st.sampled_from(["hologram", "image", "input_image"]))})
    return "invalid_request", (*at, "type")


def text_not_string(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    at = _add_part(data, body, {"type": "text", "text": data.draw(st.sampled_from([5, None, ["x"]]))})
    return "invalid_request", (*at, "text")


def wrong_number(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    numeric = sorted(f for f, kinds in FIELD_TYPES.items() if kinds in ((INTEGER,), (NUMBER,)))
    field = data.draw(st.sampled_from(numeric), label="field")
    wrong = ["12", True, [1], {"n": 1}] + ([1.5] if FIELD_TYPES[field] == (INTEGER,) else [])
    body[field] = data.draw(st.sampled_from(wrong), label="value")
    return "invalid_request", (field,)


def wrong_field_type(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    field = data.draw(st.sampled_from(sorted(FIELD_TYPES)), label="field")
    wrong = {"string": 7, "object": "x", "array": {"a": 1}, "boolean": "true", "integer": "1", "number": "1"}
    body[field] = wrong[FIELD_TYPES[field][0]]
    if field in ("tool_choice", "function_call", "stop"):
        body[field] = 7  # a string is valid there
    return "invalid_request", (field,)


def model_not_string(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    body["model"] = data.draw(st.sampled_from([7, None, ["m"]]))
    return "invalid_request", ("model",)


def no_messages(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    body["messages"] = data.draw(st.sampled_from([[], None, "hi"]))
    return "invalid_request", ("messages",)


def image_url_not_data(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    url = data.draw(st.sampled_from(["https://example.com/logo.png", "http://x/a.jpg", "file:///etc/passwd", "ftp://h/a"]))
    at = _add_part(data, body, {"type": "image_url", "image_url": {"url": url}})
    return "image_url_not_supported", (*at, "image_url", "url")


def image_not_base64(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    payload = data.draw(st.sampled_from(["@@@@", "iVBORw0KGgo", "aGVsbG8=\n", "a-b_", "====", ""]))
    at = _add_part(data, body, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}})
    return "invalid_image", (*at, "image_url", "url")


def image_of_other_type(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    declared, real = data.draw(st.permutations(sorted(IMAGE_MAGIC)))[:2]
    url = image_uri(real, 40).replace(f"image/{real}", f"image/{declared}", 1)
    at = _add_part(data, body, {"type": "image_url", "image_url": {"url": url}})
    return "invalid_image", (*at, "image_url", "url")


def unsupported_image(data: st.DataObject, body: Document, rules: AliasRules) -> Injection:
    mime = data.draw(st.sampled_from(["image/bmp", "image/tiff", "image/svg+xml", "text/plain"]))
    at = _add_part(data, body, {"type": "image_url", "image_url": {"url": f"data:{mime};base64,Qk0AAAA="}})
    return "unsupported_image_type", (*at, "image_url", "url")


def unaccepted_modality(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    missing = sorted({"image", "audio", "video", "file"} - rules.input)
    if not missing:
        return None
    return "modality_not_supported", _add_part(data, body, part_of(data.draw(st.sampled_from(missing))))


def unaccepted_output(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    missing = sorted({"image", "audio"} - rules.output)
    if not missing:
        return None
    body["modalities"] = ["text", data.draw(st.sampled_from(missing))]
    return "modality_not_supported", ("modalities", 1)


def too_many_images(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    if "image" not in rules.input or rules.max_images is None:
        return None
    while len(_image_locations(body)) <= rules.max_images:
        _add_part(data, body, image_part("gif", 16))
    return "too_many_images", _image_locations(body)[rules.max_images]


def image_too_large(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    if "image" not in rules.input or rules.max_image_bytes is None:
        return None
    big = image_part(data.draw(st.sampled_from(sorted(IMAGE_MAGIC))), rules.max_image_bytes + 1)
    present = _image_locations(body)
    if rules.max_images is not None and len(present) >= rules.max_images:
        at = present[data.draw(st.integers(0, len(present) - 1))]
        resolve_pointer(body, "/" + "/".join(map(str, at[:-1])))["url"] = big["image_url"]["url"]
        return "image_too_large", at
    return "image_too_large", (*_add_part(data, body, big), "image_url", "url")


def max_tokens_too_small(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    if rules.min_max_tokens is None or rules.min_max_tokens == 1:
        return None  # under 1 is no budget at all: token_budget_under_one
    field = data.draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body[field] = data.draw(st.integers(max(1, rules.min_max_tokens - 50), rules.min_max_tokens - 1))
    return "max_tokens_too_small", (field,)


def token_budget_under_one(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    field = data.draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body[field] = data.draw(st.integers(max_value=0))
    return "invalid_request", (field,)


def max_tokens_too_large(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    if rules.max_output_tokens is None:
        return None
    field = data.draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body[field] = data.draw(st.integers(rules.max_output_tokens + 1, rules.max_output_tokens + 10_000))
    return "max_tokens_too_large", (field,)


def context_too_long(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    if rules.context_window is None:
        return None
    body["messages"].append({"role": "user", "content": "w" * (rules.context_window * MAX_CHARS_PER_TOKEN + 1)})
    return "context_length_exceeded", ("messages",)


def refused_feature(data: st.DataObject, body: Document, rules: AliasRules) -> Injection | None:
    uses: dict[str, tuple[str, Any, Location, str]] = {
        "streaming": ("stream", True, ("stream",), "stream_not_supported"),
        "tools": ("tools", [{"type": "function", "function": {"name": "f"}}], ("tools",), "capability_not_supported"),
        "structured_output": ("response_format", {"type": "json_schema", "json_schema": {"name": "s"}},
                              ("response_format", "type"), "capability_not_supported"),
        "thinking": ("reasoning_effort", "high", ("reasoning_effort",), "capability_not_supported"),
    }
    refused = sorted(c for c in uses if getattr(rules, c) is False)
    if not refused:
        return None
    field, value, at, code = uses[data.draw(st.sampled_from(refused))]
    body[field] = value
    return code, at


INJECTORS: dict[str, Injector] = {
    f.__name__: f
    for f in (
        bad_role, null_user_content, unknown_part, text_not_string, wrong_number, wrong_field_type, model_not_string,
        no_messages, image_url_not_data, image_not_base64, image_of_other_type, unsupported_image,
        unaccepted_modality, unaccepted_output, too_many_images, image_too_large, max_tokens_too_small,
        token_budget_under_one, max_tokens_too_large, context_too_long, refused_feature,
    )
}


@given(alias_and_request(composites=False), st.sampled_from(sorted(INJECTORS)), st.data())
def test_one_injected_violation_gets_exactly_its_code_and_location(
    case: tuple[Snapshot, CompiledAlias, Document], injector: str, data: st.DataObject
) -> None:
    """A valid request with one violation injected is refused with that code, at that place in the body."""
    snapshot, alias, body = case
    injected = INJECTORS[injector](data, body, alias.rules)
    if injected is None:
        return  # this alias's entry has no such rule to break
    code, at = injected
    error = judge(snapshot, body)
    note(f"body keys: {sorted(body)}")
    assert error is not None, f"{injector} was accepted"
    assert (error.code, error.at) == (code, at), error
    assert error.status == CATALOG[code].status
    assert_locates_into(error, body)


# ---------------------------------------------------------------- composites


@st.composite
def composite_and_request(draw: Any) -> tuple[AliasRules, Document]:
    doc = draw(config_documents(max_aliases=5))
    snapshot = snapshot_of(doc)
    composites = [a for a in snapshot.aliases.values() if a.rules.members]
    if not composites:
        # Route the first alias through every other one: a generated file always has a target last.
        first, *others = doc["models"]
        if not others:
            others = [first]
            doc["models"]["extra-target"] = {k: v for k, v in doc["models"][first].items() if k != "fallback"}
            others = ["extra-target"]
        doc["models"][first] = {"route": others}
        snapshot = snapshot_of(doc)
        composites = [snapshot.aliases[first]]
    composite = draw(st.sampled_from(composites))
    member = draw(st.sampled_from(composite.rules.members))
    body = draw(request_for(composite.name, member))
    return composite.rules, body


@given(composite_and_request())
def test_a_composite_accepts_exactly_when_its_own_keys_and_a_member_accept(case: tuple[AliasRules, Document]) -> None:
    """Composite = own declared keys AND any member; its refusal is its own, or that of its first member
    that takes the request's modalities (its first member's when none does)."""
    rules, body = case
    facts = inspect_request(body)
    own = attrs.evolve(rules, members=())
    member_verdicts = [member.accepts(facts) for member in rules.members]
    assert rules.accepts(facts) == (own.accepts(facts) and any(member_verdicts))
    if own.accepts(facts) and not any(member_verdicts):
        with pytest.raises(GatewayError) as refused:
            rules.check(facts)
        takes_modalities = [
            m for m in rules.members
            if all(p.modality in m.input for p in facts.parts) and all(o.modality in m.output for o in facts.outputs)
        ]
        speaker = (takes_modalities or list(rules.members))[0]
        with pytest.raises(GatewayError) as spoken:
            speaker.check(facts)
        assert (refused.value.code, refused.value.at) == (spoken.value.code, spoken.value.at)
        assert f"'{rules.alias}'" in refused.value.message


# ---------------------------------------------------------------- any JSON at all

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from([*FIELD_TYPES, "model", "messages", "reasoning", "thinking", "chat_template_kwargs"])
PART_TYPES = st.sampled_from(["text", "refusal", "image_url", "input_audio", "file", "video_url", "other"])
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "other"])
SEED_MODELS = st.sampled_from([*SEED.aliases, "no-such-model"])
PARTS = st.fixed_dictionaries({"type": PART_TYPES}, optional={
    "text": st.text(max_size=8) | JSON, "refusal": JSON,
    "image_url": st.fixed_dictionaries({}, optional={"url": st.just(image_uri("png", 20)) | JSON, "detail": JSON}) | JSON,
    "input_audio": st.fixed_dictionaries({}, optional={"data": JSON, "format": JSON}) | JSON,
    "file": JSON, "video_url": JSON,
})
MESSAGES = st.fixed_dictionaries({"role": ROLES}, optional={
    "content": st.text(max_size=8) | st.lists(PARTS, max_size=3) | JSON,
    "tool_calls": st.lists(JSON, max_size=2) | JSON,
    "name": JSON, "tool_call_id": JSON,
})
CHAT_LIKE = st.fixed_dictionaries(
    {"model": SEED_MODELS, "messages": st.lists(MESSAGES, max_size=3) | JSON},
    optional={"extra": st.dictionaries(FIELD_NAMES, JSON, max_size=3)},
).map(lambda d: {**d.pop("extra", {}), **d})


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path] if path else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found += _paths(value, (*path, key))
    return found


@st.composite
def mutated_seed_requests(draw: Any) -> Any:
    """A valid request for a shipped alias with one place replaced by any JSON, or removed."""
    alias = SEED.aliases[draw(st.sampled_from(sorted(SEED.aliases)))]
    body = draw(request_for(alias.name, alias.rules))
    path = draw(st.sampled_from(_paths(body)))
    parent: Any = body
    for step in path[:-1]:
        parent = parent[step]
    if draw(st.booleans()):
        parent[path[-1]] = draw(JSON)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return body


@given(JSON | CHAT_LIKE | mutated_seed_requests())
def test_any_json_body_is_accepted_or_refused_with_a_located_envelope(body: Any) -> None:
    """Any JSON value as a body is accepted (and shapes for its targets) or refused in the envelope."""
    before = copy.deepcopy(body)
    error = judge(SEED, body)
    if error is None:
        facts = inspect_request(body)
        for target in plan_attempts(SEED.lookup(facts.model), facts):
            msgspec.json.decode(upstream_body(body, target))
    else:
        assert_locates_into(error, body)
    assert body == before
