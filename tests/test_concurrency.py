"""Concurrency per backend: slots, the FIFO line, its bounds, and slots given back on every path.

The gate itself is driven with asyncio directly (fast and exact); the rest runs
a real gateway whose backend has ``max_concurrency`` against the stand-in, whose
``/_standin/connections`` shows what really reaches the upstream.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import CLIENT_KEY, GatewayFactory
from gateway.concurrency import BackendGates, Gate
from gateway.config import parse_config
from gateway.config.model import Config
from gateway.errors import GatewayError
from gateway.snapshot import build_snapshot
from harness import StandIn, clear_of_rate_window_roll

POLL_S = 0.05


# ---------------------------------------------------------------- the gate


def test_waiters_are_served_in_arrival_order() -> None:
    """With one slot, waiters get it in the order they came, each as the previous holder releases."""

    async def scenario() -> list[int]:
        gate = Gate(1)
        order: list[int] = []
        first = await gate.acquire("m", max_queue=10, timeout_s=5)

        async def wait_turn(i: int) -> None:
            slot = await gate.acquire("m", max_queue=10, timeout_s=5)
            order.append(i)
            await asyncio.sleep(0)
            slot.release()

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(wait_turn(i)))
            await asyncio.sleep(0)  # each joins the line before the next
        assert len(gate.waiters) == 5
        first.release()
        await asyncio.gather(*tasks)
        assert (gate.active, len(gate.waiters)) == (0, 0)
        return order

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


def test_refusals_of_one_burst_are_told_to_come_back_at_different_times() -> None:
    """Twenty callers refused at once all read `Retry-After: 2` and came back together (to be refused
    together again): `retry-after-ms`, which the openai SDKs read first, spreads them around the guess."""

    async def scenario() -> tuple[float, list[GatewayError]]:
        gate = Gate(1)
        await gate.acquire("m", max_queue=0, timeout_s=5)
        refusals = []
        for _ in range(20):
            try:
                await gate.acquire("m", max_queue=0, timeout_s=5)
            except GatewayError as error:
                refusals.append(error)
        return gate.wait_guess_s(), refusals

    guess_s, refusals = asyncio.run(scenario())
    spread = [int(error.headers["retry-after-ms"]) / 1000 for error in refusals]
    assert len(refusals) == 20 and len(set(spread)) > 10
    assert all(0.75 * max(guess_s, 0.25) - 0.001 <= s <= 1.25 * max(guess_s, 0.25) + 0.001 for s in spread), (guess_s, spread)
    assert {error.headers["retry-after"] for error in refusals} == {str(max(1, math.ceil(guess_s)))}


def test_full_line_is_refused_at_once_with_retry_after() -> None:
    """When the line holds max_queue waiters, the next caller gets 429 concurrency_limit_exceeded at once."""

    async def scenario() -> GatewayError:
        gate = Gate(1)
        await gate.acquire("m", max_queue=1, timeout_s=5)
        waiter = asyncio.create_task(gate.acquire("m", max_queue=1, timeout_s=5))
        await asyncio.sleep(0)
        try:
            await gate.acquire("m", max_queue=1, timeout_s=5)
        except GatewayError as error:
            return error
        finally:
            waiter.cancel()
        raise AssertionError("the third caller was not refused")

    error = asyncio.run(scenario())
    assert (error.status, error.code) == (429, "concurrency_limit_exceeded")
    assert int(error.headers["retry-after"]) >= 1
    assert "queue of 1 is full" in error.message


def test_wait_that_runs_out_is_refused_and_leaves_the_line() -> None:
    """A waiter that gets no slot within queue_timeout_s is refused and no longer counted in the line."""

    async def scenario() -> tuple[str, int, int]:
        gate = Gate(1)
        await gate.acquire("m", max_queue=3, timeout_s=5)
        try:
            await gate.acquire("m", max_queue=3, timeout_s=0.05)
        except GatewayError as error:
            return error.code, len(gate.waiters), gate.active
        raise AssertionError("the wait did not run out")

    assert asyncio.run(scenario()) == ("concurrency_limit_exceeded", 0, 1)


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    """A waiter whose client leaves just as it is handed a slot gives it to the next waiter: no slot leaks."""

    async def scenario() -> tuple[int, int]:
        gate = Gate(1)
        holder = await gate.acquire("m", max_queue=5, timeout_s=5)
        leaving = asyncio.create_task(gate.acquire("m", max_queue=5, timeout_s=5))
        staying = asyncio.create_task(gate.acquire("m", max_queue=5, timeout_s=5))
        await asyncio.sleep(0)
        holder.release()      # hands the slot to `leaving` ...
        leaving.cancel()      # ... whose client leaves before it runs again
        with pytest.raises(asyncio.CancelledError):
            await leaving
        slot = await asyncio.wait_for(staying, 1)
        active = gate.active
        slot.release()
        slot.release()  # a second release changes nothing
        return active, gate.active

    assert asyncio.run(scenario()) == (1, 0)


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=25), st.integers(1, 4))
def test_any_mix_of_holders_and_leavers_keeps_the_bound_and_returns_every_slot(jobs: list[tuple[int, bool]], capacity: int) -> None:
    """Holders never exceed the capacity, and once everyone is done or gone, no slot is held and nobody waits."""

    async def scenario() -> tuple[int, int, int]:
        gate = Gate(capacity)
        peak = 0

        async def job(hold_steps: int) -> None:
            nonlocal peak
            slot = await gate.acquire("m", max_queue=100, timeout_s=10)
            try:
                peak = max(peak, gate.active)
                for _ in range(hold_steps):
                    await asyncio.sleep(0)
            finally:
                slot.release()

        tasks = [asyncio.create_task(job(steps)) for steps, _ in jobs]
        await asyncio.sleep(0)
        for task, (_, leaves) in zip(tasks, jobs):
            if leaves:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peak, gate.active, len(gate.waiters)

    peak, active, waiting = asyncio.run(scenario())
    assert peak <= capacity and active == 0 and waiting == 0


def test_gates_follow_the_serving_config() -> None:
    """A backend without max_concurrency is not gated; a reload that changes it resizes the gate in place."""
    text = '[backends.gpu]\nbase_url = "http://127.0.0.1:9"\nmax_concurrency = 1\n[backends.cloud]\nbase_url = "http://127.0.0.1:9"\n'
    text += '[models.local]\nbackend = "gpu"\nmodel = "x"\n[models.far]\nbackend = "cloud"\nmodel = "y"\n'
    current: list[Config] = [parse_config(text.encode())]
    gates = BackendGates(lambda: current[0])
    snapshot = build_snapshot(current[0], environ={})
    local, far = snapshot.aliases["local"].targets[0], snapshot.aliases["far"].targets[0]

    async def scenario() -> tuple[int, int, bool]:
        first = await gates.acquire(local)
        await gates.acquire(far)  # ungated: always at once
        current[0] = parse_config(text.replace("max_concurrency = 1", "max_concurrency = 2").encode())
        second = await asyncio.wait_for(gates.acquire(local), 1)
        gate = gates.gate("gpu")
        assert gate is not None
        held = gate.active
        first.release()
        second.release()
        return held, gate.capacity, gates.gate("cloud") is None

    assert asyncio.run(scenario()) == (2, 2, True)


def test_a_reload_that_raises_the_capacity_starts_the_line_at_once() -> None:
    """follow (what each reload calls) starts waiters a raised max_concurrency lets in, without a newcomer."""
    text = '[backends.gpu]\nbase_url = "http://127.0.0.1:9"\nmax_concurrency = 1\n[models.local]\nbackend = "gpu"\nmodel = "x"\n'
    current: list[Config] = [parse_config(text.encode())]
    gates = BackendGates(lambda: current[0])
    local = build_snapshot(current[0], environ={}).aliases["local"].targets[0]

    async def scenario() -> int:
        holder = await gates.acquire(local)
        waiting = [asyncio.create_task(gates.acquire(local)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)
        gates.follow(parse_config(text.replace("max_concurrency = 1", "max_concurrency = 3").encode()))
        await asyncio.sleep(0)
        started = sum(task.done() for task in waiting)
        holder.release()
        for slot in await asyncio.gather(*waiting):
            slot.release()
        return started

    assert asyncio.run(scenario()) == 2


# ---------------------------------------------------------------- gates of several workers


class SharedFile:
    """Stands for one slot file seen by several workers: which worker holds each slot.

    Like the kernel's locks, a worker that takes a slot it holds already gets it again.
    """

    def __init__(self) -> None:
        self.owners: dict[int, str] = {}

    def worker(self, name: str) -> WorkerView:
        return WorkerView(self, name)


class WorkerView:
    def __init__(self, shared: SharedFile, name: str) -> None:
        self._shared, self._name = shared, name

    def take(self, capacity: int, held: AbstractSet[int], reach: int = 0) -> int | None:
        if len(self._shared.owners) >= capacity:
            return None  # every worker's calls count, slots above a lowered capacity too
        for index in range(capacity):
            if index not in held and self._shared.owners.get(index, self._name) == self._name:
                self._shared.owners[index] = self._name
                return index
        return None

    def give_back(self, index: int) -> None:
        if self._shared.owners.get(index) == self._name:
            del self._shared.owners[index]


def test_two_workers_share_the_slots_and_a_given_back_slot_is_open_to_both() -> None:
    """Capacity 2 over two workers: the third caller waits; a released slot goes back to the file, not to the own line."""

    async def scenario() -> None:
        shared = SharedFile()
        a, b = Gate(2, shared.worker("a")), Gate(2, shared.worker("b"))
        first = await a.acquire("m", max_queue=5, timeout_s=5)
        second = await b.acquire("m", max_queue=5, timeout_s=5)
        assert sorted(shared.owners.items()) == [(0, "a"), (1, "b")]
        waiting_in_a = asyncio.create_task(a.acquire("m", max_queue=5, timeout_s=5))
        await asyncio.sleep(0)
        assert len(a.waiters) == 1 and a.active == 1

        first.release()
        assert shared.owners == {1: "b"}, "the slot is free for every worker, not handed within a"
        newcomer_in_b = await asyncio.wait_for(b.acquire("m", max_queue=5, timeout_s=5), 1)
        assert shared.owners == {0: "b", 1: "b"} and not waiting_in_a.done()

        second.release()  # a's waiter takes it at its next look
        third = await asyncio.wait_for(waiting_in_a, 1)
        assert shared.owners == {0: "b", 1: "a"}
        for slot in (newcomer_in_b, third):
            slot.release()
        assert shared.owners == {} and (a.active, b.active) == (0, 0)

    asyncio.run(scenario())


def test_a_worker_whose_waiter_leaves_as_it_is_handed_a_shared_slot_gives_it_back() -> None:
    """The shared slot goes back to the file, where the other worker takes it."""

    async def scenario() -> None:
        shared = SharedFile()
        a, b = Gate(1, shared.worker("a")), Gate(1, shared.worker("b"))
        holder = await b.acquire("m", max_queue=5, timeout_s=5)
        leaving = asyncio.create_task(a.acquire("m", max_queue=5, timeout_s=5))
        await asyncio.sleep(0)
        holder.release()
        a._on_poll()  # a's next look, now: it hands the slot over ...
        assert a.active == 1 and shared.owners == {0: "a"}
        leaving.cancel()  # ... and its client leaves before the waiter runs again
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert shared.owners == {} and a.active == 0 and not a.waiters
        again = await asyncio.wait_for(b.acquire("m", max_queue=5, timeout_s=5), 1)
        again.release()

    asyncio.run(scenario())


@given(
    st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3), st.booleans()), min_size=1, max_size=20),
    st.integers(1, 3),
)
def test_workers_sharing_slots_never_exceed_the_capacity_together(jobs: list[tuple[str, int, bool]], capacity: int) -> None:
    """Any mix of holders and leavers in two workers: together they hold at most the capacity, and give every slot back."""

    async def scenario() -> tuple[int, dict[int, str], int]:
        shared = SharedFile()
        gates = {name: Gate(capacity, shared.worker(name)) for name in "ab"}
        peak = 0

        async def job(gate: Gate, hold_steps: int) -> None:
            nonlocal peak
            slot = await gate.acquire("m", max_queue=100, timeout_s=10)
            try:
                peak = max(peak, sum(g.active for g in gates.values()), len(shared.owners))
                for _ in range(hold_steps):
                    await asyncio.sleep(0.001)
            finally:
                slot.release()

        tasks = [asyncio.create_task(job(gates[name], steps)) for name, steps, _ in jobs]
        await asyncio.sleep(0)
        for task, (_, _, leaves) in zip(tasks, jobs):
            if leaves:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peak, shared.owners, sum(len(g.waiters) for g in gates.values())

    peak, owners, waiting = asyncio.run(scenario())
    assert peak <= capacity and owners == {} and waiting == 0


# ---------------------------------------------------------------- a running gateway


def gated_config(standin: StandIn, *, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> str:
    return (
        f'[backends.gpu]\nbase_url = "{standin.base_url}"\napi_key_env = "STANDIN_KEY"\n'
        f"max_concurrency = {max_concurrency}\nmax_queue = {max_queue}\nqueue_timeout_s = {queue_timeout_s}\n"
        '\n[models."local"]\nbackend = "gpu"\nmodel = "local-up"\n'
    )


def stream_body(tag: str, step: dict[str, Any]) -> dict[str, Any]:
    return {"model": "local", "stream": True, "messages": [{"role": "user", "content": tag}], "standin_step": step}


class InFlightSampler:
    """Samples the stand-in's in-flight count in a thread; `peak` is the highest seen."""

    def __init__(self, standin: StandIn) -> None:
        self._standin = standin
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self._standin.connections()["in_flight"]))
            self._stop.wait(POLL_S)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_idle(standin: StandIn, timeout_s: float = 10.0) -> int:
    """Wait until nothing is in flight at the stand-in; returns what is left."""
    deadline = time.monotonic() + timeout_s
    in_flight = int(standin.connections()["in_flight"])
    while in_flight and time.monotonic() < deadline:
        time.sleep(POLL_S)
        in_flight = int(standin.connections()["in_flight"])
    return in_flight


