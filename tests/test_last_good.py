"""A worker that starts while models.toml is broken serves the last good configuration.

granian respawns a worker that died; that worker loads the file from scratch.
These tests prove it serves the copy of the last good load instead of nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest

from conftest import CLIENT_KEY, GatewayFactory, backend_toml
from gateway.config.model import KeyEntry
from gateway.errors import GatewayError
from gateway.keys import hash_key, new_key, write_keys_file
from gateway.reload import LAST_GOOD_ENV, SnapshotHolder
from harness import StandIn, local_client

GOOD = """
[backends.local]
base_url = "http://127.0.0.1:9/v1"
[models."kept"]
backend = "local"
model = "kept-model"
"""
BROKEN = GOOD + '\n[models."typo"]\nbackend = "local"\nmodel = "x"\ncontex_window = 5\n'


def test_a_fresh_holder_serves_the_last_good_copy_and_shows_the_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A new holder (a respawned worker) on a broken file serves the copy of the last good load."""
    config = tmp_path / "models.toml"
    config.write_text(GOOD)
    environ = {LAST_GOOD_ENV: str(tmp_path / "last-good"), "GATEWAY_API_KEYS": "k"}
    first = SnapshotHolder(config, environ=environ)
    assert first.load()
    assert (tmp_path / "last-good" / "models.toml").read_text() == GOOD

    config.write_text(BROKEN)
    respawned = SnapshotHolder(config, environ=environ)
    with caplog.at_level(logging.ERROR, logger="gateway.reload"):
        assert not respawned.load()
    # Its error says what comes next, not that nothing serves.
    assert "this worker starts on the last good copy" in caplog.text and "nothing is serving" not in caplog.text
    assert respawned.load_last_good()
    assert respawned.current is not None and set(respawned.current.aliases) == {"kept"}
    assert respawned.last_error is not None and "contex_window" in respawned.last_error

    config.write_text(GOOD.replace('"kept"', '"fixed"'))
    assert respawned.load()
    assert set(respawned.current.aliases) == {"fixed"} and respawned.last_error is None


def keyed_holders(tmp_path: Path) -> tuple[Path, dict[str, str], str, str]:
    """models.toml naming keys.toml, which holds alice and bob; the environment of `gateway serve`'s workers."""
    alice, bob = new_key(), new_key()
    write_keys_file(tmp_path / "keys.toml", {"alice": KeyEntry(hash=hash_key(alice)), "bob": KeyEntry(hash=hash_key(bob))})
    config = tmp_path / "models.toml"
    config.write_text('[auth]\nkeys_file = "keys.toml"\n' + GOOD)
    return config, {LAST_GOOD_ENV: str(tmp_path / "last-good")}, alice, bob


def refused(holder: SnapshotHolder, key: str) -> bool:
    try:
        holder.keys.authenticate(f"Bearer {key}")
    except GatewayError:
        return True
    return False


def test_a_fresh_holder_keeps_the_keys_of_a_keys_file_that_vanished(tmp_path: Path) -> None:
    """A worker respawned after the keys file vanished took it for "not written yet" and refused every file
    key, while the other workers kept them; now it serves the last good copy's keys and shows why."""
    config, environ, alice, _ = keyed_holders(tmp_path)
    assert SnapshotHolder(config, environ=environ).load()
    copy = tmp_path / "last-good" / "keys.toml"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and stat.S_IMODE(copy.parent.stat().st_mode) == 0o700

    (tmp_path / "keys.toml").unlink()
    respawned = SnapshotHolder(config, environ=environ)
    assert not respawned.load() and respawned.load_last_good()
    assert respawned.keys.authenticate(f"Bearer {alice}").name == "alice"
    assert respawned.last_error is not None and "the keys file is gone" in respawned.last_error
    # Serving from the copy, a reload of models.toml still finds the file gone: the keys stay.
    config.write_text(config.read_text() + "\n")
    assert not respawned.load() and respawned.keys.authenticate(f"Bearer {alice}").name == "alice"

    # Without a copy (no worker of this run ever read the file) a missing keys file is only not written yet.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "models.toml").write_text(config.read_text())
    assert SnapshotHolder(fresh / "models.toml", environ={LAST_GOOD_ENV: str(fresh / "last-good")}).load()


def test_a_key_revoked_while_models_toml_is_broken_is_revoked(tmp_path: Path) -> None:
    """models.toml is read first: while it was broken, a key revoked (`gateway keys revoke --file`) stayed
    valid until it was mended, in every worker and in any worker respawned meanwhile."""
    config, environ, alice, bob = keyed_holders(tmp_path)
    holder = SnapshotHolder(config, environ=environ)
    assert holder.load()
    config.write_text(BROKEN)
    write_keys_file(tmp_path / "keys.toml", {"alice": KeyEntry(hash=hash_key(alice), enabled=False), "bob": KeyEntry(hash=hash_key(bob))})
    assert not holder.load()
    assert refused(holder, alice) and not refused(holder, bob)
    assert holder.last_error is not None and "contex_window" in holder.last_error
    assert holder.current is not None and set(holder.current.aliases) == {"kept"}

    respawned = SnapshotHolder(config, environ=environ)
    assert not respawned.load() and respawned.load_last_good()
    assert refused(respawned, alice) and not refused(respawned, bob)

    # A broken keys file, meanwhile, keeps the keys that serve, as ever.
    (tmp_path / "keys.toml").write_text("[keys.bob\n")
    assert not holder.load() and refused(holder, alice) and not refused(holder, bob)


