"""The fault matrix: each upstream fault, streaming and not, through a real gateway and the stand-in.

One gateway serves the whole module. Every fault has its own aliases per mode
(``p-<fault>-<mode>`` falling back to ``b-<fault>-<mode>``, and a ``solo-``
alias with no fallback), each on its own upstream model id, so scripts, request
logs and target health never mix. Every test asserts what the client got, how
many calls the stand-in saw and how far apart, and that afterwards the gateway
is healthy (``/healthz``, a plain request served) with no upstream request left
in flight.

Set ``FAULT_REPORT=<file>`` to have the module write its measurements as the
markdown table the issue asks for.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from conftest import backend_toml
from harness import (
    LISTENING_LINE,
    STANDIN_SCRIPT,
    GatewayProcess,
    ManagedProcess,
    StandIn,
    free_port,
    local_client,
    start_gateway,
)

CLIENT_KEY = "sk-test-client"
UPSTREAM_KEY = "sk-test-upstream"
RUN = uuid.uuid4().hex[:6]
MODES = ("nonstream", "stream")
FAULTS = (
    "500-once", "503-always", "429-plain", "429-retry-after", "429-long-retry-after", "reset", "hang",
    "slow-first-byte", "stream-cut", "stream-stall", "malformed", "no-done", "error-event",
    "context-openai", "context-vllm", "context-llamacpp", "content-filter", "invalid-json", "deep-json", "down-and-back",
)
FIRST_BYTE_S, IDLE_S, TOTAL_S = 1.0, 1.0, 3.0
COOLDOWN_S = 1.5
# A backend per mode on a port where nothing listens yet: the "down, then back" upstream.
REVIVED_PORTS = {mode: free_port() for mode in MODES}


def upstream_id(alias: str) -> str:
    return f"{RUN}-{alias}"


def gateway_config(standin: StandIn) -> str:
    lines = [
        "[routing]",
        "backoff_s = 0.05",
        "backoff_max_s = 0.2",
        "retry_after_max_s = 2",
        "cooldown_failures = 3",
        f"cooldown_s = {COOLDOWN_S}",
        "",
        backend_toml(standin, connect_timeout_s=1, first_byte_timeout_s=FIRST_BYTE_S, idle_timeout_s=IDLE_S, timeout_s=TOTAL_S),
    ]

    def entry(alias: str, *extra: str) -> None:
        lines.extend([f'[models."{alias}"]', 'backend = "local"', f'model = "{upstream_id(alias)}"', *extra, ""])

    entry("plain")
    for mode, port in REVIVED_PORTS.items():
        lines.extend([
            f"[backends.revived-{mode}]", f'base_url = "http://127.0.0.1:{port}/v1"', 'api_key_env = "STANDIN_KEY"',
            "connect_timeout_s = 1", f"first_byte_timeout_s = {FIRST_BYTE_S}", f"timeout_s = {TOTAL_S}", "",
            f'[models."p-revived-{mode}"]', f'backend = "revived-{mode}"', f'model = "{upstream_id(f"p-revived-{mode}")}"',
            f'fallback = ["b-revived-{mode}"]', "",
        ])
        entry(f"b-revived-{mode}")
    for fault in FAULTS:
        for mode in MODES:
            entry(f"p-{fault}-{mode}", f'fallback = ["b-{fault}-{mode}"]')
            entry(f"b-{fault}-{mode}")
            entry(f"solo-{fault}-{mode}")
    for mode in MODES:
        entry(f"nano-{mode}", 'output = ["image", "text"]', 'params = { modalities = ["image", "text"] }')
        entry(f"big-{mode}", 'output = ["image", "text"]', 'params = { modalities = ["image", "text"] }')
        lines.extend([f'[models."image-gen-{mode}"]', f'route = ["nano-{mode}", "big-{mode}"]', ""])
    return "\n".join(lines)


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("faults")
    config = directory / "models.toml"
    config.write_text(gateway_config(standin))
    env = {"GATEWAY_API_KEYS": CLIENT_KEY, "STANDIN_KEY": UPSTREAM_KEY}
    with start_gateway(config, env=env, log_dir=directory) as running:
        yield running


@pytest.fixture(scope="module")
def report() -> Iterator[list[list[str]]]:
    rows: list[list[str]] = []
    yield rows
    target = os.environ.get("FAULT_REPORT")
    if target and rows:
        header = "| fault | mode | client got | upstream calls (gaps) | time |\n|---|---|---|---|---|\n"
        Path(target).write_text(header + "".join("| " + " | ".join(row) + " |\n" for row in rows))


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=15.0) as http:
        yield http


@attrs.frozen
class Outcome:
    """What the client got."""

    status: int
    headers: httpx.Headers
    text: str
    elapsed_s: float
    events: list[str]   # SSE data payloads, for a 200 stream

    @property
    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def error_events(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]" and "error" in json.loads(e)]

    @property
    def content(self) -> str:
        if not self.events:
            return str(self.json["choices"][0]["message"]["content"])
        pieces = []
        for payload in self.events:
            event = json.loads(payload) if payload != "[DONE]" else {}
            for choice in event.get("choices") or ():
                pieces.append(choice.get("delta", {}).get("content") or "")
        return "".join(pieces)


def chat(client: httpx.Client, gateway: GatewayProcess, alias: str, mode: str, **extra: Any) -> Outcome:
    body = {"model": alias, "messages": [{"role": "user", "content": f"fault test {alias}"}], **extra}
    if mode == "stream":
        body["stream"] = True
    started = time.monotonic()
    with client.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"}
    ) as response:
        text = response.read().decode()
    elapsed = time.monotonic() - started
    events: list[str] = []
    if response.status_code == 200 and mode == "stream":
        assert response.headers["content-type"].startswith("text/event-stream")
        assert text.endswith("\n\n"), text[-200:]
        for event in text[:-2].split("\n\n"):
            assert event.startswith("data: "), event
            events.append(event[len("data: "):])
    return Outcome(response.status_code, response.headers, text, elapsed, events)


def calls(standin: StandIn, alias: str) -> list[float]:
    """Arrival times of the stand-in's requests for this alias's upstream model."""
    model = upstream_id(alias)
    return [r["t"] for r in standin.requests() if r["model"] == model]


def cancelled_calls(standin: StandIn, alias: str, timeout_s: float = 3.0) -> list[dict[str, Any]]:
    """The stand-in's cancellations of this alias's calls, waiting a little for the first to be recorded."""
    deadline = time.monotonic() + timeout_s
    while not (found := [c for c in standin.connections()["cancelled"] if c["model"] == upstream_id(alias)]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return found


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in itertools.pairwise(times)]


def script(standin: StandIn, alias: str, *steps: dict[str, Any]) -> None:
    standin.script(upstream_id(alias), list(steps))


def assert_healthy_afterwards(client: httpx.Client, gateway: GatewayProcess, standin: StandIn) -> None:
    """No upstream request is left in flight, and the gateway still answers."""
    deadline = time.monotonic() + 3.0
    while standin.connections()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert standin.connections()["in_flight"] == 0
    assert client.get(f"{gateway.url}/healthz").status_code == 200
    ok = chat(client, gateway, "plain", "nonstream")
    assert ok.status == 200, ok.text


def record(report: list[list[str]], fault: str, mode: str, got: Outcome, upstream: str) -> None:
    if got.status != 200:
        what = f"{got.status} `{got.json['error']['code']}`"
    elif got.events:
        ending = "`[DONE]`" if got.done else "error event `" + got.error_events[-1]["error"]["code"] + "`, no `[DONE]`"
        what = f"200 SSE from `{got.headers['x-gateway-served-by']}`, {ending}"
    else:
        what = f"200 from `{got.headers['x-gateway-served-by']}`"
    attempts = got.headers.get("x-gateway-attempts", "-")
    report.append([fault, mode, what, f"{attempts}: {upstream}", seconds(got.elapsed_s)])


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def describe_calls(standin: StandIn, *aliases: str) -> str:
    parts = []
    for alias in aliases:
        times = calls(standin, alias)
        if times:
            spacing = f" {gaps(times)} s apart" if len(times) > 1 else ""
            parts.append(f"{alias.split('-')[0]}×{len(times)}{spacing}")
    return ", ".join(parts) or "none"


# ------------------------------------------------------------------ transient faults: retry


@pytest.mark.parametrize("mode", MODES)
def test_500_once_then_fine_is_retried_on_the_same_target(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A 500 once then fine: two calls to the primary a short backoff apart, the primary's answer served."""
    primary = f"p-500-once-{mode}"
    script(standin, primary, {"kind": "status", "status": 500}, {"kind": "ok"})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary
    assert got.headers["x-gateway-attempts"] == "2"
    times = calls(standin, primary)
    assert len(times) == 2 and 0.02 <= times[1] - times[0] < 1.0
    assert calls(standin, f"b-500-once-{mode}") == []
    if mode == "stream":
        assert got.done
    else:
        assert got.json["model"] == primary
    record(report, "500 once, then fine", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_503_always_retries_once_then_moves_on_and_alone_is_502(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """503 always: the primary is called twice, then the fallback serves; with no fallback the 502 lists every attempt."""
    primary, backup, solo = f"p-503-always-{mode}", f"b-503-always-{mode}", f"solo-503-always-{mode}"
    script(standin, primary, {"kind": "status", "status": 503, "format": "vllm"})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == backup
    assert got.headers["x-gateway-attempts"] == "3"
    assert len(calls(standin, primary)) == 2 and len(calls(standin, backup)) == 1
    record(report, "503 always (with fallback)", mode, got, describe_calls(standin, primary, backup))

    script(standin, solo, {"kind": "status", "status": 503, "message": f"overloaded, key {UPSTREAM_KEY} at {standin.base_url}"})
    failed = chat(client, gateway, solo, mode)
    error = failed.json["error"]
    assert failed.status == 502 and error["code"] == "upstream_error"
    assert error["message"].count(f"{solo}: 503 (overloaded") == 2
    assert UPSTREAM_KEY not in failed.text and standin.base_url not in failed.text and f":{standin.port}" not in failed.text
    assert failed.headers["x-gateway-attempts"] == "2"
    times = calls(standin, solo)
    assert len(times) == 2 and times[1] - times[0] < 1.0
    record(report, "503 always (no fallback)", mode, failed, describe_calls(standin, solo))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_429_without_retry_after_is_retried_after_backoff(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A 429 without Retry-After is retried after the jittered backoff, then served."""
    primary = f"p-429-plain-{mode}"
    script(standin, primary, {"kind": "status", "status": 429}, {"kind": "ok"})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary
    times = calls(standin, primary)
    assert len(times) == 2 and 0.02 <= times[1] - times[0] < 1.0
    record(report, "429 without Retry-After", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_429_with_retry_after_that_fits_waits_that_long(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A 429 with `Retry-After: 1` (within retry_after_max_s and the budget) is retried no sooner than 1 s later."""
    primary = f"p-429-retry-after-{mode}"
    script(standin, primary, {"kind": "status", "status": 429, "retry_after": 1}, {"kind": "ok"})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary
    times = calls(standin, primary)
    assert len(times) == 2 and 0.95 <= times[1] - times[0] < 2.0
    record(report, "429 with Retry-After: 1", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_429_with_long_retry_after_moves_on_and_pauses_the_target(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A Retry-After longer than retry_after_max_s moves on at once, and the next request skips the paused primary."""
    primary, backup = f"p-429-long-retry-after-{mode}", f"b-429-long-retry-after-{mode}"
    script(standin, primary, {"kind": "status", "status": 429, "retry_after": 30})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == backup
    assert got.elapsed_s < 1.0 and len(calls(standin, primary)) == 1
    record(report, "429 with Retry-After: 30", mode, got, describe_calls(standin, primary, backup))
    again = chat(client, gateway, primary, mode)
    assert again.headers["x-gateway-served-by"] == backup and again.headers["x-gateway-attempts"] == "1"
    assert len(calls(standin, primary)) == 1
    status = client.get(f"{gateway.url}/v1/gateway/status", headers={"authorization": f"Bearer {CLIENT_KEY}"}).json()
    row = next(t for t in status["targets"] if t["model"] == upstream_id(primary))
    assert row["state"] == "cooling_down" and 0 < row["cooldown_remaining_s"] <= COOLDOWN_S
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_reset_before_headers_is_retried(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A connection reset before any header is retried on the same target, which then answers."""
    primary = f"p-reset-{mode}"
    script(standin, primary, {"kind": "reset"}, {"kind": "ok"})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary
    times = calls(standin, primary)
    assert len(times) == 2 and times[1] - times[0] < 1.0
    record(report, "reset before headers", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_invalid_json_answer_is_retried(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A 200 whose body is not JSON (nor an event stream) is retried, then served."""
    primary = f"p-invalid-json-{mode}"
    script(standin, primary, {"kind": "invalid_json"}, {"kind": "ok"})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary
    assert len(calls(standin, primary)) == 2
    record(report, "200 with a body that is not JSON", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_nested_past_any_reader_is_junk_not_a_fault_of_the_gateway(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """An answer (or a chunk) nested 5,000 arrays deep is valid JSON that no reader follows: a plain
    answer is retried like any unreadable body, a stream drops that chunk and goes on; never a 500."""
    primary = f"p-deep-json-{mode}"
    script(standin, primary, {"kind": "deep_json", "depth": 5000}, {"kind": "ok"})
    before = malformed_total(client, gateway, primary)
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary
    if mode == "stream":
        assert len(calls(standin, primary)) == 1 and got.done and not got.error_events
        assert "x_deep" not in got.text and all(f"stand-in part {i}" in got.content for i in range(1, 6))
        assert malformed_total(client, gateway, primary) == before + 1
    else:
        assert len(calls(standin, primary)) == 2 and "x_deep" not in got.text
    record(report, "200 nested 5,000 deep", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


# ------------------------------------------------------------------ no answer in time: move on


@pytest.mark.parametrize("mode", MODES)
def test_no_response_moves_on_without_retry_and_closes_the_hung_call(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """An upstream that never answers: a stream moves on after the first-byte time, a plain call after its total; never retried."""
    primary, backup = f"p-hang-{mode}", f"b-hang-{mode}"
    script(standin, primary, {"kind": "hang", "hang_s": 30})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == backup
    assert got.headers["x-gateway-attempts"] == "2" and len(calls(standin, primary)) == 1
    waited = FIRST_BYTE_S if mode == "stream" else TOTAL_S
    assert waited - 0.1 <= got.elapsed_s < waited + 1.5
    assert cancelled_calls(standin, primary), "the hung upstream call was never closed"
    record(report, "no response (hang)", mode, got, describe_calls(standin, primary, backup))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_slow_first_byte(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A first byte after 1.5 s: a stream (1 s first-byte window) moves on; a plain call (3 s total) is served by the primary."""
    primary, backup = f"p-slow-first-byte-{mode}", f"b-slow-first-byte-{mode}"
    script(standin, primary, {"kind": "delay", "first_byte_ms": 1500})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and len(calls(standin, primary)) == 1
    if mode == "stream":
        assert got.headers["x-gateway-served-by"] == backup
        assert FIRST_BYTE_S - 0.1 <= got.elapsed_s < FIRST_BYTE_S + 1.0
    else:
        assert got.headers["x-gateway-served-by"] == primary
        assert 1.4 <= got.elapsed_s < 2.5
    record(report, "slow first byte (1.5 s)", mode, got, describe_calls(standin, primary, backup))
    assert_healthy_afterwards(client, gateway, standin)


# ------------------------------------------------------------------ faults after the first byte


@pytest.mark.parametrize("mode", MODES)
def test_stream_cut_mid_answer(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """Cut after two chunks: a stream ends with one error event and no [DONE]; a plain call sees a reset and moves on."""
    primary, backup = f"p-stream-cut-{mode}", f"b-stream-cut-{mode}"
    script(standin, primary, {"kind": "stream_cut", "after_chunks": 2, "interval_ms": 100})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200
    if mode == "stream":
        assert got.headers["x-gateway-served-by"] == primary and len(calls(standin, primary)) == 1
        assert "stand-in part 2" in got.content and not got.done
        assert len(got.error_events) == 1 and got.events[-1] == json.dumps(got.error_events[0], separators=(",", ":"))
        assert got.error_events[0]["error"]["code"] == "upstream_error"
    else:
        assert got.headers["x-gateway-served-by"] == backup and len(calls(standin, primary)) == 2
    record(report, "stream cut mid-answer", mode, got, describe_calls(standin, primary, backup))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_stream_stall(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A stall after two chunks: a stream ends after the idle gap with an upstream_timeout event; a plain call times out and moves on."""
    primary, backup = f"p-stream-stall-{mode}", f"b-stream-stall-{mode}"
    script(standin, primary, {"kind": "stream_stall", "after_chunks": 2, "stall_s": 30})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and len(calls(standin, primary)) == 1
    if mode == "stream":
        assert got.headers["x-gateway-served-by"] == primary and not got.done
        assert [e["error"]["code"] for e in got.error_events] == ["upstream_timeout"]
        assert IDLE_S - 0.1 <= got.elapsed_s < IDLE_S + 1.0
    else:
        assert got.headers["x-gateway-served-by"] == backup
        assert TOTAL_S - 0.1 <= got.elapsed_s < TOTAL_S + 1.5
    assert cancelled_calls(standin, primary), "the stalled upstream call was never closed"
    record(report, "stream stall", mode, got, describe_calls(standin, primary, backup))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_error_event_mid_stream(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """An upstream error event after two chunks ends the stream with our error event and no [DONE]."""
    primary = f"p-error-event-{mode}"
    # Chunks 100 ms apart: the first reaches the client before the error (arriving together, the gateway would still fall back).
    script(standin, primary, {"kind": "error_event", "after_chunks": 2, "interval_ms": 100})
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary and len(calls(standin, primary)) == 1
    if mode == "stream":
        assert not got.done and [e["error"]["code"] for e in got.error_events] == ["upstream_error"]
        assert "upstream overloaded" in got.error_events[0]["error"]["message"]
    record(report, "upstream error event mid-stream", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


def malformed_total(client: httpx.Client, gateway: GatewayProcess, alias: str) -> float:
    text = client.get(f"{gateway.url}/metrics").text
    for line in text.splitlines():
        if line.startswith("gateway_stream_malformed_chunks_total{") and f'alias="{alias}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("mode", MODES)
def test_malformed_chunk_is_dropped_and_the_stream_goes_on(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """One malformed chunk is dropped and counted; every good chunk and [DONE] still arrive."""
    primary = f"p-malformed-{mode}"
    script(standin, primary, {"kind": "malformed_chunk", "at": 2, "chunks": 4})
    before = malformed_total(client, gateway, primary)
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary and len(calls(standin, primary)) == 1
    if mode == "stream":
        assert got.done and not got.error_events and "not json" not in got.text
        assert all(f"stand-in part {i}" in got.content for i in range(1, 5))
        assert malformed_total(client, gateway, primary) == before + 1
    record(report, "malformed chunk", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_stream_without_done_is_finalised_with_its_usage(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """An upstream stream that ends without [DONE] is finalised at once with [DONE], its usage relayed."""
    primary = f"p-no-done-{mode}"
    script(standin, primary, {"kind": "no_done"})
    got = chat(client, gateway, primary, mode, stream_options={"include_usage": True} if mode == "stream" else None)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == primary
    if mode == "stream":
        assert got.done and not got.error_events and got.elapsed_s < 1.0
        usage = [json.loads(e)["usage"] for e in got.events[:-1] if json.loads(e).get("usage")]
        assert usage and usage[-1]["completion_tokens"] == 15
    record(report, "stream without [DONE]", mode, got, describe_calls(standin, primary))
    assert_healthy_afterwards(client, gateway, standin)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("dialect", ["openai", "vllm", "llamacpp"])
@pytest.mark.parametrize("mode", MODES)
def test_context_length_moves_on_once_and_alone_is_400(mode: str, dialect: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A context refusal (any dialect; llama.cpp's as a 500) moves on without a retry; alone it is 400 context_length_exceeded."""
    fault = f"context-{dialect}"
    primary, backup, solo = f"p-{fault}-{mode}", f"b-{fault}-{mode}", f"solo-{fault}-{mode}"
    step = {"kind": "context_length", "format": dialect, **({"status": 500} if dialect == "llamacpp" else {})}
    script(standin, primary, step)
    got = chat(client, gateway, primary, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == backup
    assert len(calls(standin, primary)) == 1 and got.headers["x-gateway-attempts"] == "2"
    record(report, f"context length ({dialect}{', as 500' if dialect == 'llamacpp' else ''})", mode, got, describe_calls(standin, primary, backup))
    script(standin, solo, step)
    alone = chat(client, gateway, solo, mode)
    assert alone.status == 400 and alone.json["error"]["code"] == "context_length_exceeded"
    assert alone.json["error"]["param"] == "messages" and len(calls(standin, solo)) == 1
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_content_filter_stops_with_the_upstream_status_and_reason(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A content-filter 400 stops the plan: one call, no fallback, the client gets 400 with the upstream's reason."""
    primary, backup = f"p-content-filter-{mode}", f"b-content-filter-{mode}"
    script(standin, primary, {"kind": "content_filter"})
    got = chat(client, gateway, primary, mode)
    error = got.json["error"]
    assert got.status == 400 and error["code"] == "upstream_rejected" and error["type"] == "invalid_request_error"
    assert "content management policy" in error["message"]
    assert got.headers["x-gateway-attempts"] == "1"
    assert len(calls(standin, primary)) == 1 and calls(standin, backup) == []
    record(report, "400 content filter", mode, got, describe_calls(standin, primary, backup))
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_image_alias_answer_without_image_moves_on(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A composite's image member answering 200 without an image moves on to the next member, whose image is served."""
    composite, nano, big = f"image-gen-{mode}", f"nano-{mode}", f"big-{mode}"
    script(standin, nano, {"kind": "no_image"})
    script(standin, big, {"kind": "ok"})
    got = chat(client, gateway, composite, mode)
    assert got.status == 200 and got.headers["x-gateway-served-by"] == big
    assert len(calls(standin, nano)) == 1 and len(calls(standin, big)) == 1
    if mode == "stream":
        assert got.done and "data:image/png;base64," in got.text and f'"model":"{big}"' in got.text
    else:
        assert got.json["model"] == big
        assert got.json["choices"][0]["message"]["images"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    record(report, "200 without image (image-gen)", mode, got, describe_calls(standin, nano, big))
    assert_healthy_afterwards(client, gateway, standin)


# ------------------------------------------------------------------ cooldown and recovery


@pytest.mark.parametrize("mode", MODES)
def test_primary_down_for_a_while_then_back(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]]) -> None:
    """A primary that keeps failing cools down and is skipped without calls; after the cooldown one probe finds it back and it serves."""
    primary, backup = f"p-down-and-back-{mode}", f"b-down-and-back-{mode}"
    status_url = f"{gateway.url}/v1/gateway/status"
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}

    def primary_state() -> dict[str, Any]:
        targets = client.get(status_url, headers=auth).json()["targets"]
        return next(t for t in targets if t["model"] == upstream_id(primary))

    script(standin, primary, {"kind": "status", "status": 503})
    started = time.monotonic()
    seen = []
    for _ in range(3):
        got = chat(client, gateway, primary, mode)
        assert got.status == 200 and got.headers["x-gateway-served-by"] == backup
        seen.append(len(calls(standin, primary)))
    # 2 calls (fail, retry), then 1 (the third failure cools it: no retry), then none.
    assert seen == [2, 3, 3]
    assert primary_state()["state"] == "cooling_down"

    script(standin, primary, {"kind": "ok"})
    deadline = time.monotonic() + COOLDOWN_S + 2
    while primary_state()["state"] == "cooling_down" and time.monotonic() < deadline:
        time.sleep(0.05)
    back = chat(client, gateway, primary, mode)
    assert back.status == 200 and back.headers["x-gateway-served-by"] == primary
    assert back.headers["x-gateway-attempts"] == "1" and len(calls(standin, primary)) == 4
    assert primary_state()["state"] == "healthy" and primary_state()["consecutive_failures"] == 0
    times = calls(standin, primary)
    assert times[3] - times[2] >= COOLDOWN_S - 0.1  # no call while it cooled down
    elapsed = time.monotonic() - started
    report.append([
        "primary down for a while, then back", mode,
        f"200 from `{backup}` ×3, then from `{primary}` after its cooldown",
        f"primary calls per request 2, 1, 0, 1 ({gaps(times)} s apart)", f"{seconds(elapsed)} (4 requests)",
    ])
    assert_healthy_afterwards(client, gateway, standin)


@pytest.mark.parametrize("mode", MODES)
def test_backend_refusing_connections_then_started_is_used_again(mode: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client, report: list[list[str]], tmp_path: Path) -> None:
    """A backend whose process is down (connection refused) cools down; once it is started, the probe after the cooldown uses it."""
    primary, backup = f"p-revived-{mode}", f"b-revived-{mode}"
    status_url = f"{gateway.url}/v1/gateway/status"
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}

    def primary_state() -> dict[str, Any]:
        targets = client.get(status_url, headers=auth).json()["targets"]
        return next(t for t in targets if t["model"] == upstream_id(primary))

    started = time.monotonic()
    attempts = [chat(client, gateway, primary, mode).headers["x-gateway-attempts"] for _ in range(3)]
    assert attempts == ["3", "2", "1"]  # refused twice; refused once more (cooled); skipped
    state = primary_state()
    assert state["state"] == "cooling_down" and state["last_error"].startswith("connect: ")
    assert str(REVIVED_PORTS[mode]) not in state["last_error"]

    revived = ManagedProcess(
        [sys.executable, str(STANDIN_SCRIPT), "--host", "127.0.0.1", "--port", str(REVIVED_PORTS[mode])],
        log_dir=tmp_path, name="revived",
    )
    try:
        revived.wait_for_log(LISTENING_LINE, 10.0)
        deadline = time.monotonic() + COOLDOWN_S + 2
        while primary_state()["state"] == "cooling_down" and time.monotonic() < deadline:
            time.sleep(0.05)
        back = chat(client, gateway, primary, mode)
        assert back.status == 200 and back.headers["x-gateway-served-by"] == primary
        assert back.headers["x-gateway-attempts"] == "1" and primary_state()["state"] == "healthy"
        if mode == "stream":
            assert back.done
        report.append([
            "backend down (connection refused), then started", mode,
            f"200 from `{backup}` ×3, then from `{primary}` after its cooldown",
            "primary refused 2, 1, skipped, then probed and served", f"{seconds(time.monotonic() - started)} (4 requests)",
        ])
    finally:
        revived.cleanup()
    assert_healthy_afterwards(client, gateway, standin)
