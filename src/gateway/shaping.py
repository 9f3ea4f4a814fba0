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
4. What OpenAI-style providers refuse although the gateway accepts it goes:
   a null in a field the schema does not mark nullable (``"tools": null``), an
   empty ``tools`` or ``functions`` (OpenAI clients send ``"tools": []`` by
   default), and ``tool_choice`` / ``parallel_tool_calls`` / ``function_call``
   left without tools to choose from.
Unknown fields pass untouched; the client's body itself is never modified (a
plan shapes it once per target).

Down: ``model`` becomes the alias that served; image outputs get a data URI
whose media type matches their bytes (sniffed, not assumed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.images import sniff_base64_image_type
from gateway.snapshot import Target

_encode = msgspec.json.Encoder().encode


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
    for tools, companions in TOOL_COMPANIONS.items():
        if tools in shaped and shaped[tools] == []:
            del shaped[tools]
        if tools not in shaped:
            for companion in companions:
                shaped.pop(companion, None)
    return shaped


def upstream_body(body: Mapping[str, Any], target: Target) -> bytes:
    """The request for ``target``, encoded."""
    return _encode(shape_upstream(body, target))


def message_images(answer: Mapping[str, Any]) -> list[Any]:
    """``choices[*].message.images`` of a completion, flattened (empty when none)."""
    found: list[Any] = []
    choices = answer.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            images = message.get("images") if isinstance(message, dict) else None
            if isinstance(images, list):
                found.extend(images)
    return found


def fix_image_uri(url: str) -> str:
    """Make an image output a ``data:image/<type>;base64,`` URI naming the type its bytes really are.

    Providers label images loosely (a PNG sent as ``image/jpeg``, bare base64
    without a ``data:`` head); the bytes decide. A URI whose bytes are no known
    image type is left as it is.
    """
    head, sep, payload = url.partition(",")
    if not sep:
        # Bare base64 (no "data:" head): wrap it when its bytes are an image.
        sniffed = sniff_base64_image_type(url[:64]) if not url.startswith(("data:", "http:", "https:")) else None
        return f"data:image/{sniffed};base64,{url}" if sniffed else url
    if not head.startswith("data:") or ";base64" not in head:
        return url
    sniffed = sniff_base64_image_type(payload[:64])
    if sniffed is None:
        return url
    want = f"data:image/{sniffed};base64"
    return url if head == want else f"{want},{payload}"


def fix_images(images: list[Any]) -> None:
    """Fix each ``{"image_url": {"url": ...}}`` in place (a bare string ``image_url`` becomes that shape)."""
    for image in images:
        if not isinstance(image, dict):
            continue
        image_url = image.get("image_url")
        if isinstance(image_url, str):
            image["image_url"] = image_url = {"url": image_url}
        if isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
            image_url["url"] = fix_image_uri(image_url["url"])


def client_body(answer: dict[str, Any], served_alias: str) -> bytes:
    """The client's answer: the upstream's body with ``model`` = the alias that served and fixed images."""
    answer["model"] = served_alias
    fix_images(message_images(answer))
    return _encode(answer)


def encode(value: Any) -> bytes:
    return _encode(value)
