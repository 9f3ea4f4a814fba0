"""Target health shared by the workers of one `gateway serve` (gateway.shared_health).

The board's rules (gateway.health) are the same whichever store holds the state:
a property runs any sequence of events on a board in memory and one on the shared
table and compares them. Then two boards on one table, as two workers: failures
count together, a cooldown is everyone's, one probe between them. And a live
`gateway serve --workers 2` against a failing upstream.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CLIENT_KEY, GatewayFactory, backend_toml
from gateway import shared_health
from gateway.health import HealthBoard
from gateway.shared_health import ENTRY, SharedHealth
from harness import StandIn, local_client, process_gone

# (backend, model, connection fingerprint), as ``Target.key`` makes them.
KEYS = [("spark", "qwen", "f1"), ("cloud", "gemma", "f2"), ("cloud", "gpt", "f2")]
EVENTS = st.lists(
    st.tuples(st.sampled_from(["admit", "failed", "succeeded", "pause", "released", "cooling_for"]), st.sampled_from(KEYS)),
    max_size=30,
)


def states(board: HealthBoard) -> list[tuple[object, ...]]:
    return [(r["backend"], r["model"], r["state"], r["consecutive_failures"], r["failures"], r["cooldowns"], r["last_error"]) for r in board.report()]


@settings(max_examples=60, deadline=None)
@given(events=EVENTS)
def test_the_shared_table_keeps_the_boards_rules(events: list[tuple[str, tuple[str, str, str]]], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any sequence of events gives the same answers and the same report from either store. Cooldowns
    are long, so the two boards' clocks, read a moment apart, cannot disagree."""
    local, shared = HealthBoard(), HealthBoard(SharedHealth(tmp_path_factory.mktemp("health")))
    for index, (event, key) in enumerate(events):
        answers = []
        for board in (local, shared):
            if event == "admit":
                answers.append(board.admit(key, probe_window_s=600) > 0)
            elif event == "cooling_for":
                answers.append(board.cooling_for(key) > 0)
            elif event == "failed":
                board.failed(key, f"error {index}", failures_to_cool=2, cooldown_s=600)
            elif event == "pause":
                board.pause(key, f"pause {index}", 600)
            elif event == "succeeded":
                board.succeeded(key)
            else:
                board.released(key)
        assert len(set(answers)) <= 1, (event, key, answers)
    assert states(local) == states(shared)


def test_two_workers_count_failures_together_and_share_the_cooldown(tmp_path: Path) -> None:
    first, second = HealthBoard(SharedHealth(tmp_path)), HealthBoard(SharedHealth(tmp_path))
    key = KEYS[0]
    first.failed(key, "connect refused", failures_to_cool=3, cooldown_s=0.2)
    second.failed(key, "connect refused", failures_to_cool=3, cooldown_s=0.2)
    assert first.admit(key, 5) == 0 and second.admit(key, 5) == 0
    first.failed(key, "HTTP 503", failures_to_cool=3, cooldown_s=0.2)  # the third in a row, over both workers
    assert second.admit(key, 5) > 0 and first.admit(key, 5) > 0
    (row,) = second.report()
    assert (row["state"], row["consecutive_failures"], row["last_error"]) == ("cooling_down", 3, "HTTP 503")
    time.sleep(0.25)
    assert [first.admit(key, 5), second.admit(key, 5)][0] == 0  # the first to ask is the probe ...
    assert second.admit(key, 5) > 0  # ... and the only one
    first.released(key)  # that probe ended without a verdict: another worker may probe
    assert second.admit(key, 5) == 0 and first.admit(key, 5) > 0
    second.succeeded(key)
    assert first.admit(key, 5) == 0 and first.cooling_for(key) == 0
    rows = [next(first.report()), next(second.report())]
    assert [row["state"] for row in rows] == ["healthy", "healthy"]
    assert [row["successes"] for row in rows] == [0, 1]  # successes are each worker's own


def test_a_probe_whose_worker_died_is_taken_over(tmp_path: Path) -> None:
    """A worker killed while its probe ran left the target skipped by every other worker for the probe's
    whole window (the alias's timeout_s, 240 s for a cloud alias). Killed but not yet reaped it is a zombie,
    still there to signal: it counts as gone too. A probe of a living worker is still everyone's."""
    board, key = HealthBoard(SharedHealth(tmp_path)), KEYS[0]
    board.pause(key, "HTTP 429", 0.05)
    time.sleep(0.1)
    prober = multiprocessing.get_context("fork").Process(target=_probe_then_wait, args=(tmp_path, key))
    prober.start()
    try:
        deadline = time.monotonic() + 10
        while board.cooling_for(key) == 0 and time.monotonic() < deadline:  # until the child holds the probe
            time.sleep(0.01)
        assert board.admit(key, 600) > 0 and board.cooling_for(key) > 500  # its probe runs: skipped
        assert prober.pid is not None
        os.kill(prober.pid, signal.SIGKILL)
        while not process_gone(prober.pid) and time.monotonic() < deadline:  # dead, not yet reaped
            time.sleep(0.01)
        assert board.cooling_for(key) == 0
        assert board.admit(key, 600) == 0  # this worker now runs the probe ...
        assert HealthBoard(SharedHealth(tmp_path)).admit(key, 600) > 0  # ... and the others skip it
    finally:
        prober.kill()
        prober.join(5)