async def run_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        text = (await response.aread()).decode()
        return response.status_code, dict(response.headers), text


@pytest.fixture
def idle_standin(standin: StandIn) -> Iterator[StandIn]:
    assert wait_idle(standin) == 0, "the stand-in is still busy with an earlier test's requests"
    standin.reset()
    yield standin


def test_ten_streams_on_a_backend_of_two(idle_standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """10 streams, max_concurrency 2, max_queue 5: 2 run, 5 wait and start in arrival order, 3 get 429 with Retry-After."""
    standin = idle_standin
    gateway = gateway_factory(gated_config(standin, max_concurrency=2, max_queue=5, queue_timeout_s=60))
    # The first two hold their slots longest and end half a second apart, so queued starts are well spaced.
    steps = [{"kind": "ok", "chunks": 20, "interval_ms": 100}, {"kind": "ok", "chunks": 25, "interval_ms": 100}]
    steps += [{"kind": "ok", "chunks": 10, "interval_ms": 100}] * 8

    async def scenario() -> list[tuple[int, dict[str, str], str]]:
        async with httpx.AsyncClient(trust_env=False, timeout=60, limits=httpx.Limits(max_connections=20)) as client:
            tasks = []
            for i, step in enumerate(steps):
                tasks.append(asyncio.create_task(run_stream(client, gateway.url, stream_body(f"req-{i}", step))))
                await asyncio.sleep(0.1)  # arrival order is the index order
            return list(await asyncio.gather(*tasks))

    with InFlightSampler(standin) as sampler:
        results = asyncio.run(scenario())
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * 7 + [429] * 3, statuses
    for status, headers, text in results:
        if status == 200:
            assert text.rstrip().endswith("data: [DONE]")
        else:
            assert '"concurrency_limit_exceeded"' in text and int(headers["retry-after"]) >= 1
    assert sampler.peak == 2
    started = sorted(standin.requests(), key=lambda r: r["t"])
    tags = [r["body"]["messages"][0]["content"] for r in started]
    assert tags == [f"req-{i}" for i in range(7)]
    assert wait_idle(standin) == 0


def test_wait_in_line_runs_out_with_429(idle_standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """A request that waits longer than queue_timeout_s gets 429 with Retry-After; the slot frees when its holder leaves."""
    standin = idle_standin
    gateway = gateway_factory(gated_config(standin, max_concurrency=1, max_queue=2, queue_timeout_s=0.5))

    async def scenario() -> tuple[int, dict[str, str], str, int]:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            holder = asyncio.create_task(run_stream(client, gateway.url, stream_body("holder", {"kind": "hang", "hang_s": 30})))
            while not standin.connections()["in_flight"]:
                await asyncio.sleep(POLL_S)
            status, headers, text = await run_stream(client, gateway.url, stream_body("waiter", {"kind": "ok"}))
            holder.cancel()  # the holder's client leaves: its slot must come back
            await asyncio.gather(holder, return_exceptions=True)
            after, _, _ = await run_stream(client, gateway.url, stream_body("after", {"kind": "ok"}))
            return status, headers, text, after

    status, headers, text, after = asyncio.run(scenario())
    assert status == 429 and '"concurrency_limit_exceeded"' in text and "within 0.5 s" in text
    assert int(headers["retry-after"]) >= 1
    assert after == 200
    assert standin.wait_for_cancelled(1, timeout_s=5)


def test_a_request_whose_time_runs_out_in_line_never_reaches_the_upstream(idle_standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """An alias of timeout_s = 1 waiting behind a long call on a backend of one slot: its time runs out in
    line, so it is 429 concurrency_limit_exceeded, it is not sent, and the busy but healthy backend is not
    blamed. Before, it waited the queue's 30 s, was sent dead, answered 504 with a negative timeout and
    counted as the target failing, until the GPU was cooled down for everyone."""
    standin = idle_standin
    config = gated_config(standin, max_concurrency=1, max_queue=8, queue_timeout_s=30)
    gateway = gateway_factory(config + '\n[models."short"]\nbackend = "gpu"\nmodel = "local-up"\ntimeout_s = 1\n')

    async def scenario() -> tuple[list[tuple[int, str]], float, int]:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            holder = asyncio.create_task(run_stream(client, gateway.url, stream_body("holder", {"kind": "hang", "hang_s": 30})))
            while not standin.connections()["in_flight"]:
                await asyncio.sleep(POLL_S)
            started = time.monotonic()
            short = {"model": "short", "messages": [{"role": "user", "content": "late"}]}
            answers = await asyncio.gather(*(
                client.post(f"{gateway.url}/v1/chat/completions", json={**short, "stream": stream}, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
                for stream in (False, True, False)
            ))
            waited = time.monotonic() - started
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)
            on_time = {**short, "messages": [{"role": "user", "content": "on time"}]}
            after = await client.post(f"{gateway.url}/v1/chat/completions", json=on_time, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
            return [(a.status_code, a.text) for a in answers], waited, after.status_code

    answers, waited, after = asyncio.run(scenario())
    for status, text in answers:
        assert status == 429 and "concurrency_limit_exceeded" in text and "its request had left" in text, text
    assert waited < 5
    assert [r["body"]["messages"][0]["content"] for r in standin.requests()] == ["holder", "on time"]
    assert after == 200  # the backend was not cooled down for being busy


def test_raising_max_concurrency_by_reload_starts_the_waiting_line(idle_standin: StandIn, gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    """One call runs and two wait on a backend of one slot; models.toml raised to three starts both
    waiting calls within the reload's time, with no new request to wake the line."""
    standin = idle_standin
    config = gated_config(standin, max_concurrency=1, max_queue=5, queue_timeout_s=30)
    gateway = gateway_factory(config)

    async def scenario() -> int:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            calls = [asyncio.create_task(run_stream(client, gateway.url, stream_body(f"c{i}", {"kind": "hang", "hang_s": 20}))) for i in range(3)]
            while not standin.connections()["in_flight"]:
                await asyncio.sleep(POLL_S)
            await asyncio.sleep(0.3)
            assert standin.connections()["in_flight"] == 1
            (tmp_path / "models.toml").write_text(config.replace("max_concurrency = 1", "max_concurrency = 3"))
            deadline = time.monotonic() + 5
            while standin.connections()["in_flight"] < 3 and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
            in_flight = int(standin.connections()["in_flight"])
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            return in_flight

    assert asyncio.run(scenario()) == 3
    assert wait_idle(standin) == 0


def test_no_slot_leaks_after_clients_leave(idle_standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """Holders that leave mid-stream and waiters that leave the line give everything back: 2 new streams run at once."""
    standin = idle_standin
    gateway = gateway_factory(gated_config(standin, max_concurrency=2, max_queue=4, queue_timeout_s=60))
    stall = {"kind": "stream_stall", "after_chunks": 1, "stall_s": 60}

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(trust_env=False, timeout=60, limits=httpx.Limits(max_connections=20)) as client:
            holders = [asyncio.create_task(run_stream(client, gateway.url, stream_body(f"holder-{i}", stall))) for i in range(2)]
            while standin.connections()["in_flight"] < 2:
                await asyncio.sleep(POLL_S)
            waiters = [asyncio.create_task(run_stream(client, gateway.url, stream_body(f"waiter-{i}", stall))) for i in range(2)]
            await asyncio.sleep(0.5)  # the waiters are in line now
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            await asyncio.sleep(0.5)  # the gateway has seen them leave the line
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        assert standin.wait_for_cancelled(2, timeout_s=5)
        assert wait_idle(standin) == 0
        with InFlightSampler(standin) as sampler:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                step = {"kind": "ok", "chunks": 10, "interval_ms": 100}
                results = await asyncio.gather(*(run_stream(client, gateway.url, stream_body(f"again-{i}", step)) for i in range(2)))
        assert sampler.peak == 2
        return [status for status, _, _ in results]

    assert asyncio.run(scenario()) == [200, 200]
    # Only the two holders and the two new streams ever reached the upstream: the waiters left before their turn.
    assert sorted(r["body"]["messages"][0]["content"] for r in standin.requests()) == ["again-0", "again-1", "holder-0", "holder-1"]


def test_two_workers_keep_the_backend_at_its_max_concurrency(idle_standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """`gateway serve --workers 2`, max_concurrency 2: eight streams on eight connections, never more than 2 upstream."""
    standin = idle_standin
    gateway = gateway_factory(gated_config(standin, max_concurrency=2, max_queue=8, queue_timeout_s=60), workers=2)
    step = {"kind": "ok", "chunks": 5, "interval_ms": 100}

    async def scenario() -> list[tuple[int, dict[str, str], str]]:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=0)  # one connection each: both workers get some
        async with httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as client:
            return list(await asyncio.gather(*(run_stream(client, gateway.url, stream_body(f"req-{i}", step)) for i in range(8))))

    gateway.wait_for_workers(2)
    with InFlightSampler(standin) as sampler:
        results = asyncio.run(scenario())
    assert [status for status, _, _ in results] == [200] * 8, results
    assert all(text.rstrip().endswith("data: [DONE]") for _, _, text in results)
    assert sampler.peak == 2
    assert len(standin.requests()) == 8


def test_requests_refused_for_a_full_backend_use_up_no_rate(idle_standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """rpm = 3 on a backend of one slot and no line: while a stream holds the slot, refusals give back
    what they took, so once it ends the alias still has its 2 other requests (not 0 for a minute)."""
    standin = idle_standin
    config = gated_config(standin, max_concurrency=1, max_queue=0, queue_timeout_s=5).replace(
        'model = "local-up"\n', 'model = "local-up"\nrpm = 3\n'
    )
    gateway = gateway_factory(config)
    clear_of_rate_window_roll(10)

    async def scenario() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            holder = asyncio.create_task(run_stream(client, gateway.url, stream_body("holder", {"kind": "ok", "chunks": 10, "interval_ms": 100})))
            while not standin.connections()["in_flight"]:
                await asyncio.sleep(POLL_S)
            refused = [(await run_stream(client, gateway.url, stream_body(f"busy-{i}", {"kind": "ok"})))[0] for i in range(4)]
            await holder
            await asyncio.sleep(0.2)  # the refunds are written off the request path
            after = [(await run_stream(client, gateway.url, stream_body(f"after-{i}", {"kind": "ok"})))[0] for i in range(3)]
            return refused, after

    refused, after = asyncio.run(scenario())
    assert refused == [429] * 4
    assert after == [200, 200, 429]  # the holder and these two: the alias's 3
