"""Frozen attrs classes for what models.toml says. No I/O, no derived state.

Field names are the file's key names (SPEC §5), so the loader's paths and the
operator's file speak the same language. ``None`` means "not said here": the
snapshot resolves it through alias → backend → ``[defaults]`` → built-in.

Field metadata ``positive=True`` marks numbers the loader checks are > 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

MODALITIES = ("text", "image", "audio", "video", "file")
OUTPUT_MODALITIES = ("text", "image", "audio")

POSITIVE = {"positive": True}


def _positive(default: Any = None) -> Any:
    return attrs.field(default=default, metadata=POSITIVE)


@attrs.frozen(kw_only=True)
class Timeouts:
    """The four timeouts an alias, a backend or ``[defaults]`` may set (seconds)."""

    timeout_s: float | None = _positive()
    connect_timeout_s: float | None = _positive()
    first_byte_timeout_s: float | None = _positive()
    idle_timeout_s: float | None = _positive()


@attrs.frozen(kw_only=True)
class Defaults(Timeouts):
    """``[defaults]``: applied to every alias unless it (or its backend) overrides."""

    max_images: int | None = _positive()
    max_image_bytes: int | None = _positive()
    retries: int | None = None


@attrs.frozen(kw_only=True)
class ServerConfig:
    """``[server]``: settings of the HTTP edge."""

    max_request_bytes: int = _positive(64 * 1024 * 1024)
    # The longest wait for the next piece of a body already begun (nginx's client_body_timeout):
    # a client that stops mid-upload gets 408 instead of holding its request open for ever.
    body_timeout_s: float = _positive(60.0)


@attrs.frozen(kw_only=True)
class RoutingConfig:
    """``[routing]``: bounds on how a plan of attempts runs (SPEC §6).

    Retries per target are ``retries`` (alias → backend → ``[defaults]``, default 1).
    """

    max_attempts: int = _positive(8)            # upstream calls per request, over the whole plan
    backoff_s: float = _positive(0.2)           # first retry's wait, doubled per retry, jittered ±50 %
    backoff_max_s: float = _positive(4.0)
    retry_after_max_s: float = _positive(10.0)  # a longer Retry-After moves on (and pauses the target)
    cooldown_failures: int = _positive(3)       # consecutive failures that cool a target down
    cooldown_s: float = _positive(30.0)


@attrs.frozen(kw_only=True)
class AuthConfig:
    """``[auth]``: where keys come from besides ``GATEWAY_API_KEYS``."""

    keys_file: str | None = None
    required: bool = True


REDIS_SCHEMES = ("redis://", "rediss://")
# Retries per target where neither the alias, its backend nor [defaults] sets them.
BUILTIN_RETRIES = 1


@attrs.frozen(kw_only=True)
class LimitsConfig:
    """``[limits]``: where rate counters live, and the rates every key gets unless its entry says otherwise.

    ``storage = "memory"`` counts in each worker process; a ``redis://`` URL
    shares one budget between workers and machines.
    """

    storage: str = "memory"  # or a Redis URL (REDIS_SCHEMES); the loader checks it
    key_rpm: int | None = _positive()
    key_tpm: int | None = _positive()


@attrs.frozen(kw_only=True)
class KeyEntry:
    """``[keys.NAME]`` of the keys file: a hash of the key (never the key), its allow-list and rates."""

    hash: str
    models: tuple[str, ...] | None = None
    rpm: int | None = _positive()
    tpm: int | None = _positive()
    enabled: bool = True
    created_at: str | None = None
    revoked_at: str | None = None


@attrs.frozen(kw_only=True)
class Backend(Timeouts):
    """``[backends.NAME]``: an OpenAI-compatible API the gateway calls."""

    base_url: str
    api_key_env: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    retries: int | None = None
    # Calls in flight at once (per worker process); absent: no limit. The next ones wait in
    # line, at most max_queue of them (default 16) for at most queue_timeout_s (default 30 s).
    max_concurrency: int | None = _positive()
    max_queue: int | None = None
    queue_timeout_s: float | None = _positive()


@attrs.frozen(kw_only=True)
class AliasSpec(Timeouts):
    """``[models."ALIAS"]``: one alias, either a target (backend + model) or a composite route."""

    backend: str | None = None
    model: str | None = None
    route: tuple[str, ...] | None = None
    fallback: tuple[str, ...] = ()

    input: tuple[str, ...] | None = None
    output: tuple[str, ...] | None = None
    notes: str = ""

    context_window: int | None = _positive()
    max_output_tokens: int | None = _positive()
    min_max_tokens: int | None = _positive()
    max_images: int | None = _positive()
    max_image_bytes: int | None = _positive()

    # Declared capabilities: false refuses requests that use the feature, true or
    # absent lets them through (a composite also needs a member that allows it):
    #   streaming          "stream": true                       → stream_not_supported
    #   tools              a non-empty `tools` / `functions`    → capability_not_supported
    #   structured_output  response_format json_object / json_schema
    #   thinking           reasoning_effort (not "none"), reasoning, thinking,
    #                      chat_template_kwargs.enable_thinking
    # Audio and video need no key of their own: they are `input` modalities.
    streaming: bool | None = None
    tools: bool | None = None
    structured_output: bool | None = None
    thinking: bool | None = None

    params: Mapping[str, Any] = attrs.field(factory=dict)
    rename: Mapping[str, str] = attrs.field(factory=dict)
    retries: int | None = None

    rpm: int | None = _positive()
    tpm: int | None = _positive()

    cold_latency_s: tuple[float, ...] | None = None
    cost_per_mtok_usd: float | None = None

    @property
    def is_composite(self) -> bool:
        return self.route is not None


@attrs.frozen(kw_only=True)
class Config:
    """The whole of models.toml, structured and cross-checked."""

    defaults: Defaults = Defaults()
    server: ServerConfig = ServerConfig()
    routing: RoutingConfig = RoutingConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    backends: Mapping[str, Backend] = attrs.field(factory=dict)
    models: Mapping[str, AliasSpec] = attrs.field(factory=dict)
