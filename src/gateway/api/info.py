"""Read-only endpoints: models, health, readiness, status, the error catalog, metrics."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State

from gateway.errors import GatewayError, catalog_rows
from gateway.snapshot import CompiledAlias, Snapshot


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
        "capabilities": {
            "input": sorted(rules.input),
            "output": sorted(rules.output),
            "context_window": rules.context_window,
            "max_output_tokens": rules.max_output_tokens,
            "min_max_tokens": rules.min_max_tokens,
            "max_images": rules.max_images,
            "max_image_bytes": rules.max_image_bytes,
            "streaming": rules.streaming is not False,
            "tools": rules.tools,
            "structured_output": rules.structured_output,
            "thinking": rules.thinking,
        },
        "route": list(spec.route) if spec.route is not None else None,
        "fallback": list(spec.fallback),
        "notes": spec.notes,
        "cold_latency_s": list(spec.cold_latency_s) if spec.cold_latency_s else None,
        "cost_per_mtok_usd": spec.cost_per_mtok_usd,
    }


@get("/v1/models", sync_to_thread=False)
def list_models(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    snapshot = _serving(state)
    identity = _gateway(state).holder.keys.authenticate(request.headers.get("authorization"))
    created = int(snapshot.loaded_at)
    data = [model_entry(alias, created) for alias in snapshot.aliases.values() if identity.may_use(alias.name)]
    return {"object": "list", "data": data}


@get("/v1/models/{alias:path}", sync_to_thread=False)
def get_model(request: Request[Any, Any, State], state: State, alias: str) -> dict[str, Any]:
    snapshot = _serving(state)
    identity = _gateway(state).holder.keys.authenticate(request.headers.get("authorization"))
    name = alias.lstrip("/")
    compiled = snapshot.lookup(name)
    if not identity.may_use(compiled.name):
        raise GatewayError("model_not_found", f"The model '{name}' does not exist for your key.", at=None)
    return model_entry(compiled, int(snapshot.loaded_at))


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", sync_to_thread=False)
def readyz(state: State) -> Response[dict[str, Any]]:
    snapshot = _gateway(state).holder.current
    if snapshot is None:
        return Response({"status": "not_ready", "config_hash": None}, status_code=503)
    return Response({"status": "ready", "config_hash": snapshot.content_hash})


@get("/v1/gateway/status", sync_to_thread=False)
def status(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    gateway = _gateway(state)
    holder = gateway.holder
    holder.keys.authenticate(request.headers.get("authorization"))
    snapshot: Snapshot | None = holder.current
    backends = []
    if snapshot is not None:
        for name, backend in snapshot.config.backends.items():
            backends.append({
                "name": name,
                "configured": name not in snapshot.unconfigured_backends,
                "api_key_env": backend.api_key_env,
            })
    return {
        "config_path": str(holder.path),
        "config_hash": snapshot.content_hash if snapshot else None,
        "loaded_at": snapshot.loaded_at if snapshot else None,
        "last_error": holder.last_error,
        "last_error_at": holder.last_error_at,
        "aliases": len(snapshot.aliases) if snapshot else 0,
        "backends": backends,
        "targets": list(gateway.health.report()),
        "now": time.time(),
    }


@get("/v1/gateway/errors", sync_to_thread=False)
def error_catalog() -> dict[str, Any]:
    return {"object": "list", "data": list(catalog_rows())}


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics(state: State) -> str:
    return str(_gateway(state).metrics.render())


INFO_HANDLERS = [list_models, get_model, healthz, readyz, status, error_catalog, metrics]
