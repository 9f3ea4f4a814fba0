"""A worker that starts while models.toml is broken serves the last good configuration.

granian respawns a worker that died; that worker loads the file from scratch.
These tests prove it serves the copy of the last good load instead of nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from conftest import CLIENT_KEY, GatewayFactory, backend_toml
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
