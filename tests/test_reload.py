"""Load-and-swap logic of gateway.reload, without the watcher: fast and deterministic.

Each test writes models.toml into its temp dir and drives ``SnapshotHolder``
directly (``load`` on this thread, ``reload`` through asyncio), so what is
checked is what serves, what is refused and what is logged, not timing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.changes import ConfigChanges, diff_configs
from gateway.config import parse_config
from gateway.keys import hash_key
from gateway.reload import SnapshotHolder
from gateway.watch import choose_mode, filesystem_type, needs_polling, watched_files

BACKEND = '[backends.local]\nbase_url = "http://127.0.0.1:9/v1"\n'


def alias_toml(name: str, model: str | None = None, extra: str = "") -> str:
    return f'\n[models."{name}"]\nbackend = "local"\nmodel = "{model or name + "-upstream"}"\n{extra}'


GOOD = BACKEND + alias_toml("alpha")
# Each bad edit of GOOD, and the start of the location its error must give.
BAD_EDITS = {
    "toml_syntax": (GOOD + '\n[models."beta"\nbackend = "local"\n', r"models\.toml:8: TOML syntax error"),
    "unknown_key": (GOOD + "temprature = 0.2\n", r"models\.toml:7: models\.alpha\.temprature: unknown key"),
    "wrong_type": (GOOD + 'timeout_s = "30"\n', r"models\.toml:7: models\.alpha\.timeout_s: expected a number"),
    "dangling_alias": (
        GOOD + 'fallback = ["gamma"]\n',
        r"models\.toml:7: models\.alpha\.fallback\[0\]: unknown alias 'gamma'",
    ),
    "cycle": (
        GOOD + 'fallback = ["beta"]\n\n[models."beta"]\nroute = ["alpha"]\n',
        r"models\.toml:10: models\.beta\.route\[0\]: cycle through route/fallback",
    ),
    "half_written": (GOOD[: GOOD.index("model = ")] + 'model = "alp', r"models\.toml:\d+: TOML syntax error"),
}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def holder(config_path: Path) -> SnapshotHolder:
    holder = SnapshotHolder(config_path, environ={"GATEWAY_API_KEYS": "sk-a"})
    assert holder.load()
    return holder


def served_aliases(holder: SnapshotHolder) -> set[str]:
    assert holder.current is not None
    return set(holder.current.aliases)


# ---------------------------------------------------------------- swap


def test_load_serves_the_file_under_the_hash_of_its_bytes(holder: SnapshotHolder, config_path: Path) -> None:
    """The serving snapshot carries the SHA-256 of the exact bytes it was built from."""
    import hashlib

    assert holder.current is not None
    assert holder.current.content_hash == hashlib.sha256(config_path.read_bytes()).hexdigest()
    assert served_aliases(holder) == {"alpha"}
    assert holder.last_error is None


def test_identical_bytes_change_nothing(holder: SnapshotHolder, config_path: Path) -> None:
    """Rewriting the same bytes keeps the very same snapshot object serving."""
    before = holder.serving
    config_path.write_text(GOOD)
    assert holder.load() is False
    assert holder.serving is before


def test_forced_load_rebuilds_identical_bytes(holder: SnapshotHolder) -> None:
    """A forced load (SIGHUP) builds a new snapshot even when the bytes did not change."""
    before = holder.serving
    assert holder.load(force=True)
    assert holder.serving is not before
    assert holder.current is not None and before is not None
    assert holder.current.content_hash == before.snapshot.content_hash


def test_a_held_snapshot_is_untouched_by_a_reload(holder: SnapshotHolder, config_path: Path) -> None:
    """A request that read the snapshot before a reload keeps every alias it saw, removed ones included."""
    held = holder.current
    config_path.write_text(BACKEND + alias_toml("beta"))
    assert holder.load()
    assert served_aliases(holder) == {"beta"}
    assert held is not None and set(held.aliases) == {"alpha"}
    assert held.lookup("alpha").targets[0].model == "alpha-upstream"


def test_keys_swap_together_with_the_snapshot(config_path: Path) -> None:
    """The key ring and the snapshot are one object: a reload cannot show one without the other."""
    keys_file = config_path.parent / "keys.toml"
    keys_file.write_text(f'[keys.alice]\nhash = "{hash_key("sk-alice")}"\n')
    config_path.write_text('[auth]\nkeys_file = "keys.toml"\n' + GOOD)
    holder = SnapshotHolder(config_path, environ={})
    assert holder.load()
    serving = holder.serving
    assert serving is not None and serving.keys_path == keys_file
    assert holder.keys.authenticate("Bearer sk-alice").name == "alice"


def test_a_change_to_the_keys_file_alone_reloads(config_path: Path) -> None:
    """New keys file bytes with an unchanged models.toml make a new key work."""
    keys_file = config_path.parent / "keys.toml"
    keys_file.write_text(f'[keys.alice]\nhash = "{hash_key("sk-alice")}"\n')
    config_path.write_text('[auth]\nkeys_file = "keys.toml"\n' + GOOD)
    holder = SnapshotHolder(config_path, environ={})
    assert holder.load()
    assert holder.load() is False
    keys_file.write_text(keys_file.read_text() + f'\n[keys.bob]\nhash = "{hash_key("sk-bob")}"\n')
    assert holder.load()
    assert holder.keys.authenticate("Bearer sk-bob").name == "bob"


def test_a_keys_file_named_by_a_failed_edit_is_watched(holder: SnapshotHolder, config_path: Path) -> None:
    """When an edit names a keys file whose content is broken, that file is watched so fixing it reloads."""
    keys_file = config_path.parent / "keys.toml"
    keys_file.write_text("[keys.alice]\nhash = 42\n")
    config_path.write_text('[auth]\nkeys_file = "keys.toml"\n' + GOOD)
    assert holder.load() is False
    assert holder.last_error is not None and "keys.toml" in holder.last_error
    assert keys_file in holder.watched_paths()
    keys_file.write_text(f'[keys.alice]\nhash = "{hash_key("sk-alice")}"\n')
    assert holder.load()
    assert holder.keys.authenticate("Bearer sk-alice").name == "alice"


# ---------------------------------------------------------------- bad edits


@pytest.mark.parametrize("kind", sorted(BAD_EDITS))
def test_bad_edit_keeps_the_last_good_config(kind: str, holder: SnapshotHolder, config_path: Path) -> None:
    """A bad edit changes nothing but last_error, which names the file, line and table path."""
    text, location = BAD_EDITS[kind]
    before = holder.serving
    config_path.write_text(text)
    assert holder.load() is False
    assert holder.serving is before
    assert holder.last_error is not None and re.search(location, holder.last_error), holder.last_error
    assert holder.last_error_at is not None


def test_deleted_file_keeps_the_last_good_config(holder: SnapshotHolder, config_path: Path) -> None:
    """A deleted models.toml keeps the old aliases serving and says the file cannot be read."""
    before = holder.serving
    config_path.unlink()
    assert holder.load() is False
    assert holder.serving is before
    assert holder.last_error is not None and re.search(r"models\.toml: cannot read the file", holder.last_error)


@pytest.mark.parametrize("kind", sorted(BAD_EDITS))
def test_good_write_after_a_bad_edit_clears_the_error(kind: str, holder: SnapshotHolder, config_path: Path) -> None:
    """The next good write after a bad edit is served and clears last_error."""
    config_path.write_text(BAD_EDITS[kind][0])
    holder.load()
    config_path.write_text(GOOD + alias_toml("beta"))
    assert holder.load()
    assert holder.last_error is None and holder.last_error_at is None
    assert served_aliases(holder) == {"alpha", "beta"}


def test_undoing_a_bad_edit_clears_the_error(holder: SnapshotHolder, config_path: Path) -> None:
    """Restoring the exact bytes that serve after a bad edit clears last_error without a new snapshot."""
    before = holder.serving
    config_path.write_text(BAD_EDITS["wrong_type"][0])
    holder.load()
    assert holder.last_error is not None
    config_path.write_text(GOOD)
    assert holder.load() is False
    assert holder.serving is before
    assert holder.last_error is None and holder.last_error_at is None


def test_a_bad_edit_is_logged_once(holder: SnapshotHolder, config_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same error seen again (several events, the same bad save) is logged once; a new error is logged."""
    caplog.set_level(logging.INFO, logger="gateway.reload")
    config_path.write_text(BAD_EDITS["unknown_key"][0])
    for _ in range(3):
        holder.load()
    config_path.write_text(BAD_EDITS["wrong_type"][0])
    holder.load()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "models.alpha.temprature" in errors[0] and "models.alpha.timeout_s" in errors[1]


