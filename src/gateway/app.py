"""The Litestar application: wiring, lifespan, and the one place errors are rendered.

``create_app`` is the factory granian runs (``gateway.app:create_app`` with
``--factory``). It reads ``GATEWAY_CONFIG`` (default ``./models.toml``) when no
path is given; ``transport`` is the seam tests use to put an
``httpx.MockTransport`` under the one upstream client.

Each granian worker is its own process with its own app: it loads the config at
start, and its lifespan runs live reload (file watch and SIGHUP, ``gateway.watch``)
until shutdown. The upstream client outlives every reload: it pools connections
per host, so a backend changed by a reload is reached with the new settings by
new requests, while requests in flight keep their connection to the end; the
pool closes a removed backend's connections once idle (keep-alive expiry).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from litestar import Litestar, Request, Response, asgi, post
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import JSONBody

from gateway.admission import RateAdmission
from gateway.api.completions import CompletionService, count_attempts
from gateway.api.info import INFO_HANDLERS
from gateway.api.openapi_chat import ChatCompletionRequest
from gateway.c1 import C1ChatRequest, translate_c1
from gateway.concurrency import BackendGates
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError
from gateway.health import HealthBoard
from gateway.logs import REQUEST_ID, configure_logging
from gateway.memory import freeze_long_lived_heap, keep_large_buffers_in_heap
from gateway.metrics import Metrics
from gateway.reload import SnapshotHolder
from gateway.shared_health import SharedHealth
from gateway.shared_metrics import MetricsExchange
from gateway.shared_slots import SlotDirectory
from gateway.supervisor import stop_when_orphaned
from gateway.upstream import UpstreamClient
from gateway.watch import LiveReload

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("gateway")

DEFAULT_CONFIG = "models.toml"
# A client's own x-request-id is echoed and logged up to this long.
MAX_REQUEST_ID_BYTES = 128


@attrs.define
class GatewayState:
    holder: SnapshotHolder
    metrics: Metrics
    health: HealthBoard
    client: UpstreamClient | None = None
    completions: CompletionService | None = None
    live_reload: LiveReload | None = None
    # With several workers, every worker's counters for GET /metrics.
    metrics_exchange: MetricsExchange | None = None


def name_request(scope: Any) -> bytes:
    """The request's id (the client's ``x-request-id``, or a new one), also kept in the scope."""
    rid = None
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            rid = value if len(value) <= MAX_REQUEST_ID_BYTES else _cut_request_id(value)
            break
    if not rid:
        rid = os.urandom(16).hex().encode()
    try:
        text = rid.decode("utf-8")  # as the client wrote it, so that it is found in the log
    except UnicodeDecodeError:
        text = rid.decode("latin-1")
    scope["gateway_request_id"] = text
    REQUEST_ID.set(text)
    return rid


def _cut_request_id(value: bytes) -> bytes:
    """A client's long id, cut to its first MAX_REQUEST_ID_BYTES: never half a UTF-8 character."""
    cut = value[:MAX_REQUEST_ID_BYTES]
    try:
        cut.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data":
            return cut[: exc.start]
    return cut


