"""Shape bodies on the way up (alias → upstream request) and down (upstream → client).

Up: the client's body with ``model`` set to the backend's id, the alias's
``rename`` applied (e.g. ``max_tokens`` → ``max_completion_tokens``), its
``params`` added where the client did not set them, and an empty ``tools``
array dropped (with its ``tool_choice``): several providers refuse
``"tools": []`` that OpenAI clients send by default. Unknown fields pass.

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


def upstream_body(body: Mapping[str, Any], target: Target) -> bytes:
    shaped = dict(body)
    shaped["model"] = target.model
    for old, new in target.rename.items():
        if old in shaped and new not in shaped:
            shaped[new] = shaped.pop(old)
    for key, value in target.params.items():
        shaped.setdefault(key, value)
    if shaped.get("tools") == []:
        del shaped["tools"]
        shaped.pop("tool_choice", None)
    return _encode(shaped)


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
    """Make ``data:image/<type>;base64,`` name the type its bytes really are."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or ";base64" not in head:
        return url
    sniffed = sniff_base64_image_type(payload[:64])
    if sniffed is None:
        return url
    return f"data:image/{sniffed};base64,{payload}" if head != f"data:image/{sniffed};base64" else url


def fix_images(images: list[Any]) -> None:
    for image in images:
        image_url = image.get("image_url") if isinstance(image, dict) else None
        if isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
            image_url["url"] = fix_image_uri(image_url["url"])


def client_body(answer: dict[str, Any], served_alias: str) -> bytes:
    answer["model"] = served_alias
    fix_images(message_images(answer))
    return _encode(answer)


def encode(value: Any) -> bytes:
    return _encode(value)
