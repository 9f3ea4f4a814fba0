"""Rates per key and per alias, the body limit, and rates shared through Redis.

The window arithmetic is checked with hypothesis against a model of the
sliding-window counter; everything else runs real gateway processes against the
stand-in, and the Redis tests against a real ``redis-server`` started here.
Limits are kept small so every 429 shows up without waiting for a window to pass.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import select
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from limits.aio.storage import RedisStorage
from limits.errors import StorageError

from conftest import CLIENT_KEY, GatewayFactory, backend_toml
from gateway.admission import RateAdmission, estimate_tokens, rates_for, usage_tokens
from gateway.auth import Identity
from gateway.config import ConfigError, parse_config
from gateway.config.model import KeyEntry
from gateway.errors import GatewayError
from gateway.facts import inspect_request
from gateway.keys import hash_key, new_key, write_keys_file
from gateway.limits import WINDOW_S, Rate, RateCounter, Window, format_duration
from gateway.shared_slots import SHARED_DIR_ENV
from gateway.snapshot import build_snapshot
from harness import (
    GatewayProcess,
    ManagedProcess,
    StandIn,
    clear_of_rate_window_roll,
    free_port,
    group_rss_bytes,
    local_client,
    start_gateway,
)

RELOAD_WAIT_S = 8.0
POLL_S = 0.1
# 60 characters: the admission estimates 15 tokens; the stand-in reports 15 prompt + 16 completion.
PROMPT_60 = "Describe the Alps in three short sentences, please, thanks!!"
assert len(PROMPT_60) == 60


def chat_body(model: str, content: str = "hello there", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def chat(client: httpx.Client, url: str, key: str, model: str, content: str = "hello there") -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", json=chat_body(model, content), headers={"Authorization": f"Bearer {key}"})


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def aliases_toml(**limits: str) -> str:
    """One alias per keyword on the stand-in backend, each with the given extra lines."""
    return "".join(f'\n[models."{name}"]\nbackend = "local"\nmodel = "{name}-up"\n{extra}\n' for name, extra in limits.items())


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=15.0) as http:
        yield http


# ---------------------------------------------------------------- the arithmetic


def used_after(window: Window, dt: float) -> float:
    """The model of the sliding-window counter: what it counts `dt` seconds from now, nothing added."""
    window_end = window.current_ttl_s - WINDOW_S if window.current_count else window.previous_ttl_s
    if dt <= window_end:
        return window.previous_count * (window.previous_ttl_s - dt) / WINDOW_S + window.current_count
    into_next = dt - window_end
    if into_next >= WINDOW_S:
        return 0.0
    return window.current_count * (WINDOW_S - into_next) / WINDOW_S


@st.composite
def windows(draw: st.DrawFn) -> Window:
    left_s = draw(st.floats(min_value=0.01, max_value=WINDOW_S))
    previous = draw(st.integers(min_value=0, max_value=500))
    current = draw(st.integers(min_value=0, max_value=500))
    return Window(previous, left_s if previous else 0.0, current, left_s + WINDOW_S)


@given(windows(), st.integers(min_value=1, max_value=400), st.integers(min_value=1, max_value=400))
def test_wait_is_the_time_until_the_cost_fits(window: Window, limit: int, cost: int) -> None:
    """`wait_s` is 0 exactly when the cost fits now; after waiting it, the cost fits; a second less, it does
    not (the wait said 60/N s too much for a rate of N, 80 s where 61 s did)."""
    room = limit - min(cost, limit)
    wait = window.wait_s(limit, cost)
    fits_now = math.floor(window.used()) <= room
    assert (wait == 0) == fits_now
    assert math.floor(used_after(window, wait + 1e-9)) <= room
    if wait > 1:
        assert math.floor(used_after(window, wait - 1)) > room


@given(windows(), st.integers(min_value=1, max_value=400))
def test_remaining_and_reset_agree_with_the_model(window: Window, limit: int) -> None:
    """`remaining` is what the limit leaves of the weighted count; after `reset_s` nothing counts."""
    assert window.remaining(limit) == max(0, limit - math.floor(window.used()))
    assert used_after(window, window.reset_s() + 1e-6) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (61.25, "1m1.25s")])
def test_reset_durations_are_written_like_openai(seconds: float, text: str) -> None:
    """`x-ratelimit-reset-*` durations read like OpenAI's: 20ms, 1.5s, 6m0s."""
    assert format_duration(seconds) == text


