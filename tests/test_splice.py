"""Building a large body's upstream JSON from its raw bytes (shaping.splice_body / top_level_spans)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from conftest import in_pieces
from gateway.shaping import splice_body, top_level_spans

names = st.sampled_from(["gpt-5.5-pro", "image-gen", "qwen3-vl-30b-instruct", "a\"b", "é-model", "model", "x/y"])
scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | names
keys = st.sampled_from(["model", "messages", "content", "text", "url", "max_tokens", "stream", "modalities"]) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
layouts = st.sampled_from([
    {"separators": (",", ":")},
    {"separators": (", ", ": ")},
    {"indent": 2},
    {"separators": (",", ":"), "ensure_ascii": False},
])


@st.composite
def shapings(draw: st.DrawFn, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with top-level fields dropped, changed, renamed or added, the kept values the same objects."""
    shaped = dict(body)
    for key in list(shaped):
        action = draw(st.sampled_from(["keep", "keep", "drop", "change", "rename"]))
        if action == "drop":
            del shaped[key]
        elif action == "change":
            shaped[key] = draw(json_values)
        elif action == "rename":
            shaped[draw(keys)] = shaped.pop(key)
    shaped.update(draw(st.dictionaries(keys, json_values, max_size=2)))
    return shaped


def joined(pieces: tuple[bytes | memoryview, ...]) -> bytes:
    return b"".join(pieces)


@given(body=st.dictionaries(keys, json_values, min_size=1, max_size=6), layout=layouts, data=st.data())
def test_a_splice_decodes_to_the_shaped_body(body: dict[str, Any], layout: dict[str, Any], data: st.DataObject) -> None:
    """Whatever the pieces the body came in: a few random cuts, or a byte per piece."""
    raw = json.dumps(body, **layout).encode()
    decoded = msgspec.json.decode(raw)
    shaped = data.draw(shapings(decoded))
    cuts = data.draw(st.one_of(st.lists(st.integers(0, 1 << 16), max_size=8), st.just(list(range(len(raw))))))
    pieces = splice_body(in_pieces(raw, cuts), decoded, shaped)
    whole = splice_body(in_pieces(raw), decoded, shaped)
    assert (pieces is None) == (whole is None)
    if pieces is not None and whole is not None:
        assert joined(pieces) == joined(whole)
        assert msgspec.json.decode(joined(pieces)) == shaped


def test_an_image_body_keeps_its_image_as_a_view_and_gets_new_fields() -> None:
    image = "data:image/png;base64," + "A" * 100_000
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}], "model": "vision", "max_tokens": 9}
    for raw, cuts in ((json.dumps(body).encode(), []), (json.dumps(body, indent=1).encode(), [30_000, 60_000])):
        decoded = msgspec.json.decode(raw)
        shaped = {"messages": decoded["messages"], "model": "org/model-7b", "max_completion_tokens": 9, "modalities": ["image", "text"]}
        pieces = splice_body(in_pieces(raw, cuts), decoded, shaped)
        assert pieces is not None
        # The head, the messages as views of the body's pieces (one per piece), the rest: not a piece per field.
        assert len(pieces) == 2 + len(cuts) + 1
        assert all(isinstance(piece, memoryview) for piece in pieces[1:-1])
        assert sum(map(len, pieces[1:-1])) > 100_000
        assert msgspec.json.decode(joined(pieces)) == shaped


def test_spans_point_at_the_top_level_values_only() -> None:
    raw = b'{ "metadata" : {"model":"a","x":["a",{"model":"a"}]} ,"model":"a", "n":1 }'
    spans = top_level_spans(in_pieces(raw))
    assert spans is not None
    assert {key: raw[start:end] for key, (start, end) in spans.items()} == {
        "metadata": b'{"model":"a","x":["a",{"model":"a"}]}',
        "model": b'"a"',
        "n": b"1",
    }


def test_doubtful_bodies_are_declined() -> None:
    # An escaped top-level key (it reads otherwise than it is spelled), or a repeated one.
    assert top_level_spans(in_pieces(b'{"mod\\u0065l":"a","x":{"model":"a"}}')) is None
    assert top_level_spans(in_pieces(b'{"model":"a","model":"b"}')) is None
    # Too many strings to walk: re-encoding is cheaper.
    crowded = msgspec.json.encode({"model": "a", "messages": [{"content": str(i)} for i in range(100)]})
    assert top_level_spans(in_pieces(crowded)) is None
    # A body whose top level does not match what it decoded to.
    assert splice_body(in_pieces(b'{"model":"a"}'), {"model": "a", "extra": 1}, {"model": "b"}) is None
