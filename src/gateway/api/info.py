"""Read-only endpoints: models, health, readiness, status, the error catalog, metrics."""

from __future__ import annotations

import os
import time
from typing import Any

from litestar import Request, Response, route
from litestar.datastructures import State
from litestar.params import FromPath

from gateway.api.edge import header
from gateway.errors import GatewayError, catalog_rows
from gateway.metrics import render
from gateway.rules import CAPABILITIES, LIMIT_KEYS
from gateway.snapshot import CompiledAlias, Snapshot


def get_or_head(path: str, **options: Any) -> route:
    """A GET route that answers HEAD too (RFC 9110: wherever GET is): load balancers and `curl -I`
    probe that way, and granian sends the head without the body."""
    return route(path, http_method=["GET", "HEAD"], **options)


def _gateway(state: State) -> Any:
    return state.gateway


def _serving(state: State) -> Snapshot:
    snapshot: Snapshot | None = _gateway(state).holder.current
    if snapshot is None:
        raise GatewayError("config_not_loaded", "No valid configuration is loaded; `gateway check` says why.")
    return snapshot


def model_entry(alias: CompiledAlias, created: int) -> dict[str, Any]:
    """The OpenAI model object plus the alias's capabilities (never its backend or upstream id)."""
    rules, spec = alias.rules, alias.spec
    return {
        "id": alias.name,
        "object": "model",
        "created": created,
        "owned_by": "dgx-gateway",
        # A composite's are its members' widest: what some request can get through (see rules).
        "capabilities": {
            "input": sorted(rules.input),
            "output": sorted(rules.output),
            **{key: rules.limit(key) for key in LIMIT_KEYS},
            **{key: rules.allows(key) for key in CAPABILITIES},
        },
        # What the alias accepts, in words, from the rules that judge its requests.
        "rules": dict(rules.explain()),
        "route": list(spec.route) if spec.route is not None else None,
        "fallback": list(spec.fallback),
        "notes": spec.notes,
        "cold_latency_s": list(spec.cold_latency_s) if spec.cold_latency_s else None,
        "cost_per_mtok_usd": spec.cost_per_mtok_usd,
    }


@get_or_head("/v1/models", sync_to_thread=False)
def list_models(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    snapshot = _serving(state)
    identity = _gateway(state).holder.keys.authenticate(header(request.scope, b"authorization"))
    created = int(snapshot.loaded_at)
    data = [model_entry(alias, created) for alias in snapshot.aliases.values() if identity.may_use(alias.name)]
    return {"object": "list", "data": data}


@get_or_head("/v1/models/{alias:path}", sync_to_thread=False)
def get_model(request: Request[Any, Any, State], state: State, alias: FromPath[str]) -> dict[str, Any]:
    snapshot = _serving(state)
    identity = _gateway(state).holder.keys.authenticate(header(request.scope, b"authorization"))
    name = alias.lstrip("/")
    try:
        compiled = snapshot.lookup(name, identity.may_use)
    except GatewayError as error:
        raise error.relocated(None) from None  # the alias is in the path: there is no body to point into
    return model_entry(compiled, int(snapshot.loaded_at))


@get_or_head("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get_or_head("/readyz", sync_to_thread=False)
def readyz(state: State) -> Response[dict[str, Any]]:
    """Ready while a valid configuration serves; the hash lets an operator see workers converge."""
    holder = _gateway(state).holder
    serving = holder.serving
    if serving is None:
        # Every non-2xx answer is the error envelope (SPEC §4); the probe's own fields ride beside it.
        error = GatewayError("config_not_loaded", "No valid configuration is loaded; `gateway check` says why.")
        not_ready = {"status": "not_ready", "config_hash": None, "keys_hash": None, "pid": os.getpid()}
        return Response({**error.envelope(), **not_ready}, status_code=error.status)
    return Response({
        "status": "ready",
        "config_hash": serving.snapshot.content_hash,
        "keys_hash": serving.keys_hash,
        "reload_error": holder.last_error is not None,
        "pid": os.getpid(),
    })


def _backend_rows(snapshot: Snapshot) -> list[dict[str, Any]]:
    rows = []
    for name, backend in snapshot.config.backends.items():
        unset = snapshot.unconfigured_backends.get(name)
        rows.append({
            "name": name,
            "configured": unset is None,
            "api_key_env": backend.api_key_env,
            "problem": f"{unset} is unset: its aliases move on or answer 503 backend_not_configured" if unset else None,
        })
    return rows


@get_or_head("/v1/gateway/status", sync_to_thread=False)
def status(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    gateway = _gateway(state)
    holder = gateway.holder
    identity = holder.keys.authenticate(header(request.scope, b"authorization"))
    if identity.allowed_models is not None:
        # It names backends and upstream model ids, which a client limited to some aliases must not see (SPEC §1).
        raise GatewayError("status_not_allowed", "Your key may use only some aliases; the status is for keys that may use every one.")
    serving = holder.serving  # read once: a reload may swap it while this answer is built
    snapshot: Snapshot | None = serving.snapshot if serving else None
    live_reload = gateway.live_reload
    return {
        "config_path": str(holder.path),
        "config_hash": snapshot.content_hash if snapshot else None,
        "loaded_at": snapshot.loaded_at if snapshot else None,
        "keys_file": str(serving.keys_path) if serving and serving.keys_path else None,
        "keys_hash": serving.keys_hash if serving else None,
        "last_error": holder.last_error,
        "last_error_at": holder.last_error_at,
        "aliases": len(snapshot.aliases) if snapshot else 0,
        "backends": _backend_rows(snapshot) if snapshot else [],
        "targets": list(gateway.health.report()),
        "watch": live_reload.mode if live_reload else "off",
        "pid": os.getpid(),
        "now": time.time(),
    }


@get_or_head("/v1/gateway/errors", sync_to_thread=False)
def error_catalog() -> dict[str, Any]:
    return {"object": "list", "data": list(catalog_rows())}


@get_or_head("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics(state: State) -> str:
    gateway = _gateway(state)
    exchange = gateway.metrics_exchange
    return render(exchange.samples() if exchange is not None else gateway.metrics.samples())


INFO_HANDLERS = [list_models, get_model, healthz, readyz, status, error_catalog, metrics]
