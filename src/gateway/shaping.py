"""Shape bodies on the way up (alias → upstream request) and down (upstream → client).

Up (``upstream_body``), from the alias's entry, in this order:
1. ``model`` becomes the backend's id.
2. ``rename`` moves fields to the names the provider wants (``max_tokens`` →
   ``max_completion_tokens``); all renames at once, so a swap works. When the
   client sent both names, its value under the provider's name wins and the
   other is dropped: the provider does not know it.
3. ``params`` are merged in where the client did not set the field (a null is
   "not set", SPEC §2); a table merges key by key into the client's object, the
   client's keys winning. A param written under a renamed name lands under the
   provider's name.
4. What OpenAI-style providers refuse although the gateway accepts it goes, or
   is written as they take it (an integer field's ``200.0`` as ``200``):
   a null in a field the schema does not mark nullable (``"tools": null``), an
   empty ``tools`` or ``functions`` (OpenAI clients send ``"tools": []`` by
   default), and ``tool_choice`` / ``parallel_tool_calls`` / ``function_call``
   left without tools to choose from.
Unknown fields pass untouched; the client's body itself is never modified (a
plan shapes it once per target).

Down: ``model`` becomes the alias that served; image outputs get a data URI
whose media type matches their bytes (sniffed, not assumed). An answer holding
an escaped half of a UTF-16 pair (``"\\ud83d"``: text cut inside an emoji, as
JavaScript slicing does) is read and written the way the openai SDK's own JSON
reader takes it, not dropped: msgspec refuses what Python's ``json`` reads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from gateway.chunks import Chunks, RawString
from gateway.errors import nested_too_deeply
from gateway.facts import FIELD_TYPES, INTEGER
from gateway.h1 import RequestBody
from gateway.images import sniff_base64_image_type
from gateway.snapshot import Target


def _verbatim(value: Any) -> msgspec.Raw:
    """A string left undecoded in a large body (``gateway.bulk``) goes out as its own bytes."""
    if type(value) is RawString:
        return value.as_raw()
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_encode = msgspec.json.Encoder(enc_hook=_verbatim).encode


# Known request fields of JSON type integer (an integral float like 200.0 passed the checks).
INTEGER_FIELDS = tuple(field for field, kinds in FIELD_TYPES.items() if kinds == (INTEGER,))
# Known request fields the OpenAI schema does not mark nullable: a null there is dropped.
NOT_NULLABLE = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format")
# Fields that only mean something next to a non-empty list of tools (or functions).
TOOL_COMPANIONS = {"tools": ("tool_choice", "parallel_tool_calls"), "functions": ("function_call",)}


def _merged(client: Any, param: Any) -> Any:
    """The client's value with ``param`` filling what it leaves unset (tables key by key)."""
    if client is None:
        return param
    if isinstance(client, dict) and isinstance(param, Mapping):
        out = dict(client)
        for key, value in param.items():
            out[key] = _merged(out.get(key), value)
        return out
    return client


def shape_upstream(body: Mapping[str, Any], target: Target) -> dict[str, Any]:
    """The request for ``target`` as a dict (see the module docstring, "Up")."""
    shaped = dict(body)
    shaped["model"] = target.model
    moved = {new: shaped.pop(old) for old, new in target.rename.items() if old in shaped}
    for new, value in moved.items():
        if shaped.get(new) is None:
            shaped[new] = value
    for key, value in target.params.items():
        key = target.rename.get(key, key)
        shaped[key] = _merged(shaped.get(key), value)
    for field in NOT_NULLABLE:
        if field in shaped and shaped[field] is None:
            del shaped[field]
    for field in INTEGER_FIELDS:
        value = shaped.get(field)
        if type(value) is float:
            # 200.0 is a JSON Schema integer, so it passed; some providers refuse a decimal point there.
            shaped[field] = int(value)
    for tools, companions in TOOL_COMPANIONS.items():
        if tools in shaped and shaped[tools] == []:
            del shaped[tools]
        if tools not in shaped:
            for companion in companions:
                shaped.pop(companion, None)
    return shaped


def asks_for_image(body: Mapping[str, Any], target: Target) -> bool:
    """Whether the request ``target`` gets asks it for an image: unless the ``modalities`` it is
    sent (merged as ``shape_upstream`` merges it) is a list without "image". A client may ask an
    image model for text only."""
    modalities = _merged(body.get("modalities"), target.params.get("modalities"))
    return not isinstance(modalities, list) or "image" in modalities


