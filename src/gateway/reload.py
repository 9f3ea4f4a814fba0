"""Hold the serving configuration and replace it whole when its files change (SPEC §7).

How a load goes:
1. Read the bytes of models.toml and of the keys file it names (if any) and hash
   each (SHA-256). Identical bytes change nothing, unless the load is forced (SIGHUP).
2. Parse, check and compile a new ``Snapshot`` and ``KeyRing`` (``prepare``). The
   async ``reload`` runs this in a worker thread, so a large file's parse never
   stalls requests on the event loop.
3. Swap them in with one assignment, on the event loop (``apply``). A request reads
   ``holder.current`` once and finishes on that snapshot, whatever happens to the
   files meanwhile.
4. A bad file (syntax, unknown key, wrong type, dangling alias, cycle, deleted,
   half written) changes nothing but ``last_error``: the last good configuration
   serves on, and the error is logged once, not on every event that repeats it.
5. A good load clears ``last_error`` and logs what changed (``gateway.changes``).
6. Under ``gateway serve`` every good load is also copied to a private folder
   (``GATEWAY_LAST_GOOD_DIR``). A worker that starts while the file on disk is
   broken (granian respawns a worker that died) serves that copy, and shows the
   file's error, instead of serving nothing.

``gateway.watch`` decides *when* to reload; this module decides *what* serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from gateway.auth import KeyRing
from gateway.changes import diff_configs
from gateway.config import Config, ConfigError, ConfigIssue, parse_config
from gateway.keys import build_keyring, keys_file_path
from gateway.metrics import Metrics
from gateway.snapshot import Snapshot, build_snapshot

log = logging.getLogger("gateway.reload")

# The hash a keys file that cannot be read gets: its appearance later is a change.
UNREADABLE = "unreadable"
LAST_GOOD_ENV = "GATEWAY_LAST_GOOD_DIR"
LAST_GOOD_NAME = "models.toml"
# Where the last-good copy of a keys file outside models.toml's folder is kept.
ELSEWHERE = "keys-elsewhere"


@attrs.frozen
class Serving:
    """What requests are served from: swapped as one object, never mutated."""

    snapshot: Snapshot
    keys: KeyRing
    keys_path: Path | None
    keys_hash: str | None


@attrs.frozen
class Prepared:
    """The outcome of ``prepare``: a new ``Serving``, an error, or the files unchanged."""

    serving: Serving | None = None
    error: str | None = None
    # The files hold exactly what serves (an edit undone after a bad save, say).
    unchanged: bool = False
    # The keys file the newest parsable models.toml names, even when the load failed:
    # creating that file must wake the watcher.
    keys_path_seen: Path | None = None
    forced: bool = False
    # The bytes that were loaded, for the last-good copy.
    models_bytes: bytes | None = None
    keys_bytes: bytes | None = None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return _sha256(path.read_bytes())
    except OSError:
        return UNREADABLE


# Some editors save by deleting the file and writing it anew, and a slip with rm or mv
# would lock every file key out with nothing shown: a keys file that vanishes is kept,
# as a models.toml that vanishes is. At startup a missing one is only not written yet,
# unless another worker of the gateway served keys from it (its last-good copy says so).
KEYS_FILE_GONE = (
    "the keys file is gone; the keys last read from it still authenticate. Revoke a key with "
    "`gateway keys revoke`; to stop using the file, remove [auth] keys_file from models.toml"
)


def _read_if_present(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    # Several workers write the same bytes: a rename makes each write whole. Private, as the keys
    # file is (0600): the copy holds its hashes.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _unreadable(path: Path, exc: OSError) -> str:
    issue = ConfigIssue((), f"cannot read the file: {exc.strerror or exc}")
    return ConfigError(str(path), [issue]).render()


class SnapshotHolder:
    """The one place that knows which configuration serves, and why the last load failed."""

    def __init__(
        self, path: str | Path, metrics: Metrics | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.metrics = metrics or Metrics()
        self.environ = os.environ if environ is None else environ
        self.serving: Serving | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._keys_path_seen: Path | None = None
        self._lock = asyncio.Lock()
        # Told each configuration swapped in (on the event loop's thread, once it runs).
        self.on_swap: list[Callable[[Config], None]] = []
        last_good = self.environ.get(LAST_GOOD_ENV)
        self.last_good_dir = Path(last_good) if last_good else None

    # ------------------------------------------------------------ what serves

    @property
    def current(self) -> Snapshot | None:
        serving = self.serving
        return serving.snapshot if serving else None

    @property
    def keys(self) -> KeyRing:
        serving = self.serving
        if serving is not None:
            return serving.keys
        # No configuration yet: GATEWAY_API_KEYS still opens the status page, which says why.
        return KeyRing.from_env_keys(self.environ.get("GATEWAY_API_KEYS", "").split(","))

    def watched_paths(self) -> tuple[Path, ...]:
        """models.toml, plus the keys file the serving config names and the one the newest edit names."""
        serving = self.serving
        extra = {p for p in (serving.keys_path if serving else None, self._keys_path_seen) if p is not None}
        return (self.path, *sorted(extra))

    # ------------------------------------------------------------ loading

    def load(self, *, force: bool = False, reason: str = "startup") -> bool:
        """Load now, on this thread; True when a new configuration serves."""
        return self.apply(self.prepare(force=force), reason=reason)

    async def reload(self, *, force: bool = False, reason: str = "file changed") -> bool:
        """Load off the event loop, then swap on it; concurrent calls run one after the other."""
        async with self._lock:
            prepared = await asyncio.to_thread(self.prepare, force=force)
            return self.apply(prepared, reason=reason)

    def prepare(self, *, force: bool = False, path: Path | None = None) -> Prepared:
        """Read, parse and compile the files; touches nothing that serves (safe on any thread).

        ``path`` reads another copy of models.toml (the last-good one) in place of ``self.path``.
        """
        path = path or self.path
        try:
            data = path.read_bytes()
        except OSError as exc:
            return Prepared(error=_unreadable(path, exc), forced=force)
        content_hash = _sha256(data)
        serving = self.serving
        if (
            not force
            and serving is not None
            and serving.snapshot.source == str(path)  # serving the last-good copy, the file is read anew
            and serving.snapshot.content_hash == content_hash
            and _hash_file(serving.keys_path) == serving.keys_hash
        ):
            return Prepared(unchanged=True, keys_path_seen=serving.keys_path)
        keys_path: Path | None = None
        config: Config | None = None
        try:
            config = parse_config(data, str(path))
            keys_path = self._keys_path(config, path)
            keys_bytes = _read_if_present(keys_path)
            keys_hash = _hash_file(keys_path)
            if self._keys_file_gone(keys_path, serving):
                raise ConfigError(str(keys_path), [ConfigIssue((), KEYS_FILE_GONE)])
            keys = build_keyring(config, keys_path, self.environ)
            snapshot = build_snapshot(config, source=str(path), content_hash=content_hash, environ=self.environ)
        except ConfigError as exc:
            if config is None:  # models.toml itself is broken: a key revoked meanwhile is revoked all the same
                keys_alone, keys_bytes = self._keys_alone(serving)
                return Prepared(keys_alone, error=exc.render(), forced=force, keys_bytes=keys_bytes)
            return Prepared(error=exc.render(), keys_path_seen=keys_path, forced=force)
        except Exception as exc:  # a fault of ours must not take the serving config down with it
            log.exception("unexpected fault while loading %s", path)
            error = f"{path}: unexpected fault while loading: {type(exc).__name__}: {exc}"
            return Prepared(error=error, keys_path_seen=keys_path, forced=force)
        serving = Serving(snapshot, keys, keys_path, keys_hash)
        return Prepared(serving, keys_path_seen=keys_path, forced=force, models_bytes=data, keys_bytes=keys_bytes)

    def _keys_path(self, config: Config, path: Path) -> Path | None:
        """The keys file to read: the one models.toml names, where it names it, also while the
        last-good copy of models.toml (``path``) serves; only when that file is gone, its copy."""
        named = keys_file_path(config, self.path)
        if named is None or path == self.path or named.exists():
            return named
        copy = self._last_good_keys(named)
        return copy if copy is not None and copy.is_file() else named

    def _keys_file_gone(self, keys_path: Path | None, serving: Serving | None) -> bool:
        """Whether keys were served from ``keys_path``, by this worker or another, and it no longer exists."""
        if keys_path is None or keys_path.exists():
            return False
        if serving is not None and keys_path == serving.keys_path and serving.keys_hash not in (None, UNREADABLE):
            return True
        copy = self._last_good_keys(keys_path)
        return copy is not None and copy.is_file()

    def _keys_alone(self, serving: Serving | None) -> tuple[Serving | None, bytes | None]:
        """What serves with its keys file read again, while models.toml cannot be; (None, None) when the
        keys file is unchanged, gone or broken (the keys that serve stay, as ever)."""
        if serving is None or serving.keys_path is None:
            return None, None
        keys_bytes = _read_if_present(serving.keys_path)
        keys_hash = _sha256(keys_bytes) if keys_bytes is not None else None
        if keys_hash is None or keys_hash == serving.keys_hash:
            return None, None
        try:
            keys = build_keyring(serving.snapshot.config, serving.keys_path, self.environ)
        except ConfigError:
            return None, None
        return attrs.evolve(serving, keys=keys, keys_hash=keys_hash), keys_bytes

    def _last_good_keys(self, keys_path: Path) -> Path | None:
        """Where the last-good copy of ``keys_path`` is kept: beside models.toml's, as it is beside
        models.toml, or for a keys file elsewhere, under a name of its own."""
        if self.last_good_dir is None:
            return None
        try:
            return self.last_good_dir / keys_path.relative_to(self.path.parent)
        except ValueError:
            return self.last_good_dir / ELSEWHERE / f"{_sha256(str(keys_path).encode())[:16]}-{keys_path.name}"

    def load_last_good(self) -> bool:
        """Serve the last configuration a worker of this gateway loaded; the file's error stays shown."""
        if self.last_good_dir is None or self.serving is not None:
            return False
        stored = self.last_good_dir / LAST_GOOD_NAME
        if not stored.is_file():
            return False
        error, error_at = self.last_error, self.last_error_at
        loaded = self.apply(self.prepare(force=True, path=stored), reason="the last good copy, as the files cannot be loaded")
        if loaded:
            self.last_error, self.last_error_at = error, error_at
        return loaded

    def apply(self, prepared: Prepared, *, reason: str = "file changed") -> bool:
        """Swap a prepared configuration in, or record why there is none; True when one was swapped in."""
        if prepared.keys_path_seen is not None or prepared.error is None:
            self._keys_path_seen = prepared.keys_path_seen
        if prepared.error is not None:
            if prepared.serving is not None:
                self._swap_keys(prepared)
            return self._failed(prepared.error, repeat_log=prepared.forced)
        new = prepared.serving
        if new is None:
            if prepared.unchanged and self.last_error is not None:
                log.info(
                    "[pid %d] configuration %s is back to what serves; the last error is cleared",
                    os.getpid(), self.path,
                )
                self.last_error = self.last_error_at = None
            return False
        old = self.serving
        self.serving = new  # the swap: one assignment
        for listener in self.on_swap:
            listener(new.snapshot.config)
        self.last_error = self.last_error_at = None
        self.metrics.inc("gateway_config_reloads_total", result="ok")
        self._log_loaded(old, new, reason)
        self._save_last_good(prepared)
        return True

    def _swap_keys(self, prepared: Prepared) -> None:
        """Serve the keys file read again while models.toml is broken (its error is recorded next)."""
        new = prepared.serving
        assert new is not None
        self.serving = new
        log.info("[pid %d] keys file %s reloaded; %s is not (below)", os.getpid(), new.keys_path, self.path)
        self._save_last_good(prepared)

    def _save_last_good(self, prepared: Prepared) -> None:
        """Copy what now serves, read from the files themselves, for workers started later."""
        serving = prepared.serving
        if self.last_good_dir is None or serving is None:
            return
        keys_path = serving.keys_path
        keys_copy = None
        if keys_path is not None and self.last_good_dir not in keys_path.parents:  # not the copy itself
            keys_copy = self._last_good_keys(keys_path)
        try:
            if prepared.models_bytes is not None and serving.snapshot.source == str(self.path):
                _write_atomically(self.last_good_dir / LAST_GOOD_NAME, prepared.models_bytes)
            if keys_copy is not None and prepared.keys_bytes is not None:
                _write_atomically(keys_copy, prepared.keys_bytes)
        except OSError as exc:
            log.warning("[pid %d] could not keep a last-good copy of the configuration: %s", os.getpid(), exc.strerror)

    # ------------------------------------------------------------ reporting

    def _failed(self, message: str, *, repeat_log: bool) -> bool:
        # An editor saving the same broken file again, or several events for one write,
        # must not repeat the message: it is logged when it changes (or on SIGHUP).
        if message != self.last_error or repeat_log:
            serving = self.current
            if serving is not None:
                keeps = f"hash {serving.content_hash[:12]} keeps serving"
            elif self.last_good_dir is not None and (self.last_good_dir / LAST_GOOD_NAME).is_file():
                keeps = "this worker starts on the last good copy"  # load_last_good follows
            else:
                keeps = "nothing is serving"
            log.error("[pid %d] configuration not loaded, %s:\n%s", os.getpid(), keeps, message)
            self.metrics.inc("gateway_config_reloads_total", result="error")
        self.last_error, self.last_error_at = message, time.time()
        return False

    def _log_loaded(self, old: Serving | None, new: Serving, reason: str) -> None:
        snapshot = new.snapshot
        counts = f"{len(snapshot.aliases)} aliases, {len(snapshot.config.backends)} backends"
        # Every worker logs its own reloads: the pid tells an operator which ones have converged.
        if old is None:
            log.info(
                "[pid %d] configuration %s loaded (%s): %s, hash %s",
                os.getpid(), self.path, reason, counts, snapshot.content_hash[:12],
            )
        else:
            keys_changed = old.keys_hash != new.keys_hash
            same_files = old.snapshot.content_hash == snapshot.content_hash and not keys_changed
            changes = diff_configs(old.snapshot.config, snapshot.config, keys_file_changed=keys_changed)
            what = "the files are unchanged" if same_files else changes.describe()
            log.info(
                "[pid %d] configuration %s reloaded (%s): %s; hash %s -> %s, %s",
                os.getpid(), self.path, reason, what,
                old.snapshot.content_hash[:12], snapshot.content_hash[:12], counts,
            )
        before = old.snapshot.unconfigured_backends if old else {}
        for backend, variable in snapshot.unconfigured_backends.items():
            if before.get(backend) != variable:
                log.warning(
                    "backend %s is not configured: %s is unset; its aliases move on to their next target or answer 503",
                    backend, variable,
                )
