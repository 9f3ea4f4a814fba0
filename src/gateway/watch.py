"""Decide when the configuration is reloaded: file events and SIGHUP (SPEC §7).

How the watch works:
1. Watch the *directories* of models.toml and the keys file and keep only the
   events that name those files: editors that save by rename replace the file,
   and a watch on the file itself goes silent after the first save.
2. Native notifications (inotify) by default. Polling instead when asked
   (``GATEWAY_WATCH=poll`` or ``WATCHFILES_FORCE_POLLING``), when a directory is on
   a network or FUSE file system (changes made on another host raise no inotify
   event there), or when inotify cannot start (its watch limit is reached).
   ``GATEWAY_WATCH=off`` leaves SIGHUP as the only trigger.
3. A batch of events (grouped until 50 ms of quiet, at most ``debounce_ms``)
   triggers one reload. When the set of watched files changes (``[auth] keys_file``
   edited, a symlink retargeted) or a watched directory is replaced, the watch
   restarts on the new directories (checked after each batch and every second).
4. Once a watch is up, one catch-up reload runs, so a write that landed between
   the startup load and the watch is not missed (identical bytes cost a hash).
5. ``LiveReload`` owns the stop event, the watch task and the SIGHUP handler; the
   app's lifespan starts it and stops it, and the watch ends within one step.

Only this module imports watchfiles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from pathlib import Path

from watchfiles import Change, awatch

from gateway.reload import SnapshotHolder

log = logging.getLogger("gateway.watch")
# watchfiles logs every batch at INFO; our own reload line says what matters.
logging.getLogger("watchfiles").setLevel(logging.WARNING)

MODES = ("auto", "native", "poll", "off")
STEP_MS = 50
DEBOUNCE_MS = 400
POLL_DELAY_MS = 250
CATCH_UP_MS = 1000
MISSING_DIR_RETRY_S = 1.0
STOP_TIMEOUT_S = 5.0

# File systems whose changes made elsewhere never reach this host's inotify.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "afs", "vboxsf", "virtiofs"}
)


def filesystem_type(path: str, mountinfo: str) -> str | None:
    """The type of the file system holding ``path``, from /proc/self/mountinfo text."""
    best_mount, best_type = "", None
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best_mount):
            best_mount, best_type = mount, rest.split()[0]
    return best_type


def needs_polling(fs_type: str | None) -> bool:
    return fs_type is not None and (fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse"))


def _read_mountinfo() -> str:
    try:
        return Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ""


def choose_mode(environ: Mapping[str, str]) -> str:
    """The watch mode asked for by ``GATEWAY_WATCH`` (or watchfiles' own polling switch)."""
    mode = environ.get("GATEWAY_WATCH", "auto").strip().lower() or "auto"
    if mode not in MODES:
        log.warning("GATEWAY_WATCH=%r is not one of %s; using auto", mode, ", ".join(MODES))
        mode = "auto"
    if mode == "auto" and environ.get("WATCHFILES_FORCE_POLLING"):
        mode = "poll"
    return mode


def watched_files(paths: Iterable[Path]) -> frozenset[str]:
    """Each path as given (made absolute) and, when it is a symlink, where it points."""
    files: set[str] = set()
    for path in paths:
        absolute = os.path.abspath(path)
        files.update({absolute, os.path.realpath(absolute)})
    return frozenset(files)


class ConfigWatcher:
    """Call ``on_change`` after each batch of events that touch one of ``paths()``."""

    def __init__(
        self,
        paths: Callable[[], Iterable[Path]],
        on_change: Callable[[], Awaitable[object]],
        *,
        mode: str = "auto",
        debounce_ms: int = DEBOUNCE_MS,
        poll_delay_ms: int = POLL_DELAY_MS,
    ) -> None:
        self._paths = paths
        self._on_change = on_change
        self.mode = mode
        self._debounce_ms = debounce_ms
        self._poll_delay_ms = poll_delay_ms
        # What runs now, for the status page: "native", "poll", "off" or "starting".
        self.running = "off" if mode == "off" else "starting"

    async def run(self, stop: asyncio.Event) -> None:
        if self.mode == "off":
            return
        while not stop.is_set():
            files = watched_files(self._paths())
            directories = sorted({os.path.dirname(f) for f in files if os.path.isdir(os.path.dirname(f))})
            if not directories:
                # The config's directory is gone (moved, unmounted): look again shortly.
                await _wait(stop, MISSING_DIR_RETRY_S)
                continue
            polling = self._polling(directories)
            try:
                await self._watch(files, directories, polling, stop)
            except FileNotFoundError:
                await _wait(stop, MISSING_DIR_RETRY_S)  # a directory vanished as the watch began
            except OSError as exc:
                if polling:
                    log.exception("polling %s failed; trying again shortly", ", ".join(directories))
                    await _wait(stop, MISSING_DIR_RETRY_S)
                else:
                    log.warning(
                        "native file watching failed (%s); polling every %d ms instead", exc, self._poll_delay_ms
                    )
                    self.mode = "poll"
            except Exception:  # a dead watch would silently stop reloads: log it and watch again
                log.exception("the file watch failed; watching again shortly")
                await _wait(stop, MISSING_DIR_RETRY_S)
        self.running = "off"

    def _polling(self, directories: list[str]) -> bool:
        if self.mode != "auto":
            return self.mode == "poll"
        mountinfo = _read_mountinfo()
        remote = [d for d in directories if needs_polling(filesystem_type(os.path.realpath(d), mountinfo))]
        if remote:
            log.info("%s is on a network or FUSE file system: polling it for changes", ", ".join(remote))
        return bool(remote)

    async def _watch(self, files: frozenset[str], directories: list[str], polling: bool, stop: asyncio.Event) -> None:
        def relevant(change: Change, path: str) -> bool:
            return path in files

        batches = awatch(
            *directories,
            watch_filter=relevant,
            stop_event=stop,
            debounce=self._debounce_ms,
            step=STEP_MS,
            rust_timeout=CATCH_UP_MS,
            yield_on_timeout=True,
            force_polling=polling,
            poll_delay_ms=self._poll_delay_ms,
            recursive=False,
        )
        caught_up = False
        identities = _directory_ids(directories)
        async with aclosing(batches):
            async for changes in batches:
                self.running = "poll" if polling else "native"
                if changes or not caught_up:
                    caught_up = True
                    await self._notify()
                if watched_files(self._paths()) != files:
                    return  # watch the new set of files
                if _directory_ids(directories) != identities:
                    # A directory replaced by rename (a deploy swapping config dirs): the old
                    # watch sees nothing more, so watch the new one and reload at once.
                    await self._notify()
                    return

    async def _notify(self) -> None:
        try:
            await self._on_change()
        except Exception:  # the watch must outlive any fault of one reload
            log.exception("reload after a file change failed")


def _directory_ids(directories: list[str]) -> list[tuple[int, int] | None]:
    ids: list[tuple[int, int] | None] = []
    for directory in directories:
        try:
            info = os.stat(directory)
            ids.append((info.st_dev, info.st_ino))
        except OSError:
            ids.append(None)
    return ids


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


class LiveReload:
    """The lifespan's handle on live reload: the file watch and SIGHUP, started and stopped together."""

    def __init__(self, holder: SnapshotHolder, environ: Mapping[str, str] | None = None) -> None:
        self.holder = holder
        self.watcher = ConfigWatcher(
            holder.watched_paths,
            lambda: holder.reload(reason="file changed"),
            mode=choose_mode(os.environ if environ is None else environ),
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._signal_tasks: set[asyncio.Task[bool]] = set()
        self._hup_installed = False

    @property
    def mode(self) -> str:
        return self.watcher.running

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self.watcher.run(self._stop), name="gateway-config-watch")
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._hup_installed = True
        except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
            # Not the main thread, or no SIGHUP on this platform: file events still work.
            log.info("SIGHUP will not reload here: %s", exc)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.holder.reload(force=True, reason="forced by SIGHUP"))
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    async def stop(self) -> None:
        if self._hup_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._hup_installed = False
        self._stop.set()
        pending = [t for t in (self._task, *self._signal_tasks) if t is not None]
        if not pending:
            return
        done, still_running = await asyncio.wait(pending, timeout=STOP_TIMEOUT_S)
        for task in still_running:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("live reload ended with a fault", exc_info=task.exception())
