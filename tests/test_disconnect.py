"""A client that leaves cancels its upstream request at once, on every path (SPEC §6).

The client here is a raw socket, so "leaving" is exactly one ``close()`` at a
known time. The stand-in records when the gateway's upstream connection was
cancelled (``/_standin/connections``); each test proves that happened within a
second of the client leaving, that nothing is left in flight, and that the
target was not blamed for it (a client leaving is not an upstream failure).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import GatewayFactory, backend_toml
from harness import CLIENT_KEY, GatewayProcess, StandIn, local_client, scraped, serving

RUN = uuid.uuid4().hex[:6]
CANCEL_WITHIN_S = 1.0
ALIASES = ("hang", "role-then-silence", "slow-stream", "backoff-nonstream", "backoff-stream", "image-hold")


def upstream_id(alias: str) -> str:
    return f"{RUN}-disconnect-{alias}"


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("disconnect")
    lines = [
        "[routing]", "backoff_s = 0.05", "retry_after_max_s = 5", "cooldown_failures = 5", "cooldown_s = 30", "",
        backend_toml(standin, first_byte_timeout_s=20, idle_timeout_s=20, timeout_s=30),
    ]
    for alias in ALIASES:
        lines += [f'[models."{alias}"]', 'backend = "local"', f'model = "{upstream_id(alias)}"']
        if alias == "image-hold":
            lines += ['output = ["image", "text"]', 'params = { modalities = ["image", "text"] }']
        lines.append("")
    with serving("\n".join(lines), directory) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=10.0) as http:
        yield http


class RawClient:
    """One HTTP/1.1 request on a plain socket, read as far as the test wants, then dropped."""

    def __init__(self, gateway: GatewayProcess, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        self.sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5.0)
        self.sock.sendall(head + payload)
        self.received = b""

    def read_until(self, marker: bytes, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while marker not in self.received:
            assert time.monotonic() < deadline, f"never saw {marker!r} in {self.received[-300:]!r}"
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            piece = self.sock.recv(65536)
            assert piece, f"the gateway closed before {marker!r}: {self.received[-300:]!r}"
            self.received += piece

    def leave(self) -> float:
        """Close the connection; returns when (wall clock, as the stand-in logs it)."""
        left_at = time.time()
        self.sock.close()
        return left_at


def chat_body(alias: str, stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": alias, "messages": [{"role": "user", "content": "disconnect test"}], "stream": stream, **extra}


def upstream_calls(standin: StandIn, alias: str) -> int:
    return sum(1 for r in standin.requests() if r["model"] == upstream_id(alias))


def wait_for_upstream_call(standin: StandIn, alias: str, count: int, timeout_s: float = 5.0) -> None:
    """Wait until the stand-in has seen ``count`` requests for this alias's model."""
    deadline = time.monotonic() + timeout_s
    while upstream_calls(standin, alias) < count:
        assert time.monotonic() < deadline, f"the gateway never called the upstream for {alias}"
        time.sleep(0.02)


def cancelled(standin: StandIn, alias: str) -> list[dict[str, Any]]:
    return [c for c in standin.connections()["cancelled"] if c["model"] == upstream_id(alias)]


def wait_for_cancellation(standin: StandIn, alias: str, count: int, timeout_s: float = 3.0) -> list[dict[str, Any]]:
    """The stand-in's cancellations for this alias once there are ``count`` (or fewer, after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while len(found := cancelled(standin, alias)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def assert_clean_afterwards(client: httpx.Client, gateway: GatewayProcess, standin: StandIn, alias: str) -> None:
    """Nothing in flight upstream, the gateway answers, and the target was not blamed for the client leaving."""
    deadline = time.monotonic() + 3.0
    while standin.connections()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert standin.connections()["in_flight"] == 0
    assert client.get(f"{gateway.url}/healthz").status_code == 200
    status = client.get(f"{gateway.url}/v1/gateway/status", headers={"authorization": f"Bearer {CLIENT_KEY}"}).json()
    rows = [t for t in status["targets"] if t["model"] == upstream_id(alias)]
    assert all(row["state"] == "healthy" and row["consecutive_failures"] == 0 for row in rows), rows
    standin.script(upstream_id(alias), [{"kind": "ok"}])
    answer = client.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat_body(alias, False),
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert answer.status_code == 200, answer.text


def requests_counted(client: httpx.Client, gateway: GatewayProcess, alias: str, status: str) -> float:
    return scraped(client, gateway.url, f'gateway_requests_total{{alias="{alias}",status="{status}"}} ')


def counted_soon(client: httpx.Client, gateway: GatewayProcess, alias: str, status: str, expected: float) -> float:
    """The count once it is ``expected``, or after 2 s: the handler counts as it unwinds, just after the upstream sees the cancel."""
    deadline = time.monotonic() + 2.0
    while (now := requests_counted(client, gateway, alias, status)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_leaving_before_the_first_byte_cancels_the_upstream_call(stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A client that leaves while the upstream has not answered yet gets its upstream call closed within a second."""
    standin.script(upstream_id("hang"), [{"kind": "hang", "hang_s": 30}])
    calls_before, cancelled_before = upstream_calls(standin, "hang"), len(cancelled(standin, "hang"))
    left_before = requests_counted(client, gateway, "hang", "499")
    raw = RawClient(gateway, chat_body("hang", stream))
    wait_for_upstream_call(standin, "hang", calls_before + 1)
    left_at = raw.leave()
    found = wait_for_cancellation(standin, "hang", cancelled_before + 1)
    assert len(found) == cancelled_before + 1
    assert found[-1]["t"] - left_at < CANCEL_WITHIN_S
    assert counted_soon(client, gateway, "hang", "499", left_before + 1) == left_before + 1  # the README's metrics table
    assert_clean_afterwards(client, gateway, standin, "hang")


