"""The gateway's exception tree and its error catalog.

Every non-2xx answer the gateway gives is a ``GatewayError`` rendered into the
OpenAI envelope. The catalog below is the single table of every code the
gateway can emit: its HTTP status, its OpenAI error type, what it means and how
to fix it. ``GET /v1/gateway/errors`` serves it and the README renders it.

Exception tree::

    GatewayError                  one error code from CATALOG, with a location
    └── (raised as is everywhere; no subclasses needed: the code is the kind)

A location is a path tuple into the JSON body the client sent, for example
``("messages", 0, "content", 1, "image_url", "url")``; it renders as both the
seed's ``param`` (``messages[0].content[1].image_url.url``) and an RFC 6901
``pointer`` (``/messages/0/content/1/image_url/url``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import attrs

Location = tuple[str | int, ...]


@attrs.frozen
class ErrorKind:
    """One row of the catalog."""

    code: str
    status: int
    type: str
    meaning: str
    fix: str


def _kinds(*rows: tuple[int, str, str, str, str]) -> Mapping[str, ErrorKind]:
    table = {code: ErrorKind(code, status, type_, meaning, fix) for status, code, type_, meaning, fix in rows}
    return MappingProxyType(table)


_REQ = "invalid_request_error"

CATALOG: Mapping[str, ErrorKind] = _kinds(
    (400, "invalid_json", _REQ, "The body is not valid UTF-8 JSON.", "Send a JSON object encoded as UTF-8."),
    (
        400,
        "invalid_request",
        _REQ,
        "The body does not have the shape of the endpoint's request: a field is missing, has the wrong type, or is out of range (a token budget or `n` under 1, a negative `temperature`).",
        "Correct the field named by `param`.",
    ),
    (
        400,
        "image_url_not_supported",
        _REQ,
        "An image URL is not a `data:` URI. The gateway never fetches URLs, and cloud providers would not either.",
        "Encode the image as a base64 data URI: `data:image/jpeg;base64,...`.",
    ),
    (
        400,
        "invalid_image",
        _REQ,
        "A data URI is not base64, does not decode, or its bytes are not the image type it declares.",
        "Send `data:image/<type>;base64,<base64 of the file>` with the file's real type.",
    ),
    (
        400,
        "unsupported_image_type",
        _REQ,
        "The image is of a type the gateway does not accept.",
        "Convert it to JPEG, PNG, WebP or GIF.",
    ),
    (413, "image_too_large", _REQ, "An image is larger than the alias's `max_image_bytes`.", "Downscale or compress it."),
    (400, "too_many_images", _REQ, "The request holds more images than the alias's `max_images`.", "Send fewer images."),
    (
        400,
        "modality_not_supported",
        _REQ,
        "A content part's modality (image, audio, video, file) is not in the alias's `input`, or the request asks for an output modality not in its `output`.",
        "Pick an alias whose `input` (or `output`) lists that modality (see `GET /v1/models`).",
    ),
    (
        400,
        "capability_not_supported",
        _REQ,
        "The request uses a feature (tools, structured output, thinking) the alias does not declare.",
        "Drop the field or pick an alias that has the capability (see `GET /v1/models`).",
    ),
    (
        400,
        "max_tokens_too_small",
        _REQ,
        "`max_tokens` (or `max_completion_tokens`) is below the alias's `min_max_tokens`.",
        "Raise it to at least the alias's minimum.",
    ),
    (
        400,
        "max_tokens_too_large",
        _REQ,
        "`max_tokens` (or `max_completion_tokens`) is above the alias's `max_output_tokens`.",
        "Lower it to at most the alias's maximum.",
    ),
    (
        400,
        "context_length_exceeded",
        _REQ,
        "The messages cannot fit the context window of any target of the alias.",
        "Shorten the conversation or pick an alias with a larger `context_window`.",
    ),
    (400, "stream_not_supported", _REQ, "The alias does not stream.", "Send `\"stream\": false`."),
    (401, "missing_api_key", "authentication_error", "No `Authorization: Bearer` key was sent.", "Send your key."),
    (401, "invalid_api_key", "authentication_error", "The key is not known or was revoked.", "Check the key."),
    (
        401,
        "no_api_keys_configured",
        "authentication_error",
        "The gateway has no keys configured, so it accepts none.",
        "Set `GATEWAY_API_KEYS`, add a keys file, or set `[auth] required = false` for a loopback-only setup.",
    ),
    (
        403,
        "model_not_allowed",
        "permission_error",
        "The key may not use this alias.",
        "Ask the operator to add the alias to the key's allow-list.",
    ),
    (
        403,
        "status_not_allowed",
        "permission_error",
        "The key has an alias allow-list, and the status names every backend and upstream model.",
        "Read it with a key that may use every alias (an operator's key).",
    ),
    (
        404,
        "model_not_found",
        _REQ,
        "No alias of that name is configured.",
        "Use one of the aliases listed by `GET /v1/models`.",
    ),
    (404, "not_found", _REQ, "No endpoint at this path.", "Check the path (e.g. `/v1/chat/completions`)."),
    (405, "method_not_allowed", _REQ, "The endpoint does not take this method.", "Use the method the endpoint takes."),
    (413, "request_too_large", _REQ, "The body is larger than `max_request_bytes`.", "Send a smaller body."),
    (
        400,
        "incomplete_body",
        _REQ,
        "The body ended before it was whole: shorter than its `Content-Length`, or in broken chunked framing.",
        "Send the whole body, framed as its headers say.",
    ),
    (
        408,
        "request_timeout",
        _REQ,
        "The body stopped arriving: no byte for `body_timeout_s`.",
        "Check the client's connection and the Content-Length it sends, then retry.",
    ),
    (
        415,
        "unsupported_content_encoding",
        _REQ,
        "The body is compressed (`Content-Encoding`), which the gateway does not take.",
        "Send the JSON uncompressed.",
    ),
    (
        429,
        "rate_limit_exceeded",
        "rate_limit_error",
        "A requests- or tokens-per-minute limit was reached.",
        "Wait for the `Retry-After` seconds, then retry.",
    ),
    (
        429,
        "concurrency_limit_exceeded",
        "rate_limit_error",
        "The backend is serving its `max_concurrency` and its queue is full or the wait ran out.",
        "Wait for the `Retry-After` seconds, then retry.",
    ),
    (
        400,
        "upstream_rejected",
        _REQ,
        "The upstream refused the request itself (a bad parameter: 400 or 422, a body too large: 413, a content filter); its status is kept. Its other 4xx (a wrong key, model id or path) move on to the next target.",
        "Read the upstream's reason in the message and change the request.",
    ),
    (
        502,
        "upstream_error",
        "api_error",
        "Every target of the alias failed; the message lists each attempt.",
        "Retry later; the operator can see target health at `GET /v1/gateway/status`.",
    ),
    (
        502,
        "no_image_generated",
        "api_error",
        "An image-output alias, asked for an image, answered without one on every target.",
        "Rephrase the prompt to ask for an image, or retry.",
    ),
    (504, "upstream_timeout", "api_error", "The upstream did not answer in time.", "Retry later or raise the alias's timeouts."),
    (
        503,
        "no_healthy_backend",
        "api_error",
        "Every target of the alias is cooling down after repeated failures.",
        "Retry after the `Retry-After` seconds.",
    ),
    (
        503,
        "backend_not_configured",
        "api_error",
        "The backend's key variable (`api_key_env`) is unset, so it cannot be called.",
        "Set the variable the message names in the gateway's environment and restart or reload.",
    ),
    (
        503,
        "config_not_loaded",
        "api_error",
        "The gateway has no valid configuration loaded yet.",
        "Fix models.toml; `gateway check` lists every problem.",
    ),
    (500, "internal_error", "api_error", "An unexpected fault in the gateway.", "Report the request id in the message."),
)


# How image checks name the field they judge (``gateway.images``).
_IMAGE_URL_FIELD: Final[Location] = ("image_url", "url")
_IMAGE_URL_NAME: Final[str] = "image_url.url"


def render_param(at: Location | None) -> str | None:
    """``("messages", 0, "content")`` → ``messages[0].content`` (the seed's form).

    No location, or the body as a whole (``()``), renders as null: a client
    highlights a field, and there is none to highlight.
    """
    if not at:
        return None
    out: list[str] = []
    for part in at:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append(f".{part}" if out else part)
    return "".join(out)


def render_pointer(at: Location | None) -> str | None:
    """``("messages", 0, "content")`` → ``/messages/0/content`` (RFC 6901); null like ``render_param``."""
    if not at:
        return None
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in at)


def json_type_name(value: Any) -> str:
    """How a JSON value's type reads in a message: ``a string``, ``null``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def nested_too_deeply() -> GatewayError:
    """The client's JSON nests past the depth msgspec follows (Python's recursion limit, less the stack in use)."""
    return GatewayError("invalid_json", "The body nests arrays or objects too deeply (about 900 levels at most); flatten it.")


class GatewayError(Exception):
    """An error the client sees: a catalog code, a message, and where it points.

    ``at`` is a path into the body the client sent (or None); ``headers`` are
    extra response headers (``Retry-After`` for 429 and 503).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        at: Location | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = CATALOG[code]
        self.code = code
        self.message = message
        self.at = at
        self.headers = dict(headers or {})
        # An upstream's own 4xx is passed through with its status (SPEC §4).
        self.status = status if status is not None else self.kind.status

    def relocated(self, at: Location | None) -> GatewayError:
        """The same error pointing somewhere else (``/c1/chat`` maps paths back).

        An image's messages name their field ``image_url.url``; moved to a place
        of another name (a c1 ``images[1].url``, or the bare string ``images[1]``),
        the message names that place instead, as ``param`` does.
        """
        message = self.message
        if at and self.at is not None and self.at[-2:] == _IMAGE_URL_FIELD and at[-2:] != _IMAGE_URL_FIELD:
            message = message.replace(_IMAGE_URL_NAME, render_param(at) or _IMAGE_URL_NAME)
        return GatewayError(self.code, message, at=at, headers=self.headers, status=self.status)

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "type": self.kind.type,
                "code": self.code,
                "message": self.message,
                "param": render_param(self.at),
                "pointer": render_pointer(self.at),
            }
        }

    def __repr__(self) -> str:
        return f"GatewayError({self.code!r}, {self.message!r}, at={self.at!r})"


def catalog_rows() -> Sequence[dict[str, Any]]:
    """The catalog as JSON-ready rows, in table order."""
    return [attrs.asdict(kind) for kind in CATALOG.values()]


def catalog_markdown() -> str:
    """The catalog as the README's markdown table (a test keeps the README in step)."""
    lines = ["| status | code | type | meaning | fix |", "|---|---|---|---|---|"]
    for kind in CATALOG.values():
        lines.append(f"| {kind.status} | `{kind.code}` | {kind.type} | {kind.meaning} | {kind.fix} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(catalog_markdown())
