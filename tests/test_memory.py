"""The worker's heap frozen out of garbage collection (gateway.memory), and what that must not cost.

Freezing is process-wide, so each test thaws the heap again when it ends.
"""

from __future__ import annotations

import gc
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.memory import freeze_long_lived_heap
from gateway.metrics import Metrics
from gateway.reload import SnapshotHolder

PROJECT_CONFIG = Path(__file__).parent.parent / "models.toml"


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


def collected(thing: object) -> bool:
    """Whether ``thing`` is among the objects the collector still walks."""
    return any(candidate is thing for candidate in gc.get_objects())


def test_garbage_is_collected_first_and_what_lives_is_left_out_of_collections() -> None:
    living = Node()
    cycle = Node()
    cycle.other = cycle
    gone = weakref.ref(cycle)
    del cycle

    frozen = freeze_long_lived_heap()
    made_after = Node()

    assert gone() is None, "garbage alive at the freeze would never be collected"
    assert frozen == gc.get_freeze_count() > 0
    assert not collected(living)
    assert collected(made_after)


def test_a_reload_frees_the_frozen_startup_configuration(tmp_path: Path) -> None:
    """No collection can free a frozen object: reference counting alone must free the replaced snapshot."""
    path = tmp_path / "models.toml"
    shutil.copy(PROJECT_CONFIG, path)
    holder = SnapshotHolder(path, Metrics())
    assert holder.load()
    startup = weakref.ref(holder.current)
    freeze_long_lived_heap()
    assert not collected(startup())

    path.write_text(path.read_text() + "\n# an edit\n")
    assert holder.load(reason="reload")

    assert startup() is None


def test_a_started_app_has_frozen_its_heap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "models.toml"
    shutil.copy(PROJECT_CONFIG, path)
    monkeypatch.setenv("GATEWAY_API_KEYS", "sk-test")
    app = create_app(path)
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 0
        assert not collected(app)
