"""Decoding a large chat body around its image data URIs (gateway.bulk) gives what the ordinary path gives."""

from __future__ import annotations

import base64
import json
from typing import Any
from unittest import mock

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from conftest import in_pieces, peak_allocation
from gateway import bulk
from gateway.bulk import decode_leaving_uris, inspect_in_place
from gateway.chunks import Chunks, RawString
from gateway.errors import GatewayError
from gateway.facts import RequestFacts, inspect_request
from gateway.shaping import encode, top_level_spans

PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)
JPEG = b"\xff\xd8\xff\xe0" + bytes(40)


def data_uri(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def chat(*parts: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "vision", "messages": [{"role": "user", "content": list(parts)}], **fields}


def image_part(url: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def ordinary(raw: bytes) -> tuple[RequestFacts | str, Any]:
    """What the ordinary path makes of ``raw``: its facts or its error code, and the decoded body."""
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return "invalid_json", None
    try:
        return inspect_request(body), body
    except GatewayError as error:
        return error.code, body


# --- the property -----------------------------------------------------------------

uris = st.one_of(
    st.builds(data_uri, st.sampled_from([PNG, JPEG]).map(lambda head: head + b"\x00" * 30)),
    st.just(data_uri(PNG, "image/jpeg")),  # declared one type, is another
    st.just(data_uri(b"BM" + bytes(60))),  # no known signature
    st.just("data:image/png;base64," + "A" * 65),  # not a multiple of 4
    st.just("data:image/png;base64,AAAA AAAA" + "A" * 40),  # whitespace
    st.just("data:image/pñg;base64," + base64.b64encode(PNG).decode()),  # a non-ASCII header
    st.just("data:image/png;x=\t;base64," + base64.b64encode(PNG).decode()),  # a control character (escaped by json)
    st.just("data:image/png," + "A" * 64),  # not base64
    st.just("data:image/png;base64,"),
    st.just("https://example.com/cat.png"),
)
parts = st.one_of(
    st.builds(image_part, uris),
    st.builds(lambda text: {"type": "text", "text": text}, st.text(max_size=10)),
    st.builds(lambda url: {"type": "text", "text": "see", "image_url": {"url": url}}, uris),  # not an image part
)
extras = st.dictionaries(
    st.sampled_from(["max_tokens", "stream", "url", "temperature", "metadata"]),
    st.one_of(st.integers(0, 500), st.booleans(), uris, st.dictionaries(st.just("url"), uris, max_size=1)),
    max_size=2,
)
layouts = st.sampled_from([
    {"separators": (",", ":")},
    {"separators": (", ", ": ")},
    {"indent": 2},
    {"separators": (" ,", " : "), "ensure_ascii": False},
])


@given(
    messages=st.lists(st.lists(parts, min_size=1, max_size=3), min_size=1, max_size=3),
    fields=extras,
    layout=layouts,
    escape_slashes=st.booleans(),
    raw_control=st.booleans(),
    cuts=st.one_of(st.lists(st.integers(0, 1 << 20), max_size=12), st.just(list(range(1, 4000)))),
)
def test_property_in_place_answers_as_the_ordinary_path_or_not_at_all(
    messages: list[list[dict[str, Any]]],
    fields: dict[str, Any],
    layout: dict[str, Any],
    escape_slashes: bool,
    raw_control: bool,
    cuts: list[int],
) -> None:
    """Whatever the pieces the body came in (a few random cuts, or a byte per piece)."""
    body = {"model": "vision", "messages": [{"role": "user", "content": content} for content in messages], **fields}
    raw = json.dumps(body, **layout).encode()
    if escape_slashes:
        raw = raw.replace(b"/", b"\\/")  # still the same JSON
    if raw_control:
        raw = raw.replace(b"base64,", b"base64,\x01", 1)  # not JSON any more
    expected, decoded = ordinary(raw)
    # Every URI drawn here is over 16 bytes: all of them are "large".
    chunks = in_pieces(raw, cuts)
    with mock.patch.object(bulk, "LARGE_URI_BYTES", 16):
        result = inspect_in_place(chunks)
    if result is None:
        # The path must be taken where nothing stands in its way.
        urls = [part["image_url"]["url"] for content in messages for part in content if "image_url" in part]
        # Each URI's JSON is its own characters (no escapes), and each sits in an image part.
        clean_images = all(url.isascii() and url.isprintable() for url in urls) and all(
            part["type"] == "image_url" for content in messages for part in content if "image_url" in part
        )
        has_image = b'"url"' in raw
        plain = not escape_slashes and "url" not in json.dumps(fields) and clean_images
        assert not (isinstance(expected, RequestFacts) and has_image and plain), "a valid body was not decoded in place"
        return
    in_place, facts, strings = result
    assert facts == expected
    assert msgspec.json.decode(encode(in_place)) == decoded
    raws = [
        part["image_url"]["url"]
        for message in in_place["messages"]
        for part in message["content"]
        if isinstance(part.get("image_url", {}).get("url"), RawString)
    ]
    assert raws
    # Each raw value's span is a whole string token of the body: the splice may cross it unsearched.
    assert sorted(raw[opening : closing + 1] for opening, closing in strings.items()) == sorted(map(bytes, raws))
    assert top_level_spans(chunks, strings) == top_level_spans(chunks) == top_level_spans(Chunks([raw]))


# --- cases ------------------------------------------------------------------------


def test_a_large_image_is_left_as_its_own_bytes() -> None:
    uri = data_uri(PNG + bytes(200_000))
    raw = json.dumps(chat({"type": "text", "text": "what is this?"}, image_part(uri), max_tokens=32)).encode()
    chunks = in_pieces(raw)
    result = inspect_in_place(chunks)
    assert result is not None
    body, facts, strings = result
    url = body["messages"][0]["content"][1]["image_url"]["url"]
    assert [raw[opening : closing + 1] for opening, closing in strings.items()] == [bytes(url)]
    assert isinstance(url, RawString)
    assert len(url.views) == 5  # the 267 KB value lies in five of the 64 KiB pieces, none copied
    assert all(view.obj in chunks.pieces for view in url.views)
    assert bytes(url) == f'"{uri}"'.encode()
    assert facts == inspect_request(msgspec.json.decode(raw))
    assert encode(body) == msgspec.json.encode(msgspec.json.decode(raw))


def test_small_images_decode_as_usual() -> None:
    raw = json.dumps(chat(image_part(data_uri(PNG)))).encode()
    assert decode_leaving_uris(in_pieces(raw)) is None


def test_an_escaped_uri_decodes_as_usual() -> None:
    """A value holding a backslash is never accepted: the ordinary path decodes the body, and accepts it."""
    raw = json.dumps(chat(image_part(data_uri(PNG + bytes(100_000))))).encode().replace(b"/", b"\\/")
    assert b"\\/" in raw
    assert inspect_in_place(in_pieces(raw)) is None
    assert isinstance(ordinary(raw)[0], RequestFacts)


def test_a_uri_holding_an_escaped_quote_is_left_to_the_ordinary_path() -> None:
    """Its next quote is an escaped one, so the span up to it is not the string: the path does not answer."""
    uri = data_uri(PNG + bytes(100_000)) + '"' + "A" * 100
    raw = json.dumps(chat(image_part(uri), max_tokens=5)).encode()
    assert b'\\"' in raw
    assert inspect_in_place(in_pieces(raw)) is None
    assert ordinary(raw)[0] == "invalid_image"


def test_a_url_outside_the_image_parts_decodes_as_usual() -> None:
    uri = data_uri(PNG + bytes(100_000))
    raw = json.dumps(chat(image_part(uri), url=uri)).encode()
    assert decode_leaving_uris(in_pieces(raw)) is None


def test_a_key_ending_in_an_escaped_url_is_not_taken_for_url() -> None:
    uri = data_uri(PNG + bytes(100_000))
    raw = json.dumps(chat({"type": "image_url", "image_url": {'a"url': uri}})).encode()
    assert b'\\"url"' in raw
    assert decode_leaving_uris(in_pieces(raw)) is None


def test_a_bad_large_image_is_left_to_the_ordinary_path() -> None:
    uri = data_uri(PNG + bytes(100_000))
    broken = uri[:-10] + " " + uri[-9:]
    raw = json.dumps(chat(image_part(broken))).encode()
    assert decode_leaving_uris(in_pieces(raw)) is not None  # found, but the image is refused...
    assert inspect_in_place(in_pieces(raw)) is None  # ...so the ordinary path answers
    assert ordinary(raw)[0] == "invalid_image"


def test_a_control_character_in_a_large_uri_is_invalid_json_as_usual() -> None:
    uri = data_uri(PNG + bytes(100_000))
    raw = json.dumps(chat(image_part(uri))).encode().replace(b"base64,", b"base64,\x01", 1)
    assert inspect_in_place(in_pieces(raw)) is None
    assert ordinary(raw)[0] == "invalid_json"


def test_invalid_json_elsewhere_stays_invalid() -> None:
    uri = data_uri(PNG + bytes(100_000))
    raw = json.dumps(chat(image_part(uri))).encode()[:-1]
    assert decode_leaving_uris(in_pieces(raw)) is None


def test_many_images_each_in_place() -> None:
    uris = [data_uri(PNG + bytes(70_000 + i)) for i in range(5)]
    raw = json.dumps(chat(*(image_part(uri) for uri in uris))).encode()
    result = inspect_in_place(in_pieces(raw))
    assert result is not None
    assert [bytes(p["image_url"]["url"]) for p in result[0]["messages"][0]["content"]] == [
        f'"{uri}"'.encode() for uri in uris
    ]
    assert [image.decoded_bytes for image in result[1].images] == [len(PNG) + 70_000 + i for i in range(5)]


def test_a_20_mb_image_is_inspected_with_a_small_peak() -> None:
    raw = json.dumps(chat(image_part(data_uri(PNG + bytes(20 * 1024 * 1024))))).encode()
    results: list[Any] = []
    chunks = in_pieces(raw, size=1 << 20)
    peak = peak_allocation(lambda: results.append(inspect_in_place(chunks)))
    result = results[0]
    assert result is not None
    assert result[1].images[0].decoded_bytes == len(PNG) + 20 * 1024 * 1024
    assert peak < 1024 * 1024, peak


def test_only_a_value_of_a_url_key_is_taken_as_a_uri() -> None:
    """A large data: string is left raw only as the value of "url" (spaces around the colon allowed)."""
    uri = data_uri(PNG + bytes(100_000))
    taken = [b'{"url" : "%s"}', b'{"url":"%s"}', b'{"url"\n:\t"%s"}']
    not_taken = [b'{"text":"%s"}', b'{"xurl":"%s"}', b'["url","%s"]', b'{"url":1,"a":"%s"}']
    for layout in taken + not_taken:
        raw = in_pieces(layout % uri.encode())
        assert bool(bulk._uri_spans(raw)) == (layout in taken), layout
