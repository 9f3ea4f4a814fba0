"""Hold the serving snapshot and replace it whole when models.toml changes (SPEC §7).

1. Read the file's bytes; identical bytes (same SHA-256) change nothing.
2. Parse, check and compile a new ``Snapshot`` off the request path.
3. Swap it in with one assignment. A request reads ``holder.current`` once and
   finishes on that snapshot, whatever happens to the file meanwhile.
4. A bad file changes nothing but ``last_error``: the last good snapshot serves on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from gateway.auth import KeyRing
from gateway.keys import build_keyring
from gateway.config import ConfigError, parse_config
from gateway.metrics import Metrics
from gateway.snapshot import Snapshot, build_snapshot

log = logging.getLogger("gateway.reload")


class SnapshotHolder:
    def __init__(self, path: str | Path, metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self.metrics = metrics or Metrics()
        self.current: Snapshot | None = None
        self.keys: KeyRing = KeyRing({})
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def load(self) -> bool:
        """Load the file if it changed; True when a new snapshot now serves."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            return self._failed(f"{self.path}: cannot read the file: {exc.strerror or exc}")
        content_hash = hashlib.sha256(data).hexdigest()
        if self.current is not None and self.current.content_hash == content_hash:
            return False
        try:
            config = parse_config(data, str(self.path))
        except ConfigError as exc:
            return self._failed(exc.render())
        snapshot = build_snapshot(config, source=str(self.path), content_hash=content_hash)
        keys = build_keyring(config, self.path, os.environ)
        for backend, variable in snapshot.unconfigured_backends.items():
            log.warning("backend %s is not configured: %s is unset; its aliases move on or answer 503", backend, variable)
        self.current, self.keys = snapshot, keys
        self.last_error = self.last_error_at = None
        self.metrics.inc("gateway_config_reloads_total", result="ok")
        log.info("configuration %s loaded: %d aliases, hash %s", self.path, len(snapshot.aliases), content_hash[:12])
        return True

    def _failed(self, message: str) -> bool:
        if message != self.last_error:
            log.error("configuration not loaded, the last good one keeps serving:\n%s", message)
        self.last_error, self.last_error_at = message, time.time()
        self.metrics.inc("gateway_config_reloads_total", result="error")
        return False