def _send_with_request_id(rid: bytes, send: Any) -> Any:
    async def send_with_id(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            # The completion handlers name their answers themselves, also when Litestar routes
            # a path spelled otherwise ("/v1//chat/completions") to them.
            if not any(name.lower() == b"x-request-id" for name, _ in headers):
                message["headers"] = [*headers, (b"x-request-id", rid)]
        await send(message)

    return send_with_id


class GatewayApp(Litestar):
    """Litestar that gives every response an ``x-request-id``.

    Done here rather than as Litestar middleware: Litestar runs middleware only
    for matched routes, and 404 and 405 answers need the header too.

    The completion endpoints are raw ASGI handlers that render every error
    themselves, so their requests go to them directly (``fast_paths``) instead
    of through Litestar's router and exception middleware: measured ~5% of the
    gateway's CPU per small request. They stay registered in Litestar too, for
    the OpenAPI document. They put the ``x-request-id`` on their answers
    themselves: wrapping ``send`` costs a call on every chunk of a stream.
    """

    fast_paths: dict[str, Any]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            rid = name_request(scope)
            handler = getattr(self, "fast_paths", {}).get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
            send = _send_with_request_id(rid, send)
        await super().__call__(scope, receive, send)


# OpenAI endpoints a client may try on any base URL; the gateway serves chat only, and says so.
_OTHER_OPENAI_ENDPOINTS = (
    "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/images", "/v1/audio", "/v1/moderations",
    "/v1/files", "/v1/batches", "/v1/assistants", "/v1/threads", "/v1/fine_tuning", "/v1/realtime",
)
_SHOWN_PATH_CHARS = 200


def endpoint_not_found(path: str) -> GatewayError:
    shown = path if len(path) <= _SHOWN_PATH_CHARS else path[:_SHOWN_PATH_CHARS] + "…"
    served = "It serves POST /v1/chat/completions, POST /c1/chat and GET /v1/models; GET /openapi/openapi.json describes every endpoint."
    if path.startswith("/v1/images"):
        why = " Images are made through POST /v1/chat/completions by an alias whose output has image (see GET /v1/models)."
    elif path.startswith(_OTHER_OPENAI_ENDPOINTS):
        why = " This gateway does not serve that part of the OpenAI API."
    else:
        why = ""
    return GatewayError("not_found", f"No endpoint at {shown}.{why} {served}")


def _envelope(error: GatewayError) -> Response[Any]:
    return Response(error.envelope(), status_code=error.status, headers=error.headers)


def _http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, GatewayError):
        return _envelope(exc)
    if isinstance(exc, NotFoundException):
        return _envelope(endpoint_not_found(request.url.path))
    if isinstance(exc, MethodNotAllowedException):
        # RFC 9110 wants the methods the endpoint does take in Allow; the router names them.
        allowed = (exc.headers or {}).get("allow", "")
        takes = f" It takes {allowed}." if allowed else ""
        return _envelope(
            GatewayError("method_not_allowed", f"{request.url.path} does not take {request.method}.{takes}", headers={"Allow": allowed} if allowed else None)
        )
    if isinstance(exc, ValidationException):
        return _envelope(GatewayError("invalid_request", str(exc.detail)))
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        return _envelope(GatewayError("invalid_request", str(exc.detail)))
    rid = request.scope.get("gateway_request_id", "-")
    log.exception("unexpected fault in request %s", rid, exc_info=exc)
    return _envelope(GatewayError("internal_error", f"An unexpected fault in the gateway (request id {rid})."))


def create_app(config_path: str | Path | None = None, *, transport: httpx.AsyncBaseTransport | None = None) -> Litestar:
    """The gateway app for one config file; it loads the file now and serves the last good load."""
    # Before the first load, so that its log lines (and an unset backend key's warning) are seen.
    configure_logging()
    keep_large_buffers_in_heap()
    path = Path(config_path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)
    metrics = Metrics()
    holder = SnapshotHolder(path, metrics)
    if not holder.load():
        holder.load_last_good()
    # Workers of one `gateway serve` judge targets together (each on its own in one process).
    # The status shows the targets this worker's serving configuration calls, not those a reload replaced.
    serving_keys = lambda: (holder.current.target_keys if holder.current else None)
    health = HealthBoard(SharedHealth.from_environment(), serving_keys)
    state = GatewayState(holder=holder, metrics=metrics, health=health)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # The client's connection pool belongs to the serving event loop: make it here.
        state.client = UpstreamClient(transport)
        routing = lambda: (holder.current.config.routing if holder.current else None)
        # Limits read the serving config on every request, so they follow reloads.
        config = lambda: (holder.current.config if holder.current else None)
        admission = RateAdmission(config)
        # Workers of one `gateway serve` share each backend's slots (none to share in one process).
        slot_files = SlotDirectory.from_environment()
        gates = BackendGates(config, slot_files)
        holder.on_swap.append(gates.follow)
        dispatcher = Dispatcher(state.client, state.health, routing, slots=gates, on_attempts=partial(count_attempts, metrics))
        state.completions = CompletionService(holder, dispatcher, metrics, admission=admission)
        state.live_reload = LiveReload(holder)
        await state.live_reload.start()
        state.metrics_exchange = MetricsExchange.from_environment(metrics)
        # Under `gateway serve` (which names a last-good folder) the parent is granian's main process;
        # run in-process, the app must not stop because whatever started it did.
        orphan_watch = asyncio.create_task(stop_when_orphaned(os.getppid())) if holder.last_good_dir else None
        # Last: what is alive now lives as long as the worker.
        log.debug("froze %d long-lived objects out of garbage collection", freeze_long_lived_heap())
        try:
            async with state.metrics_exchange.publishing() if state.metrics_exchange else nullcontext():
                yield
        finally:
            if orphan_watch is not None:
                orphan_watch.cancel()
            # Stop reloading first: a reload must not race the client's shutdown.
            await state.live_reload.stop()
            await admission.aclose()
            await state.client.aclose()
            if slot_files is not None:
                slot_files.close()

    async def serve_chat_completions(scope: Any, receive: Any, send: Any) -> None:
        assert state.completions is not None
        await state.completions.handle(scope, receive, send)

    async def serve_c1_chat(scope: Any, receive: Any, send: Any) -> None:
        assert state.completions is not None
        await state.completions.handle(scope, receive, send, translate=translate_c1)

    chat_completions = asgi("/v1/chat/completions", copy_scope=False)(serve_chat_completions)
    c1_chat = asgi("/c1/chat", copy_scope=False)(serve_c1_chat)

    app = GatewayApp(
        route_handlers=[chat_completions, c1_chat, *INFO_HANDLERS],
        lifespan=[lifespan],
        exception_handlers={Exception: _http_exception},
        state=None,
        logging_config=None,  # ours is set up by configure_logging; Litestar's adds a listener thread
        openapi_config=OpenAPIConfig(title="DGX LLM Chat Gateway", version="0.1.0", path="/openapi"),
        on_app_init=[lambda cfg: _set_state(cfg, state)],
        on_startup=[lambda app: document_raw_routes(app, [_chat_completions_description(), _c1_chat_description()])],
    )
    app.fast_paths = {"/v1/chat/completions": serve_chat_completions, "/c1/chat": serve_c1_chat}
    return app