def test_no_valid_config_at_start_serves_nothing_but_says_why(tmp_path: Path) -> None:
    """A holder whose first load fails has no snapshot, an error, and still accepts GATEWAY_API_KEYS."""
    path = tmp_path / "models.toml"
    path.write_text(BAD_EDITS["cycle"][0])
    holder = SnapshotHolder(path, environ={"GATEWAY_API_KEYS": "sk-a"})
    assert holder.load() is False
    assert holder.current is None and holder.last_error is not None
    assert holder.keys.authenticate("Bearer sk-a").name.startswith("env-key-")


# ---------------------------------------------------------------- unset backend keys


def test_unset_api_key_env_is_a_warning_not_a_bad_edit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A backend whose api_key_env is unset loads, is marked unconfigured, and is warned about once."""
    caplog.set_level(logging.INFO, logger="gateway.reload")
    path = tmp_path / "models.toml"
    cloud = '\n[backends.cloud]\nbase_url = "https://example.invalid/v1"\napi_key_env = "GW_TEST_CLOUD_KEY"\n'
    path.write_text(GOOD + cloud + '\n[models."big"]\nbackend = "cloud"\nmodel = "big"\n')
    holder = SnapshotHolder(path, environ={})
    assert holder.load()
    assert holder.last_error is None
    assert holder.current is not None and dict(holder.current.unconfigured_backends) == {"cloud": "GW_TEST_CLOUD_KEY"}
    path.write_text(path.read_text() + alias_toml("beta"))
    assert holder.load()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GW_TEST_CLOUD_KEY" in warnings[0]


# ---------------------------------------------------------------- change summary


def test_a_good_reload_logs_what_changed(
    holder: SnapshotHolder, config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reload line names aliases added, removed and changed, and backends changed."""
    caplog.set_level(logging.INFO, logger="gateway.reload")
    config_path.write_text(GOOD + alias_toml("gamma"))
    holder.load()
    edited = BACKEND.replace(":9/", ":10/") + alias_toml("alpha", model="alpha-2") + alias_toml("delta")
    config_path.write_text(edited)
    holder.load()
    line = caplog.records[-1].getMessage()
    assert "reloaded" in line
    assert "aliases added: delta" in line
    assert "aliases removed: gamma" in line
    assert "aliases changed: alpha" in line
    assert "backends changed: local" in line


