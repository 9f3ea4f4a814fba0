"""Splicing the upstream model id into a large body's raw JSON (shaping.splice_model / upstream_body)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gateway.shaping import splice_model

names = st.sampled_from(["gpt-5.5-pro", "image-gen", "qwen3-vl-30b-instruct", "a\"b", "é-model", "model", "x/y"])
scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | names
keys = st.sampled_from(["model", "messages", "content", "text", "url", "max_tokens", "stream"]) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
layouts = st.sampled_from([
    {"separators": (",", ":")},
    {"separators": (", ", ": ")},
    {"indent": 2},
    {"separators": (",", ":"), "ensure_ascii": False},
])


@given(
    alias=names,
    model=names,
    others=st.dictionaries(keys.filter(lambda k: k != "model"), json_values, max_size=5),
    model_first=st.booleans(),
    layout=layouts,
)
def test_a_splice_equals_re_encoding_or_declines(alias: str, model: str, others: dict[str, Any], model_first: bool, layout: dict[str, Any]) -> None:
    body = {"model": alias, **others} if model_first else {**others, "model": alias}
    raw = json.dumps(body, **layout).encode()
    parts = splice_model(raw, alias, model)
    if parts is not None:
        spliced = b"".join(parts)
        assert msgspec.json.decode(spliced) == {**body, "model": model}
        assert len(spliced) == len(raw) - len(msgspec.json.encode(alias)) + len(msgspec.json.encode(model))


def test_the_plain_cases_are_spliced() -> None:
    image = "data:image/png;base64," + "A" * 100_000
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}], "model": "vision"}
    for raw in (json.dumps(body).encode(), bytearray(json.dumps(body, indent=1).encode())):
        parts = splice_model(raw, "vision", "org/model-7b")
        assert parts is not None
        assert msgspec.json.decode(b"".join(parts)) == {**body, "model": "org/model-7b"}


def test_nested_model_keys_and_the_alias_elsewhere_stay_as_they_are() -> None:
    raw = b'{"metadata":{"model":"a","x":["a",{"model":"a"}]},"model" : "a","messages":[{"content":"a"}]}'
    parts = splice_model(raw, "a", "b")
    assert parts is not None
    assert b"".join(parts) == raw.replace(b'"model" : "a"', b'"model" : "b"')


def test_doubtful_bodies_are_declined() -> None:
    # An escaped top-level key (it could spell "model"), or an escaped value.
    assert splice_model(b'{"mod\\u0065l":"a","x":{"model":"a"}}', "a", "b") is None
    assert splice_model(b'{"model":"\\u0061"}', "a", "b") is None
    # A repeated top-level key: which one counts is the decoder's choice.
    assert splice_model(b'{"model":"a","model":"a"}', "a", "b") is None
    # No top-level model at all.
    assert splice_model(b'{"x":{"model":"a"}}', "a", "b") is None
    # Too many strings to walk: re-encoding is cheaper.
    crowded = msgspec.json.encode({"model": "a", "messages": [{"content": str(i)} for i in range(100)]})
    assert splice_model(crowded, "a", "b") is None