def test_a_worker_started_on_the_copy_reads_the_keys_file_itself(tmp_path: Path) -> None:
    """A worker respawned while models.toml was broken served the copy's keys and watched the copy: a key
    revoked in the keys file stayed valid there, even after models.toml was mended, and keys added later
    were refused. It reads the keys file models.toml names, and leaves the copy once models.toml loads."""
    config, environ, alice, bob = keyed_holders(tmp_path)
    good = config.read_text()
    assert SnapshotHolder(config, environ=environ).load()
    config.write_text(BROKEN)
    respawned = SnapshotHolder(config, environ=environ)
    assert not respawned.load() and respawned.load_last_good()
    assert respawned.serving is not None and respawned.serving.keys_path == tmp_path / "keys.toml"

    carol = new_key()
    write_keys_file(tmp_path / "keys.toml", {
        "alice": KeyEntry(hash=hash_key(alice), enabled=False), "bob": KeyEntry(hash=hash_key(bob)), "carol": KeyEntry(hash=hash_key(carol)),
    })
    assert not respawned.load()  # models.toml is still broken: the keys file is read alone
    assert refused(respawned, alice) and not refused(respawned, carol)

    config.write_text(good)  # the same bytes as the copy's
    assert respawned.load() and respawned.last_error is None
    assert respawned.current is not None and respawned.current.source == str(config)
    assert refused(respawned, alice) and not refused(respawned, carol) and not refused(respawned, bob)


def test_a_keys_file_outside_the_folder_is_kept_too(tmp_path: Path) -> None:
    """A keys file named by an absolute path in another folder had no last-good copy: a worker respawned
    after it vanished refused every file key while the others took them."""
    elsewhere = tmp_path / "secrets"
    elsewhere.mkdir()
    alice = new_key()
    write_keys_file(elsewhere / "keys.toml", {"alice": KeyEntry(hash=hash_key(alice))})
    config = tmp_path / "models.toml"
    config.write_text(f'[auth]\nkeys_file = "{elsewhere / "keys.toml"}"\n' + GOOD)
    environ = {LAST_GOOD_ENV: str(tmp_path / "last-good")}
    assert SnapshotHolder(config, environ=environ).load()

    (elsewhere / "keys.toml").unlink()
    respawned = SnapshotHolder(config, environ=environ)
    assert not respawned.load() and respawned.load_last_good()
    assert respawned.keys.authenticate(f"Bearer {alice}").name == "alice"
    assert respawned.last_error is not None and "the keys file is gone" in respawned.last_error


def test_without_a_last_good_folder_a_broken_start_serves_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Outside `gateway serve` (no folder named) there is no copy to fall back to."""
    config = tmp_path / "models.toml"
    config.write_text(BROKEN)
    holder = SnapshotHolder(config, environ={})
    with caplog.at_level(logging.ERROR, logger="gateway.reload"):
        assert not holder.load() and not holder.load_last_good() and holder.current is None
    assert "nothing is serving" in caplog.text


def _wait_for(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_comes_back_serving_the_last_good_config(
    gateway_factory: GatewayFactory, standin: StandIn, tmp_path: Path
) -> None:
    """Kill the worker while models.toml is broken: granian starts a new one, which serves the old alias."""
    config_text = backend_toml(standin) + '[models."survivor"]\nbackend = "local"\nmodel = "last-good-survivor"\n'
    gateway = gateway_factory(config_text)
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": "survivor", "messages": [{"role": "user", "content": "hi"}]}
    with local_client(timeout_s=10.0) as client:
        assert client.post(f"{gateway.url}/v1/chat/completions", json=body, headers=auth).status_code == 200
        (tmp_path / "models.toml").write_text(config_text + "\n[models.broken\n")
        _wait_for(lambda: client.get(f"{gateway.url}/v1/gateway/status", headers=auth).json()["last_error"], 10, "the bad edit")
        old_pid = client.get(f"{gateway.url}/readyz").json()["pid"]

        os.kill(old_pid, signal.SIGKILL)
        ready = _wait_for(
            lambda: (r := client.get(f"{gateway.url}/readyz").json())["pid"] != old_pid and r["status"] == "ready" and r,
            20,
            "a respawned, ready worker",
        )
        assert ready["pid"] != old_pid
        answer = client.post(f"{gateway.url}/v1/chat/completions", json=body, headers=auth)
        assert answer.status_code == 200, answer.text
        status = client.get(f"{gateway.url}/v1/gateway/status", headers=auth).json()
        assert status["last_error"] and "TOML syntax error" in status["last_error"]
