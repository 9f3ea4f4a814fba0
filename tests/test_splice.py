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


# JSON text whose objects may repeat a key: a decoder keeps the last value, and that is what was checked.
Pairs = list[tuple[str, Any]]
json_texts = st.recursive(
    scalars.map(json.dumps),
    lambda inner: st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
    | st.lists(st.tuples(keys, inner), max_size=4).map(lambda pairs: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"),
    max_leaves=12,
)


def no_repeated_keys(pairs: Pairs) -> dict[str, Any]:
    names = [key for key, _ in pairs]
    assert len(names) == len(set(names)), f"a repeated key went upstream: {names}"
    return dict(pairs)


@given(fields=st.lists(st.tuples(keys, json_texts), min_size=1, max_size=6, unique_by=lambda pair: pair[0]), data=st.data())
def test_a_splice_repeats_no_key_the_decoder_dropped(fields: list[tuple[str, str]], data: st.DataObject) -> None:
    """A value the decoder read with a repeated key is not the client's bytes: an upstream that keeps
    the first value (or refuses the body) would get what the rules never saw. Such a body is re-encoded."""
    raw = ("{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in fields) + "}").encode()
    decoded = msgspec.json.decode(raw)
    shaped = data.draw(shapings(decoded))
    pieces = splice_body(in_pieces(raw), decoded, shaped)
    if pieces is not None:
        assert json.loads(joined(pieces), object_pairs_hook=no_repeated_keys) == shaped


def test_a_repeated_image_url_is_re_encoded_not_spliced() -> None:
    """The case that mattered: a checked data URI behind an unchecked URL, in a body spliced from its bytes."""
    image = "data:image/png;base64," + "A" * 100_000
    raw = (
        '{"model":"vision","messages":[{"role":"user","content":[{"type":"image_url",'
        f'"image_url":{{"url":"https://elsewhere.example/x.png","url":"{image}"}}}}]}}]}}'
    ).encode()
    decoded = msgspec.json.decode(raw)
    assert splice_body(in_pieces(raw), decoded, {**decoded, "model": "org/vision"}) is None


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