def _probe_then_wait(directory: Path, key: tuple[str, str, str]) -> None:
    assert HealthBoard(SharedHealth(directory)).admit(key, 600) == 0
    time.sleep(60)


def test_long_names_and_errors_are_kept_cut_at_a_character(tmp_path: Path) -> None:
    board = HealthBoard(SharedHealth(tmp_path))
    key = ("cloud", "m" * 300, "f1")
    board.failed(key, "é" * 400, failures_to_cool=1, cooldown_s=60)
    assert board.admit(key, 5) > 0 and board.admit(("cloud", "m" * 299, "f1"), 5) == 0
    (row,) = HealthBoard(SharedHealth(tmp_path)).report()
    assert row["backend"] == "cloud" and row["model"] == "m" * (128 - len("cloud") - 1)
    assert row["last_error"] == "é" * 128


def test_workers_on_old_and_new_connections_count_apart_and_report_what_they_serve(tmp_path: Path) -> None:
    """Two workers a reload apart: the one still on the old URL keeps that target cooled, the one on the
    fixed URL calls its new target at once, and each status shows its own serving target only."""
    old, new = ("spark", "qwen", "old-url"), ("spark", "qwen", "fixed-url")
    before = HealthBoard(SharedHealth(tmp_path), serving_keys=lambda: {old})
    after = HealthBoard(SharedHealth(tmp_path), serving_keys=lambda: {new})
    before.failed(old, "connect: connection refused", failures_to_cool=1, cooldown_s=60)
    assert before.admit(old, 5) > 0 and after.admit(new, 5) == 0
    after.succeeded(new)
    assert [(row["state"], row["last_error"]) for row in before.report()] == [("cooling_down", "connect: connection refused")]
    assert [(row["state"], row["last_error"], row["successes"]) for row in after.report()] == [("healthy", None, 1)]
    assert list(HealthBoard(SharedHealth(tmp_path), serving_keys=lambda: None).report())  # nothing serving: all known


def test_a_serving_target_with_a_long_name_is_reported_by_its_key(tmp_path: Path) -> None:
    """The report reads a serving target by its whole key, so a name cut short in the table still shows."""
    key = ("cloud", "m" * 300, "f1")
    HealthBoard(SharedHealth(tmp_path)).failed(key, "down", failures_to_cool=1, cooldown_s=60)
    (row,) = HealthBoard(SharedHealth(tmp_path), serving_keys=lambda: {key}).report()
    assert (row["model"], row["state"], row["last_error"]) == ("m" * 300, "cooling_down", "down")


def test_a_full_table_keeps_what_it_cannot_hold_in_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shared_health, "ENTRIES", 2)
    monkeypatch.setattr(shared_health, "TABLE_BYTES", 2 * ENTRY.size)
    board = HealthBoard(SharedHealth(tmp_path))
    with caplog.at_level(logging.WARNING, logger="gateway.health"):
        for key in KEYS:
            board.failed(key, "down", failures_to_cool=1, cooldown_s=60)
    assert all(board.admit(key, 5) > 0 for key in KEYS)
    assert "shared table is full" in caplog.text
    assert {(row["backend"], row["model"]) for row in board.report()} == {key[:2] for key in KEYS}


def test_one_process_keeps_its_own(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert SharedHealth.from_environment({}) is None
    with caplog.at_level(logging.WARNING, logger="gateway.health"):
        assert SharedHealth.from_environment({"GATEWAY_SHARED_DIR": str(tmp_path / "gone")}) is None
    assert "cannot map the workers' shared table" in caplog.text


def test_two_workers_call_a_failing_target_as_one(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """`gateway serve --workers 2`, cooldown after 2 failures: however the requests spread over the
    workers, the failing upstream gets 2 calls, not 2 per worker, and then both skip it."""
    config = (
        "[routing]\ncooldown_failures = 2\ncooldown_s = 60\n\n"
        + backend_toml(standin, "hback")
        + '\n[models."h-down"]\nbackend = "hback"\nmodel = "h-up-down"\nretries = 0\n'
    )
    standin.script("h-up-down", [{"kind": "status", "status": 503}])
    gateway = gateway_factory(config, workers=2)
    gateway.wait_for_workers(2)
    body = {"model": "h-down", "messages": [{"role": "user", "content": "are you there"}]}
    served_by: Counter[int] = Counter()
    statuses: list[int] = []
    while min(served_by.values(), default=0) < 3 or len(served_by) < 2:
        assert len(statuses) < 200, served_by
        with local_client() as fresh:  # a new connection each time, until each worker has answered 3
            statuses.append(fresh.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}).status_code)
            served_by[int(fresh.get(f"{gateway.url}/readyz").json()["pid"])] += 1
    calls = [r for r in standin.requests() if r["body"] and r["body"].get("model") == "h-up-down"]
    assert len(calls) == 2, (len(calls), served_by)
    assert statuses[:2] == [502, 502] and set(statuses[2:]) == {503}
    with httpx.Client(trust_env=False) as client:
        rows = client.get(f"{gateway.url}/v1/gateway/status", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).json()["targets"]
    assert [(row["model"], row["state"], row["failures"]) for row in rows] == [("h-up-down", "cooling_down", 2)]