def test_a_comment_only_edit_says_nothing_changed(
    holder: SnapshotHolder, config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """New bytes with the same meaning reload, and the log line says nothing in effect changed."""
    caplog.set_level(logging.INFO, logger="gateway.reload")
    config_path.write_text("# a comment\n" + GOOD)
    assert holder.load()
    assert "nothing in effect changed" in caplog.records[-1].getMessage()


NAMES = st.sets(st.sampled_from(["a", "b", "c", "d", "e", "f"]))


@given(old=NAMES, new=NAMES, changed=NAMES)
def test_diff_configs_sorts_every_alias_into_one_kind(old: set[str], new: set[str], changed: set[str]) -> None:
    """Every alias of either config is added, removed, changed or unchanged, exactly as the two files say."""
    def config(names: set[str], retarget: set[str]) -> str:
        return BACKEND + "".join(alias_toml(n, model=f"{n}-v2" if n in retarget else None) for n in sorted(names))

    if not old or not new:
        return  # a models.toml without aliases is refused by the loader
    diff = diff_configs(parse_config(config(old, set()).encode()), parse_config(config(new, changed).encode()))
    assert set(diff.aliases_added) == new - old
    assert set(diff.aliases_removed) == old - new
    assert set(diff.aliases_changed) == old & new & changed
    assert diff.backends_changed == ()
    assert diff.empty == (old == new and not (old & changed))


def test_change_summary_of_nothing_says_so() -> None:
    """An empty change set describes itself as no change in effect."""
    assert ConfigChanges().describe().startswith("nothing in effect changed")
    assert ConfigChanges(backends_changed=("local",), keys_file_changed=True).describe() == (
        "backends changed: local; keys file changed"
    )


# ---------------------------------------------------------------- the async path


def test_reload_compiles_off_the_event_loop_thread(holder: SnapshotHolder, config_path: Path) -> None:
    """reload() reads and parses in a worker thread, and swaps on the loop's thread."""
    loop_thread = threading.get_ident()
    prepare_threads: list[int] = []
    original = holder.prepare

    def spying_prepare(*, force: bool = False):  # type: ignore[no-untyped-def]
        prepare_threads.append(threading.get_ident())
        return original(force=force)

    holder.prepare = spying_prepare  # type: ignore[method-assign]
    config_path.write_text(GOOD + alias_toml("beta"))
    assert asyncio.run(holder.reload())
    assert prepare_threads and prepare_threads[0] != loop_thread
    assert served_aliases(holder) == {"alpha", "beta"}


def test_concurrent_reloads_run_one_after_the_other(holder: SnapshotHolder, config_path: Path) -> None:
    """Reloads started together never overlap, and the last one serves the file as it now is."""
    inside = 0
    overlaps = 0
    guard = threading.Lock()
    original = holder.prepare

    def counting_prepare(*, force: bool = False):  # type: ignore[no-untyped-def]
        nonlocal inside, overlaps
        with guard:
            inside += 1
            overlaps += inside > 1
        try:
            return original(force=force)
        finally:
            with guard:
                inside -= 1

    holder.prepare = counting_prepare  # type: ignore[method-assign]

    async def many() -> list[bool]:
        config_path.write_text(GOOD + alias_toml("beta"))
        return await asyncio.gather(*(holder.reload(force=True) for _ in range(8)))

    assert all(asyncio.run(many()))
    assert overlaps == 0
    assert served_aliases(holder) == {"alpha", "beta"}


# ---------------------------------------------------------------- watch decisions (pure)

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /srv rw,relatime shared:2 - nfs4 nas:/export rw
41 40 0:36 / /srv/local rw,relatime shared:3 - ext4 /dev/sdb1 rw
42 22 0:37 / /mnt/my\\040share rw - fuse.sshfs host:/x rw
"""


@pytest.mark.parametrize(
    ("path", "fs_type"),
    [
        ("/etc/gateway", "ext4"),
        ("/srv/gw", "nfs4"),
        ("/srv/local/gw", "ext4"),
        ("/srvx", "ext4"),
        ("/mnt/my share/g", "fuse.sshfs"),
    ],
)
def test_filesystem_type_takes_the_deepest_mount(path: str, fs_type: str) -> None:
    """The file system of a path is that of the longest mount point containing it."""
    assert filesystem_type(path, MOUNTINFO) == fs_type


def test_network_and_fuse_file_systems_are_polled() -> None:
    """NFS, CIFS and FUSE directories are polled; local ones use inotify."""
    assert needs_polling("nfs4") and needs_polling("cifs") and needs_polling("fuse.sshfs")
    assert not needs_polling("ext4") and not needs_polling("tmpfs") and not needs_polling(None)


def test_watch_mode_comes_from_the_environment() -> None:
    """GATEWAY_WATCH picks the mode; watchfiles' own polling switch means poll; nonsense means auto."""
    assert choose_mode({}) == "auto"
    assert choose_mode({"GATEWAY_WATCH": "off"}) == "off"
    assert choose_mode({"GATEWAY_WATCH": "POLL"}) == "poll"
    assert choose_mode({"WATCHFILES_FORCE_POLLING": "1"}) == "poll"
    assert choose_mode({"GATEWAY_WATCH": "sometimes"}) == "auto"


def test_watched_files_include_a_symlink_and_its_target(tmp_path: Path) -> None:
    """A symlinked models.toml is watched under its own name and where it points."""
    target = tmp_path / "real" / "models.toml"
    target.parent.mkdir()
    target.write_text(GOOD)
    link = tmp_path / "models.toml"
    os.symlink(target, link)
    assert watched_files([link]) == {str(link), str(target)}