# A body with more strings than this is re-encoded: walking it would cost more than encoding.
SPLICE_MAX_STRINGS = 64
_BACKSLASH, _COLON, _COMMA = 0x5C, 0x3A, 0x2C
_JSON_SPACE = b" \t\r\n"


class KeptBody(NamedTuple):
    """The JSON a large body was decoded from, kept to splice into (``upstream_body``)."""

    raw: Chunks
    # Strings already found in ``raw``, each known to be one whole string token:
    # opening quote -> closing quote (``bulk``'s image URIs). ``top_level_spans``
    # crosses them without searching for their end, a pass over megabytes.
    strings: Mapping[int, int] | None = None


def upstream_body(body: Mapping[str, Any], target: Target, kept: KeptBody | None = None) -> RequestBody:
    """The request for ``target``, encoded.

    ``kept`` holds the JSON ``body`` was decoded from, when it is worth keeping
    (an image of many megabytes). Shaping changes top-level fields only, so the
    upstream body is then that JSON's own bytes for every value shaping kept,
    and new JSON only for the few it changed or added (``splice_body``): no
    re-encoding of the image (about 1 ms per 4 MB) and no copy of it.
    """
    shaped = shape_upstream(body, target)
    try:
        if kept is not None:
            spliced = splice_body(kept.raw, body, shaped, kept.strings)
            if spliced is not None:
                return spliced
        return _encode(shaped)
    except RecursionError:
        # Written from deeper in the stack than it was read: a body just under the reading limit.
        raise nested_too_deeply() from None


# A kept value at least this long is sent as a view of the raw body; shorter ones are copied
# into the pieces around them, so that a body goes out in a few pieces, not one per field.
_VIEW_MIN_BYTES = 64 * 1024


def splice_body(
    raw: Chunks, body: Mapping[str, Any], shaped: Mapping[str, Any], strings: Mapping[int, int] | None = None
) -> tuple[bytes | memoryview, ...] | None:
    """``shaped`` as JSON pieces: ``raw``'s bytes for each value that ``body`` and ``shaped`` share.

    ``body`` is what ``raw`` decodes to; ``shaped`` is ``body`` with top-level
    fields changed, added or dropped, the kept ones being the very same
    objects. None when ``raw``'s top level cannot be mapped with certainty
    (``top_level_spans``, which crosses the known ``strings``); the caller then
    encodes ``shaped`` instead.
    """
    spans = top_level_spans(raw, strings, keys=keys_in(body))
    if spans is None or spans.keys() != body.keys():
        return None
    pieces: list[bytes | memoryview] = []
    pending = bytearray(b"{")
    for index, (key, value) in enumerate(shaped.items()):
        if index:
            pending += b","
        pending += _encode(key) + b":"
        span = spans.get(key)
        if span is None or body[key] is not value:
            pending += _encode(value)
        elif span[1] - span[0] < _VIEW_MIN_BYTES:
            pending += raw.slice(*span)
        else:
            pieces += (bytes(pending), *raw.views(*span))
            pending = bytearray()
    pending += b"}"
    pieces.append(bytes(pending))
    return tuple(pieces)


def keys_in(value: Any) -> int:
    """How many object keys ``value`` holds, at every depth."""
    count, pending = 0, [value]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            count += len(item)
            pending += item.values()
        elif type(item) is list:
            pending += item
    return count