def test_memory_counter_takes_only_what_fits_and_adds_regardless() -> None:
    """`take` refuses a cost that does not fit and leaves the count alone; `add` always counts."""

    async def scenario() -> tuple[bool, bool, int, int, int]:
        counter = RateCounter("memory")
        rate = Rate("tokens", "alias", "m", 10)
        first = await counter.take(rate, 8)
        second = await counter.take(rate, 5)
        after_refusal = (await counter.window(rate)).current_count
        await counter.add(rate, 7)
        window = await counter.window(rate)
        return first, second, after_refusal, window.current_count, window.remaining(10)

    assert asyncio.run(scenario()) == (True, False, 8, 15, 0)


def counter_in(storage: str, tmp_path: Path) -> RateCounter:
    """A counter on ``storage``: "memory" (one process), "shared" (the workers' table) or a Redis URL."""
    if storage == "shared":
        return RateCounter("memory", environ={SHARED_DIR_ENV: str(tmp_path)})
    return RateCounter(storage)


class _ClosedUnder(RedisStorage):
    """A Redis storage whose connection the server closed under each command, as uvloop reports it."""

    def __init__(self) -> None:  # no connection to make
        pass

    async def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    get_sliding_window = acquire_sliding_window_entry = incr = _fail  # type: ignore[assignment]

    def _current_window_key(self, key: str) -> str:
        return key


def test_any_failure_of_a_redis_call_is_a_storage_error() -> None:
    """A Redis endpoint that accepts connections and closes them made the event loop's RuntimeError escape
    the admission: those requests were 500s, where a failed storage lets requests through."""
    rate = Rate("requests", "key", "closed-under", 5)
    counter = RateCounter("redis://127.0.0.1:6379/0")
    counter._storage = _ClosedUnder()

    async def scenario() -> int:
        calls = [counter.window(rate), counter.take(rate, 1), counter.give_back(rate, 1), counter.add(rate, 3)]
        failed = 0
        for call in calls:
            with pytest.raises(StorageError):
                await call
            failed += 1
        return failed

    assert asyncio.run(scenario()) == 4


