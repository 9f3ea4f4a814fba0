"""Decode a large chat body without making its image data URIs into ``str``.

A 4 MB image arrives as a 5.3 MB JSON body, and decoding that body spends
nearly all its time (1.3 ms) and memory (5.3 MB) on one value: the data URI,
which the gateway only checks and then forwards as the bytes it came in. So
``decode_leaving_uris`` finds each large ``"url": "data:..."`` string in the
raw body and decodes the body around it: that value becomes a
``chunks.RawString``: where its JSON bytes (quotes included) lie in the body's
pieces, never copied. ``images.inspect_image_url`` checks such a value in
place, and ``shaping.encode`` writes it back out verbatim, so a body
re-encoded for an upstream is still the client's.

This path only ever says yes. ``inspect_in_place`` returns the body and its
facts when every raw value is a valid image and the body passes inspection;
for anything else it returns None and the caller decodes the body as usual, so
every refusal, and every answer, is the one the ordinary path would give.

Why leaving a string out cannot change what the body means: a value is left
raw only when, walking back from its opening quote over whitespace, there is a
':' and before it the key ``"url"``; it runs to the next quote. A placeholder
carries a random token, so a client cannot write one, and it is put back only
where an image URL belongs (``messages[i].content[j].image_url.url`` of an
``image_url`` part): if any placeholder is found elsewhere, or not at all, the
body is decoded as usual. Inspection then walks every such part, and accepts a
raw value only if it is a valid image URL: a header of plain ASCII without a
backslash, then strict base64. So in a body this path accepts, no backslash
lies between the quotes of a raw value: in valid JSON each is then one string
token whose closing quote is the next quote, and the placeholder put in its
place is another string token, so the rest decoded exactly as before (in
invalid JSON the same tokens stay invalid around the placeholder). A value
holding a backslash, whose next quote may be an escaped one, is never
accepted, so nothing decoded around it is ever used. Leaving that to
inspection, rather than scanning each value for a backslash first, saves a
pass over every large image.
"""

from __future__ import annotations

import secrets
from typing import Any, Final, NamedTuple

import msgspec

from gateway.chunks import Chunks, RawString
from gateway.errors import GatewayError
from gateway.facts import RequestFacts, inspect_request
from gateway.images import RawImageDeclined
from gateway.shaping import before_space

__all__ = ["LARGE_URI_BYTES", "InPlace", "decode_leaving_uris", "inspect_in_place"]

# Below this a string costs less to decode than to find and check.
LARGE_URI_BYTES: Final[int] = 1 << 16
# More images than any alias takes; a body with more decodes as usual.
MAX_RAW_VALUES: Final[int] = 64

_decode = msgspec.json.Decoder().decode


class InPlace(NamedTuple):
    """A body decoded in place: the body, its facts, and where its raw values lie in the JSON."""

    body: dict[str, Any]
    facts: RequestFacts
    # Opening quote -> closing quote of each value left raw: accepted, so each is
    # one whole string token (``shaping.top_level_spans`` crosses them unsearched).
    strings: dict[int, int]


def inspect_in_place(raw: Chunks) -> InPlace | None:
    """The body, with its large image URIs left raw, and its facts; or None.

    None means: decode ``raw`` as usual and inspect that. It is the answer for
    a body with no large image URI, and for any body that the ordinary path
    might answer differently (one it would refuse, above all).
    """
    decoded = decode_leaving_uris(raw)
    if decoded is None:
        return None
    body, spans = decoded
    try:
        return InPlace(body, inspect_request(body), dict(spans))
    except (GatewayError, RawImageDeclined):
        return None


def decode_leaving_uris(raw: Chunks) -> tuple[dict[str, Any], list[tuple[int, int]]] | None:
    """``raw`` decoded with each large image data URI as a ``RawString``, and those values' spans; or None.

    A span is a value's two quotes' offsets in ``raw``. None when there is no
    such URI, or when the body cannot be decoded that way with certainty (see
    the module docstring); then decode it as usual.
    """
    spans = _uri_spans(raw)
    if not spans:
        return None
    token = secrets.token_hex(8)
    pieces: list[bytes | memoryview] = []
    raws: dict[str, RawString] = {}
    done = 0
    for opening, closing in spans:
        placeholder = f"\x00{token}:{len(raws)}"
        raws[placeholder] = RawString(raw, opening, closing + 1)
        pieces += (*raw.views(done, opening), msgspec.json.encode(placeholder))
        done = closing + 1
    pieces += raw.views(done, len(raw))
    try:
        body = _decode(b"".join(pieces))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None  # the whole-body decode says what is wrong
    if type(body) is not dict or _put_back(body, raws) != len(raws):
        return None
    return body, spans


def _uri_spans(raw: Chunks) -> list[tuple[int, int]]:
    """Where each large ``"url": "data:..."`` string lies: its two quotes' offsets."""
    spans: list[tuple[int, int]] = []
    at = raw.find(b'"data:')
    while at >= 0 and len(spans) < MAX_RAW_VALUES:
        closing = raw.find(b'"', at + 1)
        if closing < 0:
            break
        # No scan for a backslash: inspection refuses a value holding one (module docstring).
        if closing - at > LARGE_URI_BYTES and _is_url_value(raw, at):
            spans.append((at, closing))
            at = raw.find(b'"data:', closing + 1)
        else:
            at = raw.find(b'"data:', at + 1)
    return spans


def _is_url_value(raw: Chunks, opening: int) -> bool:
    """Whether the string opening at ``opening`` follows ``"url"`` and a colon."""
    colon = before_space(raw, opening) - 1
    if colon < 0 or raw.byte(colon) != 0x3A:  # ':'
        return False
    key_end = before_space(raw, colon)
    return key_end >= 5 and raw.slice(key_end - 5, key_end) == b'"url"'


def _put_back(body: dict[str, Any], raws: dict[str, RawString]) -> int:
    """Put each raw value where its placeholder is, among the image URLs; how many were found."""
    found = 0
    messages = body.get("messages")
    if type(messages) is not list:
        return 0
    for message in messages:
        content = message.get("content") if type(message) is dict else None
        if type(content) is not list:
            continue
        for part in content:
            # Only in image parts, which inspection checks one by one: a raw value
            # anywhere else would go out unchecked, though it might not be JSON.
            if type(part) is not dict or part.get("type") != "image_url":
                continue
            image_url = part.get("image_url")
            if type(image_url) is not dict:
                continue
            url = image_url.get("url")
            if type(url) is str and url in raws:
                image_url["url"] = raws[url]
                found += 1
    return found
