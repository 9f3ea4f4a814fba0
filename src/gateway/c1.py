"""The ``/c1/chat`` shortcut: rebuild its body into a Chat Completions body, and map locations back.

A c1 body is a chat body whose conversation is given by a few top-level fields
instead of ``messages``:

- ``message`` (required): the new user turn, a string or an array of OpenAI
  content parts (for several texts and images in one turn);
- ``images`` (optional): images appended to that turn, each ``{"url": "data:..."}``
  (its other keys, such as ``detail``, are kept) or, for convenience, the bare
  data-URI string;
- ``system`` (optional): a string or text-parts array, sent as a first system message;
- ``messages`` (optional): prior turns, OpenAI messages as sent to ``/v1/chat/completions``.

Every other field (``model``, ``tools``, ``stream``, ``max_tokens``, unknown ones)
passes through untouched. How it works:

1. ``rebuild_chat_body`` checks those four fields' types (errors point into the c1
   body) and builds ``messages = [system?] + messages + [user]``, where the user
   content is the string message itself when there are no images, else the
   parts ``[text part (unless empty) | the message's parts..., image_url parts...]``;
2. it also returns a ``C1Layout`` recording where each rebuilt piece came from;
3. ``C1Layout.relocate`` maps a location in the rebuilt chat body (where every
   rule of ``/v1/chat/completions`` found its violation) back into the c1 body,
   then trims it to the deepest location that exists there: a piece with no
   counterpart (the ``image_url`` wrapper of a bare-string image, say) points at
   its nearest existing ancestor. A missing field (``model``, ``message``) has
   no place in the body: its location is null, as on ``/v1/chat/completions``.

Everything here is pure: no I/O, so the whole mapping is tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import attrs
import msgspec

from gateway.errors import GatewayError, Location, json_type_name

# The fields the rebuild consumes; everything else passes through to the chat body.
C1_FIELDS = frozenset({"message", "images", "system", "messages"})

_DATA_URI_EXAMPLE = "data:image/jpeg;base64,..."


@attrs.frozen
class C1Layout:
    """Where the pieces of a rebuilt chat body came from in the c1 body."""

    source: Mapping[str, Any]  # the c1 body as sent, read to trim locations to what exists
    has_system: bool
    history: int  # prior messages copied from the c1 ``messages``
    message_parts: int | None  # None: ``message`` was a string
    text_part: bool  # a string ``message`` became a text part before the images
    image_is_object: tuple[bool, ...]  # per ``images[i]``: an object (True) or a bare string

    def relocate(self, at: Location) -> Location:
        """A location in the rebuilt chat body → the location in the c1 body it came from."""
        return _existing(self.source, self._map(at))

    def _map(self, at: Location) -> Location:
        if not at or at[0] != "messages":
            return at  # a passed-through field sits at the same place in both bodies
        if len(at) == 1:
            # The whole conversation (e.g. too long for the context window).
            return ("messages",) if self.history else ("message",)
        index, rest = at[1], at[2:]
        if self.has_system and index == 0:
            return ("system", *rest[1:]) if rest[:1] == ("content",) else ("system",)
        first_prior = int(self.has_system)
        if isinstance(index, int) and 0 <= index - first_prior < self.history:
            return ("messages", index - first_prior, *rest)
        return self._in_user_turn(rest)

    def _in_user_turn(self, rest: Location) -> Location:
        if rest[:1] != ("content",) or len(rest) < 2 or not isinstance(rest[1], int):
            return ("message",)
        part, tail = rest[1], rest[2:]
        # Before the image parts: the text part made from a string message, or the message's own parts.
        leading = int(self.text_part) if self.message_parts is None else self.message_parts
        if part < leading:
            return ("message",) if self.message_parts is None else ("message", part, *tail)
        return self._in_image(part - leading, tail)

    def _in_image(self, i: int, tail: Location) -> Location:
        if not 0 <= i < len(self.image_is_object):
            return ("images",)
        # An object's keys are the rebuilt part's ``image_url`` keys; a bare string is its ``url``.
        if self.image_is_object[i] and tail[:1] == ("image_url",):
            return ("images", i, *tail[1:])
        return ("images", i)


def _existing(body: Any, at: Location) -> Location:
    """The longest prefix of ``at`` that exists in ``body`` (never shorter than one key)."""
    node = body
    for depth, key in enumerate(at):
        if isinstance(key, int) and type(node) is list and 0 <= key < len(node):
            node = node[key]
        elif isinstance(key, str) and type(node) is dict and key in node:
            node = node[key]
        else:
            return at[: max(depth, 1)]
    return at


@attrs.frozen
class Rebuilt:
    """A c1 body rebuilt as a chat body, and where its pieces came from."""

    body: dict[str, Any]
    layout: C1Layout


def _invalid(at: Location, message: str) -> GatewayError:
    return GatewayError("invalid_request", message, at=at)


def _image_part(i: int, image: Any) -> dict[str, Any]:
    if type(image) is str:
        return {"type": "image_url", "image_url": {"url": image}}
    if type(image) is not dict:
        raise _invalid(
            ("images", i),
            f'each image must be {{"url": "{_DATA_URI_EXAMPLE}"}} or that data URI string, got {json_type_name(image)}',
        )
    if "url" not in image:
        raise _invalid(("images", i), f'an image needs `url`: a base64 data URI such as "{_DATA_URI_EXAMPLE}"')
    return {"type": "image_url", "image_url": dict(image)}


def _images(body: Mapping[str, Any]) -> Sequence[Any]:
    images = body.get("images")
    if images is None:
        return ()
    if type(images) is not list:
        raise _invalid(
            ("images",), f'`images` must be an array of {{"url": "{_DATA_URI_EXAMPLE}"}}, got {json_type_name(images)}'
        )
    return images


def _message(body: Mapping[str, Any]) -> str | list[Any]:
    message = body.get("message")
    if message is None:
        # Absent, it has no place in the body to point at (SPEC §4); a null has one.
        at: Location = ("message",) if "message" in body else ()
        raise _invalid(at, "`message` is required: the prompt as a string, or an array of content parts")
    if type(message) is not str and type(message) is not list:
        raise _invalid(
            ("message",), f"`message` must be a string or an array of content parts, got {json_type_name(message)}"
        )
    return message


def _user_content(message: str | list[Any], image_parts: list[dict[str, Any]]) -> str | list[Any]:
    if type(message) is str:
        if not image_parts:
            return message  # text alone stays a string: some text-only servers refuse a parts array
        # An empty text part is dropped: some providers (Anthropic) refuse empty text blocks.
        return [{"type": "text", "text": message}, *image_parts] if message else image_parts
    if not message and not image_parts:
        raise _invalid(("message",), "`message` is an empty array and there are no `images`: send at least one part")
    return [*message, *image_parts]


def rebuild_chat_body(body: Any) -> Rebuilt:
    """Rebuild a decoded c1 body as a Chat Completions body, or raise ``GatewayError`` located in the c1 body."""
    if type(body) is not dict:
        raise _invalid((), f"the body must be a JSON object, got {json_type_name(body)}")
    message = _message(body)
    images = _images(body)
    image_parts = [_image_part(i, image) for i, image in enumerate(images)]
    content = _user_content(message, image_parts)

    system = body.get("system")
    if system is not None and type(system) not in (str, list):
        raise _invalid(("system",), f"`system` must be a string or an array of text parts, got {json_type_name(system)}")
    history = body.get("messages")
    if history is None:
        history = []
    elif type(history) is not list:
        raise _invalid(
            ("messages",), f"`messages` (the prior turns) must be an array of messages, got {json_type_name(history)}"
        )

    messages: list[Any] = [{"role": "system", "content": system}] if system is not None else []
    messages.extend(history)
    messages.append({"role": "user", "content": content})
    chat = {key: value for key, value in body.items() if key not in C1_FIELDS}
    chat["messages"] = messages
    layout = C1Layout(
        source=body,
        has_system=system is not None,
        history=len(history),
        message_parts=len(message) if type(message) is list else None,
        text_part=type(message) is str and bool(message) and bool(image_parts),
        image_is_object=tuple(type(image) is dict for image in images),
    )
    return Rebuilt(chat, layout)


def translate_c1(body: Any) -> tuple[dict[str, Any], Callable[[Location], Location | None]]:
    """The ``Translator`` of ``/c1/chat`` for ``CompletionService.handle``."""
    rebuilt = rebuild_chat_body(body)
    return rebuilt.body, rebuilt.layout.relocate


# --- the documented shape (for the OpenAPI document only: bodies are never decoded into these,
# since a gateway forwards the fields it does not know) ---------------------------------------

ContentPart = Annotated[
    dict[str, Any],
    msgspec.Meta(
        description='An OpenAI content part: {"type": "text", "text": ...} or '
        '{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}.'
    ),
]


class C1Image(msgspec.Struct):
    """One image of ``images`` (a bare data-URI string is accepted too)."""

    url: Annotated[
        str,
        msgspec.Meta(
            description="A base64 data URI; other URLs are refused (image_url_not_supported).",
            examples=[_DATA_URI_EXAMPLE],
        ),
    ]
    detail: Annotated[str | None, msgspec.Meta(description="Passed to the upstream as image_url.detail.")] = None


class C1ChatRequest(msgspec.Struct):
    """The body of ``POST /c1/chat``; unknown fields pass through to the upstream."""

    model: Annotated[str, msgspec.Meta(description="An alias (GET /v1/models).")]
    message: Annotated[
        str | list[ContentPart],
        msgspec.Meta(description="The user's turn: a string, or an array of content parts for fine control."),
    ]
    images: Annotated[
        list[C1Image | str] | None,
        msgspec.Meta(description="Images appended to the user's turn, in order, as image_url parts."),
    ] = None
    system: Annotated[
        str | list[ContentPart] | None, msgspec.Meta(description="A system prompt, sent as the first message.")
    ] = None
    messages: Annotated[
        list[dict[str, Any]] | None,
        msgspec.Meta(description="Prior turns (OpenAI messages), sent after `system` and before the new user turn."),
    ] = None
    stream: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
