"""The granian main process as ``gateway serve`` runs it: SIGHUP reloads, it does not respawn.

Granian's main process answers SIGHUP by respawning every worker. A new worker
loads models.toml from scratch, so a file that is broken at that moment would
leave it with nothing to serve. The gateway promises instead that SIGHUP forces
a reload that keeps the last good configuration on a bad file (SPEC §7), so the
main process passes the signal on to each worker process, whose lifespan
reloads in place (``gateway.watch.LiveReload``).

Workers are always processes (``MPServer``, granian's default where the GIL is
on): each holds its own snapshot and watcher, and a signal can reach each one.

A worker stops itself, as on SIGTERM, once the main process is gone
(``stop_when_orphaned``): killed outright (SIGKILL, the OOM killer), the main
process left its workers serving on their own, holding the port, with nothing to
respawn them or pass SIGHUP on, so `gateway serve` could not start again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from granian.server import MPServer

log = logging.getLogger("gateway.serve")

ORPHAN_CHECK_S = 1.0


class GatewayGranian(MPServer):
    """Granian whose main process forwards SIGHUP to its worker processes."""

    def signal_handler_reload(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "pid", None) != os.getpid():
            return  # a forked worker still holds this handler until its lifespan installs its own
        for worker in list(self.wrks):
            try:
                os.kill(worker.inner.pid, signal.SIGHUP)
            except (ProcessLookupError, TypeError):
                pass  # a worker that just exited (or not yet started): granian respawns it with a fresh load


async def stop_when_orphaned(parent_pid: int, check_s: float = ORPHAN_CHECK_S) -> None:
    """SIGTERM this worker once its parent, granian's main process, is no longer ``parent_pid``."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(check_s)
    log.warning("[pid %d] the gateway's main process (pid %d) is gone: this worker stops", os.getpid(), parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