def _set_state(app_config: Any, state: GatewayState) -> Any:
    from litestar.datastructures import State

    app_config.state = State({"gateway": state})
    return app_config


def _completion_description(path: str, request: type, summary: str, description: str) -> HTTPRouteHandler:
    """``POST path`` for the OpenAPI document; never served (the raw ASGI handler is).

    ``request`` is the body's schema; both completion endpoints answer alike, so the
    responses are described once here.
    """

    async def described(data: Any) -> dict[str, Any]:
        raise NotImplementedError

    # The schema is known only per call: set the annotation Litestar reads it from.
    described.__annotations__ = {"data": JSONBody[request], "return": dict[str, Any]}  # type: ignore[misc,valid-type]
    described.__name__ = described.__qualname__ = "describe_" + path.strip("/").replace("/", "_")
    return post(
        path,
        status_code=200,
        tags=["chat"],
        summary=summary,
        description=description,
        response_description="The chat completion, or with `\"stream\": true` an SSE stream ending in `data: [DONE]`.",
        responses={
            400: ResponseSpec(
                data_container=dict[str, Any],
                generate_examples=False,
                description="An OpenAI error envelope: error.type, code, message, param, pointer (GET /v1/gateway/errors).",
            )
        },
    )(described)


def _chat_completions_description() -> HTTPRouteHandler:
    return _completion_description(
        "/v1/chat/completions",
        ChatCompletionRequest,
        "OpenAI Chat Completions, for any alias",
        "The request is checked against the alias's rules generated from models.toml, then routed "
        "through its targets, fallbacks or composite route. `model` in the answer is the alias that "
        "served; `x-gateway-served-by` and `x-gateway-attempts` say which and how many calls it took.",
    )


def _c1_chat_description() -> HTTPRouteHandler:
    return _completion_description(
        "/c1/chat",
        C1ChatRequest,
        "Chat with a top-level message and images",
        "The shortcut of the vision page: `message` (a string, or an array of content parts) and "
        "top-level `images` are rebuilt into one user message of content parts, after the optional "
        "`system` prompt and `messages` history; every other field passes through. The answer is "
        "exactly that of POST /v1/chat/completions (JSON, or SSE with `\"stream\": true`). Error "
        "`param`/`pointer` name places in this body, e.g. `images[1].url`.",
    )


def document_raw_routes(app: Litestar, descriptions: list[HTTPRouteHandler]) -> None:
    """Put raw ``@asgi`` routes into ``app``'s OpenAPI document.

    Litestar documents only HTTP routes, and an ``@asgi`` path cannot hold an
    HTTP handler too. So each description (a never-served handler of the same
    path whose ``data`` type is the request schema) is rendered by a scratch app,
    and its paths and schemas are copied into ``app``'s document, which Litestar
    builds once and keeps (nothing registers routes after startup).
    """
    scratch = Litestar(route_handlers=descriptions, logging_config=None, openapi_config=OpenAPIConfig(title="-", version="-"))
    described, document = scratch.openapi_schema, app.openapi_schema
    document.paths = {**(document.paths or {}), **(described.paths or {})}
    document.components.schemas.update(described.components.schemas)
