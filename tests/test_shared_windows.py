"""The rate table the workers of one `gateway serve` share: the `limits` sliding-window counter in a mapped file.

The library's own `MemoryStorage` is the reference: driven through the same
calls at the same (fake) times, the table must answer exactly as it does.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from itertools import count
from pathlib import Path

import limits.aio.storage.memory
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits.aio.storage import MemoryStorage
from limits.errors import StorageError

from gateway.limits import Rate, RateCounter
from gateway.shared_slots import SHARED_DIR_ENV
from gateway.shared_windows import ENTRIES_PER_STRIPE, SharedWindows, _locate

EXPIRY = 60


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


acquire_call = st.tuples(
    st.just("acquire"), st.sampled_from(["k1", "k2", "k3"]), st.sampled_from([1, 5, 40]), st.integers(1, 12)
)
window_call = st.tuples(st.just("window"), st.sampled_from(["k1", "k2", "k3"]), st.just(0), st.just(0))
steps = st.lists(st.tuples(st.floats(0, 75, allow_nan=False), st.one_of(acquire_call, window_call)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(start=st.floats(1.7e9, 1.8e9, allow_nan=False), steps=steps)
def test_the_table_answers_as_the_library_does(tmp_path_factory: pytest.TempPathFactory, start: float, steps: list[tuple[float, tuple[str, str, int, int]]]) -> None:
    """Any sequence of takes and reads, seconds to minutes apart: the same yes/no and the same window as MemoryStorage."""
    table = SharedWindows(tmp_path_factory.mktemp("run"))
    clock = FakeClock(start)
    original = limits.aio.storage.memory.time
    limits.aio.storage.memory.time = clock  # type: ignore[assignment]

    async def scenario() -> None:
        reference = MemoryStorage()
        for advance, (call, key, limit, amount) in steps:
            clock.now += advance
            if call == "acquire":
                expected = await reference.acquire_sliding_window_entry(key, limit, EXPIRY, amount)
                assert table.acquire(key, limit, EXPIRY, amount, clock.now) == expected
            else:
                previous, previous_ttl, current, current_ttl = await reference.get_sliding_window(key, EXPIRY)
                got = table.window(key, EXPIRY, clock.now)
                assert (got[0], got[2]) == (previous, current)
                assert got[1] == pytest.approx(previous_ttl) and got[3] == pytest.approx(current_ttl)

    try:
        asyncio.run(scenario())
    finally:
        limits.aio.storage.memory.time = original
        table.close()


# Another process that, from a moment all share, takes one at a time as fast as it can (at one fixed time).
TAKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gateway.shared_windows import SharedWindows
    table = SharedWindows(Path(sys.argv[1]))
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    print(sum(table.acquire("key", 30000, 60, 1, 1.8e9) for _ in range(20000)))
    """
)


def test_processes_taking_at_once_never_count_past_the_limit(tmp_path: Path) -> None:
    """Three processes race for a limit of 30,000, 20,000 tries each: exactly 30,000 are granted, none lost or doubled."""
    start_at = str(time.time() + 1.0)
    takers = [
        subprocess.Popen([sys.executable, "-c", TAKER, str(tmp_path), start_at], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    granted = [int(taker.communicate(timeout=120)[0]) for taker in takers]
    assert sum(granted) == 30000, granted
    assert min(granted) > 0, "the processes did not overlap"
    table = SharedWindows(tmp_path)
    assert table.window("key", 60, 1.8e9)[2] == 30000
    table.close()


def test_a_full_stripe_is_a_storage_error_until_its_counts_run_out(tmp_path: Path) -> None:
    """Keys enough to fill one stripe: the next one is refused as a storage fault; two windows later, entries are reused."""
    names = (f"key-{i}" for i in count())
    same_stripe = []
    while len(same_stripe) <= ENTRIES_PER_STRIPE:
        name = next(names)
        if _locate(name)[1] == 0:
            same_stripe.append(name)
    table = SharedWindows(tmp_path)
    now = 1.8e9
    for name in same_stripe[:-1]:
        assert table.acquire(name, 10, EXPIRY, 1, now)
    with pytest.raises(StorageError, match="stripe 0 is full"):
        table.acquire(same_stripe[-1], 10, EXPIRY, 1, now)
    assert table.window(same_stripe[-1], EXPIRY, now)[2] == 0  # reading needs no room
    assert table.acquire(same_stripe[0], 10, EXPIRY, 1, now), "keys already in the table still count"
    with pytest.raises(StorageError):
        table.acquire(same_stripe[-1], 10, EXPIRY, 1, now + EXPIRY)  # a window later, the counts still weigh
    later = now + 2 * EXPIRY
    assert table.acquire(same_stripe[-1], 10, EXPIRY, 1, later)
    assert table.window(same_stripe[-1], EXPIRY, later)[2] == 1
    table.close()


def test_a_second_worker_maps_the_same_counts(tmp_path: Path) -> None:
    first, second = SharedWindows(tmp_path), SharedWindows(tmp_path)
    assert first.acquire("k", 3, EXPIRY, 2, 1.8e9)
    assert not second.acquire("k", 3, EXPIRY, 2, 1.8e9)
    assert second.acquire("k", 3, EXPIRY, 1, 1.8e9)
    assert first.window("k", EXPIRY, 1.8e9)[2] == 3
    first.close()
    second.close()


def test_a_table_that_cannot_be_mapped_leaves_the_worker_counting_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The run's directory gone under a running gateway: rates still count, in this worker, and the log says so."""
    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        counter = RateCounter("memory", environ={SHARED_DIR_ENV: str(tmp_path / "gone")})
    assert "counts on its own" in caplog.text

    async def scenario() -> tuple[bool, bool]:
        rate = Rate("requests", "key", "alice", 1)
        return await counter.take(rate, 1), await counter.take(rate, 1)

    assert asyncio.run(scenario()) == (True, False)