@pytest.mark.parametrize("storage", ["memory", "shared", "redis"])
def test_a_counter_gives_back_what_it_took(storage: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """What a refused request took comes back, in every storage; memory and the table never go below 0."""
    url = request.getfixturevalue("fresh_redis") if storage == "redis" else storage
    rate = Rate("requests", "key", f"give-back-{storage}", 5)

    async def scenario() -> list[int]:
        counter = counter_in(url, tmp_path)
        counts = []
        for _ in range(3):
            assert await counter.take(rate, 1)
        await counter.give_back(rate, 2)
        counts.append((await counter.window(rate)).current_count)
        await counter.give_back(rate, 1)
        counts.append((await counter.window(rate)).current_count)
        await counter.aclose()
        return counts

    assert asyncio.run(scenario()) == [1, 0]


def test_a_request_refused_by_one_rate_gives_back_what_the_others_took(tmp_path: Path) -> None:
    """In a burst every request reads room left, then takes: the one the alias refuses must not keep
    the key's share (it was charged to the key, which then refused requests it never served)."""
    key_rate, alias_rate = Rate("requests", "key", "k2", 5), Rate("requests", "alias", "r3c", 3)

    class SeesRoomLeft(RateCounter):
        async def window(self, rate: Rate) -> Window:  # as read before the others took
            return Window(0, 0.0, 0, 0.0)

    async def scenario() -> tuple[str, int, int]:
        counter = SeesRoomLeft("memory")
        for _ in range(3):
            assert await counter.take(alias_rate, 1)
        with pytest.raises(GatewayError) as refused:
            await RateAdmission(lambda: None)._admit(counter, [key_rate, alias_rate], 10)
        key_count = (await RateCounter.window(counter, key_rate)).current_count
        alias_count = (await RateCounter.window(counter, alias_rate)).current_count
        return refused.value.code, key_count, alias_count

    assert asyncio.run(scenario()) == ("rate_limit_exceeded", 0, 3)


def test_rates_come_from_the_key_the_defaults_and_the_alias() -> None:
    """A key's own rates beat `[limits] key_rpm/key_tpm`; the alias's rates apply to every key."""
    config = parse_config(
        b'[limits]\nkey_rpm = 100\nkey_tpm = 5000\n[backends.b]\nbase_url = "http://127.0.0.1:9"\n'
        b'[models.m]\nbackend = "b"\nmodel = "x"\nrpm = 7\n'
    )
    alias = build_snapshot(config, environ={}).aliases["m"]
    own = rates_for(Identity("alice", rpm=3), alias, config)
    assert own == [Rate("requests", "key", "alice", 3), Rate("tokens", "key", "alice", 5000), Rate("requests", "alias", "m", 7)]
    assert rates_for(Identity("env-key-1"), alias, config)[0] == Rate("requests", "key", "env-key-1", 100)


def test_token_estimate_and_usage() -> None:
    """The estimate is the prompt at ~4 characters a token; usage counts total_tokens, else its parts."""
    assert estimate_tokens(inspect_request(chat_body("m", PROMPT_60))) == 15
    assert usage_tokens({"prompt_tokens": 15, "completion_tokens": 16}) == 31
    assert usage_tokens({"total_tokens": 40, "prompt_tokens": 1}) == 40
    assert usage_tokens(None) is None and usage_tokens({"other": 1}) is None


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("memcached://127.0.0.1", 'expected "memory" or a redis://'),
        ("redis+tls://:hunter2secret@127.0.0.1:6379/0", 'expected "memory" or a redis://'),
        ("redis://127.0.0.1:6379x/0", "not a Redis URL the gateway can use"),
        ("redis://127.0.0.1:99999/0", "not a Redis URL the gateway can use"),
        ("redis://:hunter2/secret@127.0.0.1:6379/0", "percent-encoded"),
        ("redis://[::1:6379/0", "not a Redis URL the gateway can use"),
        ("redis://127.0.0.1:6379/0?db=x", "Invalid value for 'db'"),
        ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "'ssl_cert_reqs' is not an option of a Redis connection"),
        ("redis://:hunter2@127.0.0.1:6379/0?protocol=9", "protocol must be either 2 or 3"),
        ("rediss://:hunter2@127.0.0.1:6379/0?ssl_cert_reqs=bogus", "Invalid SSL Certificate Requirements Flag"),
    ],
)
def test_storage_must_be_memory_or_a_usable_redis_url(storage: str, says: str) -> None:
    """`[limits] storage` takes "memory" or a Redis URL the client library can use, refused at `limits.storage`
    and its line without showing the value: `check` passed some, and every rate-limited request was then a 500,
    its log holding part of the password; a wrong scheme's message showed the whole URL at the status."""
    text = f'[limits]\nkey_rpm = 5\nstorage = "{storage}"\n[backends.b]\nbase_url = "http://x"\n[models.m]\nbackend = "b"\nmodel = "x"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text.encode())
    assert str(caught.value).startswith("models.toml:3: limits.storage: ") and says in str(caught.value), str(caught.value)
    assert "hunter2" not in str(caught.value) and "secret" not in str(caught.value)


def test_a_redis_url_with_its_options_is_taken() -> None:
    config = parse_config(b'[limits]\nstorage = "rediss://:p%2Fw@127.0.0.1:6380/2?socket_keepalive=true"\n[backends.b]\nbase_url = "http://x"\n[models.m]\nbackend = "b"\nmodel = "x"\n')
    assert config.limits.storage.startswith("rediss://")


# ---------------------------------------------------------------- rates in a running gateway


@pytest.fixture(scope="module")
def alice_key() -> str:
    return new_key()


@pytest.fixture(scope="module")
def rates_gateway(tmp_path_factory: pytest.TempPathFactory, standin: StandIn, alice_key: str) -> Iterator[GatewayProcess]:
    """One gateway for the rate tests: a file key with rpm = 2, two env keys, and rate-limited aliases."""
    directory = tmp_path_factory.mktemp("rates")
    write_keys_file(directory / "keys.toml", {"alice": KeyEntry(hash=hash_key(alice_key), rpm=2)})
    config = directory / "models.toml"
    config.write_text(
        '[auth]\nkeys_file = "keys.toml"\n' + backend_toml(standin)
        + aliases_toml(free="", limited="rpm = 2", thrifty="tpm = 40", streamy="tpm = 40")
    )
    env = {"GATEWAY_API_KEYS": "sk-a,sk-b", "STANDIN_KEY": "sk-test-upstream"}
    with start_gateway(config, env=env, log_dir=directory) as gateway:
        yield gateway