def test_leaving_while_the_stream_is_held_cancels_the_upstream_call(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A client that leaves while the gateway holds a stream (role chunk only, no answer yet) cancels it within a second."""
    standin.script(upstream_id("role-then-silence"), [{"kind": "stream_stall", "after_chunks": 0, "stall_s": 30}])
    raw = RawClient(gateway, chat_body("role-then-silence", True))
    wait_for_upstream_call(standin, "role-then-silence", 1)
    time.sleep(0.3)  # the role chunk has reached the gateway, which holds it
    assert raw.received == b""
    left_at = raw.leave()
    found = wait_for_cancellation(standin, "role-then-silence", 1)
    assert len(found) == 1 and found[0]["t"] - left_at < CANCEL_WITHIN_S
    assert found[0]["chunks_sent"] == 1  # only the role chunk had been produced
    assert_clean_afterwards(client, gateway, standin, "role-then-silence")


def test_leaving_mid_stream_cancels_the_upstream_call(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A client that leaves mid-stream gets its upstream stream closed within a second: no tokens paid for nobody."""
    standin.script(upstream_id("slow-stream"), [{"kind": "ok", "chunks": 100, "interval_ms": 100}])
    raw = RawClient(gateway, chat_body("slow-stream", True))
    raw.read_until(b"stand-in part 3")
    assert b"x-gateway-served-by: slow-stream" in raw.received
    left_at = raw.leave()
    found = wait_for_cancellation(standin, "slow-stream", 1)
    assert len(found) == 1 and found[0]["t"] - left_at < CANCEL_WITHIN_S
    assert found[0]["chunks_sent"] < 20  # the other ~80 chunks were never generated
    assert counted_soon(client, gateway, "slow-stream", "200", 1) == 1  # as its head said (the README's metrics table)
    assert requests_counted(client, gateway, "slow-stream", "499") == 0
    assert_clean_afterwards(client, gateway, standin, "slow-stream")


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_leaving_during_a_retry_wait_makes_no_further_call(stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A client that leaves while the gateway waits out a Retry-After: the retry is never sent."""
    alias = "backoff-stream" if stream else "backoff-nonstream"
    model = upstream_id(alias)
    standin.script(model, [{"kind": "status", "status": 503, "retry_after": 1.5}, {"kind": "ok"}])
    raw = RawClient(gateway, chat_body(alias, stream))
    wait_for_upstream_call(standin, alias, 1)
    raw.leave()
    time.sleep(2.0)  # past the Retry-After: a retry would have arrived by now
    assert upstream_calls(standin, alias) == 1
    # The 503 itself counts against the target; the client leaving does not add to it.
    status = client.get(f"{gateway.url}/v1/gateway/status", headers={"authorization": f"Bearer {CLIENT_KEY}"}).json()
    row = next(t for t in status["targets"] if t["model"] == model)
    assert row["consecutive_failures"] == 1 and row["state"] == "healthy"
    deadline = time.monotonic() + 3.0
    while standin.connections()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert standin.connections()["in_flight"] == 0


def test_leaving_while_an_image_stream_is_held_cancels_the_upstream_call(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """An image-output stream is held until its image; a client leaving before it arrives cancels the upstream."""
    standin.script(upstream_id("image-hold"), [{"kind": "ok", "chunks": 100, "interval_ms": 100}])
    raw = RawClient(gateway, chat_body("image-hold", True))
    wait_for_upstream_call(standin, "image-hold", 1)
    time.sleep(0.5)  # text chunks are flowing into the gateway, which holds them until the image
    assert raw.received == b""
    left_at = raw.leave()
    found = wait_for_cancellation(standin, "image-hold", 1)
    assert len(found) == 1 and found[0]["t"] - left_at < CANCEL_WITHIN_S
    assert_clean_afterwards(client, gateway, standin, "image-hold")


def test_a_client_that_stops_reading_frees_the_upstream_and_its_slot_by_the_total_time(
    standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """A stream whose client neither reads nor leaves (a suspended process, a hostile reader) is cut off
    just past the alias's timeout_s: before, it held the upstream call and the backend's only slot for
    as long as the client liked, and everyone else got 429."""
    model = f"{RUN}-stalled-reader"
    config = backend_toml(standin, "narrow", max_concurrency=1, max_queue=0) + (
        f'\n[models.stalled]\nbackend = "narrow"\nmodel = "{model}"\ntimeout_s = 2\nretries = 0\n'
    )
    gateway = gateway_factory(config)
    standin.script(model, [{"kind": "ok", "chunks": 200_000}, {"kind": "ok"}])  # tens of MB: more than any buffer
    stalled = RawClient(gateway, chat_body("stalled", True))
    stalled.read_until(b"data:")  # the stream has begun, and this client reads no more
    deadline = time.monotonic() + 8.0
    while standin.connections()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert standin.connections()["in_flight"] == 0, "the upstream call outlived the alias's timeout_s"
    answer = client.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body("stalled", False), headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert answer.status_code == 200, answer.text
    stalled.leave()
