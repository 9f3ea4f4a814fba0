"""Logging setup for the gateway's processes.

Our own loggers (``gateway.*``) get one stream handler with a fixed format,
whatever granian or Litestar configured before us, so every line of a run looks
alike. httpx and httpcore are held at WARNING: they log every upstream request
at INFO, which is noise in an operator's log and measurable cost on the hot path.
Litestar's own logging setup (a queue and a listener thread) is switched off in
``create_app``; nothing of ours needs it.

A line logged while a request is served names the request's id (the ``x-request-id``
its answer carries), so an operator can find what happened to a client's request.
"""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]:%(request)s %(message)s"
# The id of the request being served (``app.name_request`` sets it in the request's own task).
REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request = f" [request {rid}]" if rid else ""
        return True


def configure_logging() -> None:
    level = os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper()
    logger = logging.getLogger("gateway")
    if not any(getattr(handler, "_gateway", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_RequestIdFilter())
        handler._gateway = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