def test_key_rpm_refuses_with_retry_after_and_ratelimit_headers(
    rates_gateway: GatewayProcess, client: httpx.Client, alice_key: str
) -> None:
    """A key's rpm: the answers count down x-ratelimit-remaining-requests, then 429 with Retry-After."""
    url = rates_gateway.url
    clear_of_rate_window_roll(5)
    first, second = chat(client, url, alice_key, "free"), chat(client, url, alice_key, "free")
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == ["1", "0"]
    assert re.fullmatch(r"\d+(\.\d+)?(ms|s)|\d+m[\d.]+s", first.headers["x-ratelimit-reset-requests"])

    refused = chat(client, url, alice_key, "free")
    assert refused.status_code == 429 and error_code(refused) == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 2 * WINDOW_S
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "your key" in refused.json()["error"]["message"]
    # Another key is not held back by alice's rate.
    assert chat(client, url, "sk-a", "free").status_code == 200


def test_a_request_that_made_no_call_uses_up_no_rate_and_a_failed_one_says_what_it_used(
    standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """503 backend_not_configured made no call: it used to use up the alias's rpm, so the next try was a 429.
    A 502 after calls counts, and carries the x-ratelimit headers as a served answer does."""
    config = (
        backend_toml(standin)
        + '[backends.nokey]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "GATEWAY_TEST_NEVER_SET_KEY"\n'
        + '[models."unwired"]\nbackend = "nokey"\nmodel = "x"\nrpm = 1\n'
        + aliases_toml(failing="rpm = 3\nretries = 0")
    )
    gateway = gateway_factory(config)
    unwired = [chat(client, gateway.url, CLIENT_KEY, "unwired") for _ in range(3)]
    assert [(r.status_code, error_code(r)) for r in unwired] == [(503, "backend_not_configured")] * 3
    assert "x-ratelimit-remaining-requests" not in unwired[0].headers
    standin.script("failing-up", [{"kind": "status", "status": 500}])
    failed = chat(client, gateway.url, CLIENT_KEY, "failing")
    assert failed.status_code == 502, failed.text
    assert (failed.headers["x-ratelimit-limit-requests"], failed.headers["x-ratelimit-remaining-requests"]) == ("3", "2")


def test_alias_rpm_is_shared_by_every_key(rates_gateway: GatewayProcess, client: httpx.Client) -> None:
    """An alias's rpm counts the requests of all keys together."""
    url = rates_gateway.url
    clear_of_rate_window_roll(5)
    assert chat(client, url, "sk-a", "limited").status_code == 200
    assert chat(client, url, "sk-b", "limited").status_code == 200
    refused = chat(client, url, "sk-a", "limited")
    assert refused.status_code == 429 and error_code(refused) == "rate_limit_exceeded"
    assert "model 'limited'" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1


def test_tpm_counts_the_upstreams_usage_not_only_the_estimate(rates_gateway: GatewayProcess, client: httpx.Client) -> None:
    """tpm takes the estimate up front and the reported usage after: the next request no longer fits."""
    url = rates_gateway.url
    clear_of_rate_window_roll(5)
    first = chat(client, url, "sk-a", "thrifty", PROMPT_60)
    assert first.status_code == 200
    assert first.json()["usage"]["total_tokens"] == 31
    assert (first.headers["x-ratelimit-limit-tokens"], first.headers["x-ratelimit-remaining-tokens"]) == ("40", "25")
    # With only the estimates counted, 15 + 15 would fit in 40; with the usage (31), 31 + 15 does not.
    refused = chat(client, url, "sk-b", "thrifty", PROMPT_60)
    assert refused.status_code == 429 and error_code(refused) == "rate_limit_exceeded"
    assert "tokens per minute" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "9"


def test_stream_usage_counts_too(rates_gateway: GatewayProcess, client: httpx.Client) -> None:
    """A stream that reports usage (stream_options.include_usage) is counted when it ends."""
    body = chat_body("streamy", PROMPT_60, stream=True, stream_options={"include_usage": True}, standin_step={"kind": "ok", "chunks": 10})
    clear_of_rate_window_roll(8)
    with client.stream("POST", f"{rates_gateway.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-a"}) as response:
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-tokens"] == "25"
        text = response.read().decode()
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    assert [e["usage"]["total_tokens"] for e in events if e.get("usage")] == [45]  # 15 prompt + 30 completion
    # Only the estimates (15 + 15) would fit in 40; the reported 45 does not. The count lands as the stream ends.
    time.sleep(1.0)
    refused = chat(client, rates_gateway.url, "sk-b", "streamy", PROMPT_60)
    assert refused.status_code == 429 and error_code(refused) == "rate_limit_exceeded"