def top_level_spans(
    raw: Chunks, strings: Mapping[int, int] | None = None, *, keys: int | None = None
) -> dict[str, tuple[int, int]] | None:
    """Where each top-level field's value lies in ``raw`` (a JSON object), or None if unsure.

    It walks the JSON from string to string (``find`` of the next quote: a
    megabytes-long image string is crossed in one ``memchr``), counting the
    brackets between strings, so it knows each key's depth; a value ends at
    the comma before the next top-level key, or at the closing brace. None
    when a top-level key is repeated or escaped (a decoder's choice, or a key
    spelled otherwise than it reads), or when the body has over
    ``SPLICE_MAX_STRINGS`` strings (walking it would cost more than encoding).
    ``strings`` maps the opening quote of strings known to be whole tokens to
    their closing quote: those are crossed without a search. ``keys``, when
    given, is how many object keys ``raw`` decoded to: a body holding more
    repeats a key somewhere (the decoder kept only its last value, and that is
    what was checked), so its raw values cannot be trusted to say the same.
    """
    depth = 0
    at = 0
    found_keys = 0  # at every depth
    top: list[tuple[str, int, int]] = []  # each top-level key, its opening quote, where its value starts
    for _ in range(SPLICE_MAX_STRINGS):
        start = raw.find(b'"', at)
        if start < 0:
            break
        between = raw.slice(at, start)
        depth += between.count(b"{") + between.count(b"[") - between.count(b"}") - between.count(b"]")
        known_end = strings.get(start) if strings else None
        if known_end is not None:
            end = known_end
        else:
            end = start
            while True:
                end = raw.find(b'"', end + 1)
                if end < 0:
                    return None
                slashes = 0
                while raw.byte(end - 1 - slashes) == _BACKSLASH:
                    slashes += 1
                if slashes % 2 == 0:
                    break
        at = end + 1
        value_at = _after_colon(raw, at)
        if value_at < 0:
            continue  # a value, not a key
        found_keys += 1
        if depth != 1:
            continue
        key = raw.slice(start + 1, end)
        if b"\\" in key:
            return None
        top.append((key.decode(), start, value_at))
    else:
        if raw.find(b'"', at) >= 0:
            return None
    if keys is not None and found_keys != keys:
        return None
    spans: dict[str, tuple[int, int]] = {}
    closing = raw.rfind(b"}")
    for index, (name, _, value_at) in enumerate(top):
        boundary = top[index + 1][1] if index + 1 < len(top) else closing
        value_end = before_space(raw, boundary)
        if index + 1 < len(top):
            if raw.byte(value_end - 1) != _COMMA:
                return None
            value_end = before_space(raw, value_end - 1)
        if name in spans or value_end <= value_at:
            return None
        spans[name] = (value_at, value_end)
    return spans


def before_space(raw: Chunks, at: int) -> int:
    """``at`` moved back over JSON whitespace (the end of what precedes it)."""
    while at > 0 and raw.byte(at - 1) in _JSON_SPACE:
        at -= 1
    return at


def _after_colon(raw: Chunks, at: int) -> int:
    """Where the value starts after a key ending before ``at`` (-1 when no colon follows)."""
    size = len(raw)
    while at < size and raw.byte(at) in _JSON_SPACE:
        at += 1
    if at >= size or raw.byte(at) != _COLON:
        return -1
    at += 1
    while at < size and raw.byte(at) in _JSON_SPACE:
        at += 1
    return at


def choices_of(answer: Mapping[str, Any]) -> list[Any]:
    """An answer's or a stream event's ``choices``; an upstream's anything-but-a-list holds none."""
    choices = answer.get("choices")
    return choices if isinstance(choices, list) else []


def message_images(answer: Mapping[str, Any]) -> list[Any]:
    """``choices[*].message.images`` of a completion, each put in the contract's shape (``fix_images``),
    flattened (empty when none)."""
    found: list[Any] = []
    for choice in choices_of(answer):
        message = choice.get("message") if isinstance(choice, dict) else None
        images = message.get("images") if isinstance(message, dict) else None
        if isinstance(images, list):
            fix_images(images)
            found.extend(images)
    return found


def gather_content_images(answer: Mapping[str, Any]) -> None:
    """Add each image a message holds as a content part to its ``images``: the one place SPEC §6
    names for image output (an image model's answer, once)."""
    for choice in choices_of(answer):
        if isinstance(choice, dict):
            gather_part_images(choice.get("message"))


