"""Slot files: a backend's slots held across processes by byte-range locks.

Another process stands for another worker: POSIX locks never conflict within
one process, so only a second process can show a slot held elsewhere.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.shared_slots import SHARED_DIR_ENV, SlotDirectory, SlotFile

# A second process that takes the slots it is told to, reports them, and holds them until killed.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gateway.shared_slots import SlotFile
    slots = SlotFile(Path(sys.argv[1]))
    held = set()
    for _ in range(int(sys.argv[2])):
        held.add(slots.take(int(sys.argv[3]), held))
    print(" ".join(map(str, sorted(held))), flush=True)
    sys.stdin.read()
    """
)


def hold_elsewhere(path: Path, count: int, capacity: int) -> tuple[subprocess.Popen[str], str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(count), str(capacity)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    return holder, holder.stdout.readline().strip()


# A second process that holds exactly the slots it is told to (by their index).
HOLDER_AT = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    for index in map(int, sys.argv[2:]):
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index, os.SEEK_SET)
    print("held", flush=True)
    sys.stdin.read()
    """
)


def hold_elsewhere_at(path: Path, indexes: list[int]) -> tuple[subprocess.Popen[str], str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_AT, str(path), *map(str, indexes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    return holder, holder.stdout.readline().strip()


def stop(holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.communicate(timeout=10)  # also closes its pipes


def test_slots_held_above_a_lowered_capacity_still_count(tmp_path: Path) -> None:
    """Capacity 4 lowered to 2 while another worker holds slots 2 and 3: 2 calls are in flight, so
    nothing new starts until one ends. Looked at only below the new capacity, 0 looked free."""
    path = tmp_path / "gpu.slots"
    slots = SlotFile(path)
    holder, _ = hold_elsewhere_at(path, [2, 3])  # begun while the capacity was 4
    try:
        assert slots.take(2, set(), reach=4) is None
        assert slots.take(3, set(), reach=4) == 0
        assert slots.take(3, {0}, reach=4) is None
    finally:
        stop(holder)


def test_slots_held_by_another_process_are_skipped_and_come_back_when_it_dies(tmp_path: Path) -> None:
    """Another worker holds slots 0 and 1 of 3: this one gets 2, then none; once that worker is killed, 0 is free."""
    path = tmp_path / "gpu.slots"
    slots = SlotFile(path)
    holder, held_there = hold_elsewhere(path, 2, 3)
    try:
        assert held_there == "0 1"
        assert slots.take(3, set()) == 2
        assert slots.take(3, {2}) is None
    finally:
        stop(holder)
    # The kernel dropped the dead process's locks: nobody had to give them back.
    assert slots.take(3, {2}) == 0
    slots.give_back(0)
    slots.give_back(2)
    other, held_there = hold_elsewhere(path, 3, 3)
    stop(other)
    assert held_there == "0 1 2", "slots given back here were free for another process"
    slots.close()


def test_a_process_must_name_the_slots_it_holds(tmp_path: Path) -> None:
    """Locks never conflict within one process: `held` is what keeps a worker from taking its own slot twice."""
    slots = SlotFile(tmp_path / "gpu.slots")
    assert slots.take(1, set()) == 0
    assert slots.take(1, set()) == 0  # the kernel says yes again
    assert slots.take(1, {0}) is None
    slots.close()


def test_the_directory_comes_from_the_environment_and_names_files_by_digest(tmp_path: Path) -> None:
    assert SlotDirectory.from_environment({}) is None
    directory = SlotDirectory.from_environment({SHARED_DIR_ENV: str(tmp_path)})
    assert directory is not None
    first = directory.for_backend("spark / gpu:0")
    assert first is not None and directory.for_backend("spark / gpu:0") is first  # one descriptor per file
    assert directory.for_backend("cloud") is not first
    names = sorted(path.name for path in tmp_path.iterdir())
    assert len(names) == 2 and all(name.endswith(".slots") and "/" not in name and " " not in name for name in names)
    directory.close()


def test_a_missing_directory_means_counting_in_this_worker_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The run's directory removed under a running gateway: the backend is gated per worker, with one warning."""
    directory = SlotDirectory(tmp_path / "gone")
    with caplog.at_level(logging.WARNING, logger="gateway.concurrency"):
        assert directory.for_backend("gpu") is None
        assert directory.for_backend("gpu") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'gpu'" in warnings[0] and "this worker only" in warnings[0]


def test_a_lock_that_fails_for_another_reason_lets_the_call_through_once_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A descriptor that went bad: the slot is counted in this worker alone, and the log says so once."""
    slots = SlotFile(tmp_path / "gpu.slots")
    os.close(slots._fd)
    slots._fd = os.open(tmp_path / "gpu.slots", os.O_RDONLY)  # a write lock needs a writable descriptor
    with caplog.at_level(logging.WARNING, logger="gateway.concurrency"):
        assert slots.take(2, set()) == 0
        assert slots.take(2, {0}) == 1
        slots.give_back(0)
    assert len(caplog.records) == 1 and "this worker only" in caplog.records[0].getMessage()
    slots.close()
