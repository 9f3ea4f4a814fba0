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


@attrs.frozen(kw_only=True)
class RoutingConfig:
    """``[routing]``: bounds on how a plan of attempts runs (SPEC §6)."""

    max_attempts: int = _positive(8)
    backoff_s: float = _positive(0.2)
    backoff_max_s: float = _positive(4.0)
    cooldown_failures: int = _positive(3)
    cooldown_s: float = _positive(30.0)


@attrs.frozen(kw_only=True)
class AuthConfig:
    """``[auth]``: where keys come from besides ``GATEWAY_API_KEYS``."""

    keys_file: str | None = None
    required: bool = True


@attrs.frozen(kw_only=True)
class LimitsConfig:
    """``[limits]``: where rate-limit counters live ("memory" or a redis:// URL)."""

    storage: str = "memory"


@attrs.frozen(kw_only=True)
class Backend(Timeouts):
    """``[backends.NAME]``: an OpenAI-compatible API the gateway calls."""

    base_url: str
    api_key_env: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    retries: int | None = None
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

    # Declared capabilities: true/false say so; absent means "not declared"
    # (a target is then assumed capable; a composite derives it from members).
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