def gather_part_images(message: Any) -> None:
    """Add the ``image_url`` parts of a message's content (or a stream delta's) to its ``images``."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return
    images = message.get("images")
    held = images if isinstance(images, list) else []
    # Not twice: an answer relayed in another form (gateway.answer_forms) was gathered already.
    parts = [dict(part) for part in content if isinstance(part, dict) and part.get("type") == "image_url" and part not in held]
    if parts:
        message["images"] = [*held, *parts]


def fix_image_uri(url: str) -> str:
    """Make an image output a ``data:image/<type>;base64,`` URI naming the type its bytes really are.

    Providers label images loosely (a PNG sent as ``image/jpeg``, bare base64
    without a ``data:`` head, ``DATA:``); the bytes decide. A URI whose bytes are
    no known image type is left as it is.
    """
    # Found, not partitioned: an image's payload runs to megabytes, and only 64 characters are read.
    comma = url.find(",")
    if comma < 0:
        # Bare base64 (no "data:" head): wrap it when its bytes are an image.
        sniffed = sniff_base64_image_type(url[:64]) if not url[:6].lower().startswith(("data:", "http:", "https:")) else None
        return f"data:image/{sniffed};base64,{url}" if sniffed else url
    head = url[:comma]
    lowered = head.lower()
    if not lowered.startswith("data:") or ";base64" not in lowered:
        return url
    sniffed = sniff_base64_image_type(url[comma + 1 : comma + 65])
    if sniffed is None:
        return url
    want = f"data:image/{sniffed};base64"
    return url if head == want else want + url[comma:]


def fix_images(images: list[Any]) -> None:
    """Put each image output in the contract's shape, ``{"type": "image_url", "image_url": {"url": ...}}``
    with the sniffed type, in place. Besides that shape (its ``image_url`` may be a bare string),
    providers send ``{"url": ...}``, ``{"b64_json": ...}`` or a bare string: those take the shape when
    they hold an image; anything else is left as it is."""
    for index, image in enumerate(images):
        if isinstance(image, str):
            url = fix_image_uri(image)
            if is_image_uri(url):
                images[index] = {"type": "image_url", "image_url": {"url": url}}
            continue
        if not isinstance(image, dict):
            continue
        image_url = image.get("image_url")
        if image_url is None:
            loose = next((image[key] for key in ("url", "b64_json") if isinstance(image.get(key), str)), None)
            if loose is not None and is_image_uri(url := fix_image_uri(loose)):
                for key in ("url", "b64_json"):
                    image.pop(key, None)
                image.setdefault("type", "image_url")
                image["image_url"] = {"url": url}
            continue
        if isinstance(image_url, str):
            image["image_url"] = image_url = {"url": image_url}
        if isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
            image_url["url"] = fix_image_uri(image_url["url"])


def is_image_uri(url: str) -> bool:
    """Whether an image output URI, fixed (``fix_image_uri``), is a data URI of image bytes."""
    comma = url.find(",")
    if comma < 0 or not url.startswith("data:image/"):
        return False
    sniffed = sniff_base64_image_type(url[comma + 1 : comma + 65])
    return sniffed is not None and url[:comma] == f"data:image/{sniffed};base64"


def holds_image(images: list[Any]) -> bool:
    """Whether fixed image outputs (``fix_images``) hold one image a client can use: a data URI of
    image bytes. A URL (the gateway never fetches one), an empty entry or text labelled as an image
    is no image: the plan moves on as for an answer without one."""
    for image in images:
        image_url = image.get("image_url") if isinstance(image, dict) else None
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if isinstance(url, str) and is_image_uri(url):
            return True
    return False


def client_body(answer: dict[str, Any], served_alias: str) -> bytes:
    """The client's answer: the upstream's body with ``model`` = the alias that served and fixed images."""
    answer["model"] = served_alias
    message_images(answer)  # puts them in the contract's shape
    return encode(answer)


def encode(value: Any) -> bytes:
    try:
        return _encode(value)
    except UnicodeEncodeError:
        # A lone surrogate (see decode_answer) has no UTF-8: written escaped, as it came.
        return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


_msgspec_decode = msgspec.json.Decoder().decode
_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is beyond a 64-bit float")
    return value


def decode_answer(raw: bytes) -> Any:
    """An upstream's JSON (an answer, a stream event); ``msgspec.DecodeError`` if it is none.

    Read as the openai SDK reads it, within what can be written again: a byte-order
    mark before it is dropped, and a lone UTF-16 surrogate escape kept. A number
    beyond a 64-bit float has no JSON to be written as: such an answer is none.
    """
    try:
        return _msgspec_decode(raw)
    except msgspec.DecodeError:
        if raw.startswith(_BOM):
            return decode_answer(raw[len(_BOM) :])
        if _SURROGATE_ESCAPE.search(raw) is None:
            raise
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as exc:
        raise msgspec.DecodeError(str(exc)) from None