def test_reload_keeps_counters_of_unchanged_limits(
    tmp_path: Path, standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """A reload that leaves an alias's rpm alone keeps its count; one that changes it starts a new count."""
    base = backend_toml(standin) + aliases_toml(steady="rpm = 3")
    gateway = gateway_factory(base)
    clear_of_rate_window_roll(10)
    assert [chat(client, gateway.url, CLIENT_KEY, "steady").status_code for _ in range(2)] == [200, 200]

    (tmp_path / "models.toml").write_text(base + aliases_toml(added=""))
    deadline = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < deadline:
        listed = client.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).json()
        if "added" in [m["id"] for m in listed["data"]]:
            break
        time.sleep(POLL_S)
    else:
        pytest.fail("the reload adding alias 'added' was not seen")
    assert chat(client, gateway.url, CLIENT_KEY, "steady").status_code == 200
    assert chat(client, gateway.url, CLIENT_KEY, "steady").status_code == 429

    (tmp_path / "models.toml").write_text(base.replace("rpm = 3", "rpm = 10"))
    deadline = time.monotonic() + RELOAD_WAIT_S
    response = chat(client, gateway.url, CLIENT_KEY, "steady")
    while response.status_code == 429 and time.monotonic() < deadline:
        time.sleep(POLL_S)
        response = chat(client, gateway.url, CLIENT_KEY, "steady")
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "10"


# ---------------------------------------------------------------- the body limit


def send_until_answered(port: int, *, chunked: bool, max_send_bytes: int, timeout_s: float) -> tuple[bytes, int]:
    """POST a 1 GB body (declared, or chunked with no length) piece by piece; stop at the first answer.

    Returns the head of the answer and how many bytes were sent before it came.
    """
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {1 << 30}"
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()
    data = b'{"model": "free", "messages": "' + b"a" * (256 * 1024)
    piece = f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data
    sent = 0
    answer = b""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        while time.monotonic() < deadline and sent < max_send_bytes:
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                break
            if writable:
                try:
                    sock.sendall(piece)
                    sent += len(piece)
                except OSError:
                    break  # the gateway closed the connection: read what it answered
        sock.settimeout(5.0)
        try:
            while b"\r\n\r\n" not in answer:
                received = sock.recv(65536)
                if not received:
                    break
                answer += received
        except OSError:
            pass
    return answer, sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_refused_while_reading(standin: StandIn, gateway_factory: GatewayFactory, chunked: bool) -> None:
    """A 1 GB body is answered 413 near the 1 MiB limit, and the gateway's memory does not grow by it."""
    gateway = gateway_factory("[server]\nmax_request_bytes = 1_048_576\n" + backend_toml(standin) + aliases_toml(free=""))
    with local_client() as http:  # one request first, so the worker has warmed up before measuring
        assert chat(http, gateway.url, CLIENT_KEY, "free").status_code == 200
    before = group_rss_bytes(gateway.pid)
    answer, sent = send_until_answered(gateway.port, chunked=chunked, max_send_bytes=256 << 20, timeout_s=30.0)
    grown = group_rss_bytes(gateway.pid) - before
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 64 << 20, f"sent {sent} bytes before the answer"
    assert grown < 48 << 20, f"the gateway grew by {grown} bytes"


# ---------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for this module only."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it")
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI runs these tests")
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = ManagedProcess(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        log_dir=directory,
        name="redis",
    )
    try:
        deadline = time.monotonic() + 10
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as ping:
            while True:
                try:
                    ping.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or not process.is_running():
                        raise RuntimeError(f"redis-server did not start:\n{process.log_tail()}") from None
                    time.sleep(POLL_S)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.cleanup()


