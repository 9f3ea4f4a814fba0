"""The Litestar application: wiring, lifespan, and the one place errors are rendered.

``create_app`` is the factory granian runs (``gateway.app:create_app`` with
``--factory``). It reads ``GATEWAY_CONFIG`` (default ``./models.toml``) when no
path is given; ``transport`` is the seam tests use to put an
``httpx.MockTransport`` under the one upstream client.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
from litestar import Litestar, Request, Response, asgi
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException, ValidationException
from litestar.openapi import OpenAPIConfig

from gateway.api.completions import CompletionService
from gateway.api.info import INFO_HANDLERS
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError
from gateway.health import HealthBoard
from gateway.metrics import Metrics
from gateway.reload import SnapshotHolder
from gateway.upstream import UpstreamClient

log = logging.getLogger("gateway")

DEFAULT_CONFIG = "models.toml"


@attrs.define
class GatewayState:
    holder: SnapshotHolder
    metrics: Metrics
    health: HealthBoard
    client: UpstreamClient | None = None
    completions: CompletionService | None = None


class RequestIdMiddleware:
    """Give every response an ``x-request-id`` (the client's, when it sent one)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value[:128]
                break
        if not rid:
            rid = uuid.uuid4().hex.encode()
        scope["gateway_request_id"] = rid.decode("latin-1")

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _envelope(error: GatewayError) -> Response[Any]:
    return Response(error.envelope(), status_code=error.status, headers=error.headers)


def _http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, GatewayError):
        return _envelope(exc)
    if isinstance(exc, NotFoundException):
        return _envelope(GatewayError("not_found", f"No endpoint at {request.url.path}."))
    if isinstance(exc, MethodNotAllowedException):
        return _envelope(GatewayError("method_not_allowed", f"{request.url.path} does not take {request.method}."))
    if isinstance(exc, ValidationException):
        return _envelope(GatewayError("invalid_request", str(exc.detail)))
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        return _envelope(GatewayError("invalid_request", str(exc.detail)))
    rid = request.scope.get("gateway_request_id", "-")
    log.exception("unexpected fault in request %s", rid, exc_info=exc)
    return _envelope(GatewayError("internal_error", f"An unexpected fault in the gateway (request id {rid})."))


def create_app(config_path: str | Path | None = None, *, transport: httpx.AsyncBaseTransport | None = None) -> Litestar:
    """The gateway app for one config file; it loads the file now and serves the last good load."""
    path = Path(config_path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)
    metrics = Metrics()
    holder = SnapshotHolder(path, metrics)
    holder.load()
    state = GatewayState(holder=holder, metrics=metrics, health=HealthBoard())

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # The client's connection pool belongs to the serving event loop: make it here.
        state.client = UpstreamClient(transport)
        routing = lambda: (holder.current.config.routing if holder.current else None)  # noqa: E731
        state.completions = CompletionService(holder, Dispatcher(state.client, state.health, routing), metrics)
        try:
            yield
        finally:
            await state.client.aclose()

    @asgi("/v1/chat/completions", copy_scope=False)
    async def chat_completions(scope: Any, receive: Any, send: Any) -> None:
        assert state.completions is not None
        await state.completions.handle(scope, receive, send)

    logging.basicConfig(level=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Litestar(
        route_handlers=[chat_completions, *INFO_HANDLERS],
        lifespan=[lifespan],
        middleware=[RequestIdMiddleware],
        exception_handlers={Exception: _http_exception},
        state=None,
        openapi_config=OpenAPIConfig(title="DGX LLM Chat Gateway", version="0.1.0", path="/openapi"),
        on_app_init=[lambda cfg: _set_state(cfg, state)],
    )


def _set_state(app_config: Any, state: GatewayState) -> Any:
    from litestar.datastructures import State

    app_config.state = State({"gateway": state})
    return app_config
