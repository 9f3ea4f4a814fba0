"""The request schema of ``POST /v1/chat/completions`` for the OpenAPI document.

Only for documentation: bodies are never decoded into this struct (unknown
fields must pass through untouched, SPEC §2). Validation is ``facts`` + ``rules``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """OpenAI Chat Completions; every field not named here passes through to the upstream."""

    model: Annotated[str, msgspec.Meta(description="An alias (GET /v1/models).")]
    messages: Annotated[
        list[dict[str, Any]],
        msgspec.Meta(
            description="The conversation: objects with `role` and `content` (a string, or content parts of type "
            "text, image_url (data: URIs only), input_audio, file, video_url)."
        ),
    ]
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: Annotated[int | None, msgspec.Meta(description="Checked against the alias's min/max.")] = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