@pytest.fixture
def fresh_redis(redis_url: str) -> str:
    with redis.Redis.from_url(redis_url, socket_timeout=1) as connection:
        connection.flushall()
    return redis_url


def test_two_gateways_share_one_budget_through_redis(
    fresh_redis: str, standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """Two gateway processes on one Redis count one rpm: what one used, the other cannot."""
    config = f'[limits]\nstorage = "{fresh_redis}"\nkey_rpm = 3\n' + backend_toml(standin) + aliases_toml(free="")
    first = gateway_factory(config, name="first.toml")
    second = gateway_factory(config, name="second.toml")
    clear_of_rate_window_roll(5)
    statuses = [chat(client, gateway.url, CLIENT_KEY, "free").status_code for gateway in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]
    with redis.Redis.from_url(fresh_redis, socket_timeout=1) as connection:
        keys = [k.decode() for k in connection.keys("*")]
    assert keys and all(k.startswith("dgx-gateway:") for k in keys)
    assert not any(CLIENT_KEY in k or hash_key(CLIENT_KEY)[7:] in k for k in keys)


def statuses_from_two_workers(gateway_factory: GatewayFactory, config: str) -> dict[int, int]:
    """10 requests for alias `shared` to a gateway of 2 workers, each on a new connection: how many got which status."""
    gateway = gateway_factory(config, workers=2)
    gateway.wait_for_workers(2)
    clear_of_rate_window_roll(10)
    statuses: dict[int, int] = {}
    for _ in range(10):
        with local_client() as fresh:  # a new connection each time, so both workers take requests
            status = chat(fresh, gateway.url, CLIENT_KEY, "shared").status_code
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


def test_two_workers_share_rates_through_redis(
    fresh_redis: str, standin: StandIn, gateway_factory: GatewayFactory
) -> None:
    """With workers = 2 and Redis storage, an alias's rpm holds for the gateway as a whole."""
    config = f'[limits]\nstorage = "{fresh_redis}"\n' + backend_toml(standin) + aliases_toml(shared="rpm = 4")
    assert statuses_from_two_workers(gateway_factory, config) == {200: 4, 429: 6}


def test_two_workers_share_rates_kept_in_memory(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """With workers = 2 and the default storage, an alias's rpm still holds for the gateway as a whole."""
    config = backend_toml(standin) + aliases_toml(shared="rpm = 4")
    assert statuses_from_two_workers(gateway_factory, config) == {200: 4, 429: 6}


def test_unreachable_redis_lets_requests_through_and_says_so(
    standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """A Redis that cannot be reached does not take the gateway down: requests pass and the log warns."""
    config = f'[limits]\nstorage = "redis://127.0.0.1:{free_port()}/0"\nkey_rpm = 1\n' + backend_toml(standin) + aliases_toml(free="")
    gateway = gateway_factory(config)
    assert [chat(client, gateway.url, CLIENT_KEY, "free").status_code for _ in range(2)] == [200, 200]
    assert "rate limits not enforced" in gateway.process.log_text()


def test_a_failed_storage_is_left_alone_for_a_while_not_waited_for_by_every_request() -> None:
    """A Redis that accepts connections and never answers cost every request its timeout (about 1 s);
    after one failure, requests are let through at once until the storage is asked again."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        config = parse_config(
            f'[limits]\nstorage = "redis://127.0.0.1:{port}/0"\nkey_rpm = 5\n[backends.b]\nbase_url = "http://127.0.0.1:9"\n'
            '[models.m]\nbackend = "b"\nmodel = "x"\n'.encode()
        )
        alias = build_snapshot(config, environ={}).aliases["m"]
        facts = inspect_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        admission = RateAdmission(lambda: config)

        async def timed_admits() -> list[float]:
            took = []
            for _ in range(3):
                started = time.monotonic()
                ticket = await admission.admit(Identity("alice"), alias, facts)
                took.append(time.monotonic() - started)
                assert ticket.headers == []  # let through, uncounted
            await admission.aclose()
            return took

        first, *rest = asyncio.run(timed_admits())
        assert first >= 0.5 and all(t < 0.1 for t in rest), (first, rest)
    finally:
        listener.close()
