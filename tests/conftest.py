"""Shared fixtures: a real upstream stand-in process, and real gateway processes under granian.

``standin`` is one stand-in process for the whole session (tests script it per
upstream model id, so they do not disturb each other). ``gateway_factory``
writes a models.toml into the test's temp dir and starts ``gateway serve`` on
it; every gateway it started is stopped at the end of the test.
"""

import itertools
import os
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from gateway.chunks import Chunks
from harness import CLIENT_KEY, UPSTREAM_KEY, GatewayProcess, StandIn, start_gateway, start_standin

# A fast profile for CI, a thorough one for local runs: HYPOTHESIS_PROFILE=thorough.
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))



def in_pieces(raw: bytes, cuts: list[int] | None = None, size: int = 1 << 16) -> Chunks:
    """``raw`` as a server might deliver it: cut at ``cuts`` (offsets modulo its length + 1), else every ``size`` bytes."""
    if cuts is None:
        cuts = list(range(size, len(raw), size))
    at = sorted({cut % (len(raw) + 1) for cut in cuts} | {0, len(raw)})
    return Chunks(raw[a:b] for a, b in itertools.pairwise(at))


def peak_allocation(call: Callable[[], object], swallow: type[BaseException] | tuple[type[BaseException], ...] = ()) -> int:
    """The peak of what Python allocated while ``call`` ran (tracemalloc), in bytes.

    ``swallow``: exceptions ``call`` may end with (a refusal whose cost is measured).
    """
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            call()
        except swallow:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    with start_standin(log_dir=tmp_path_factory.mktemp("standin")) as running:
        yield running


def backend_toml(standin: StandIn, name: str = "local", **settings: float) -> str:
    """A backend table pointing at the stand-in, its key read from STANDIN_KEY, with numeric ``settings``
    (timeouts, say ``first_byte_timeout_s=2``)."""
    lines = [f"[backends.{name}]", f'base_url = "{standin.base_url}"', 'api_key_env = "STANDIN_KEY"']
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[GatewayProcess] = []

    def start(config_text: str, *, env: dict[str, str] | None = None, workers: int = 1, name: str = "models.toml") -> GatewayProcess:
        config = tmp_path / name
        config.write_text(config_text)
        full_env = {"GATEWAY_API_KEYS": CLIENT_KEY, "STANDIN_KEY": UPSTREAM_KEY, **(env or {})}
        gateway = start_gateway(config, env=full_env, workers=workers, log_dir=tmp_path)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
