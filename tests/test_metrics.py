"""The Prometheus counters (gateway.metrics): one series per label set, whatever order labels came in;
with several workers, one set of totals (gateway.shared_metrics)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest

from conftest import CLIENT_KEY, GatewayFactory, backend_toml
from gateway import shared_metrics
from gateway.metrics import Metrics, render
from gateway.shared_metrics import MetricsExchange
from harness import StandIn, local_client


def test_a_label_set_is_one_series_in_any_order() -> None:
    metrics = Metrics()
    metrics.inc("gateway_requests_total", alias="a", status="200")
    metrics.inc("gateway_requests_total", status="200", alias="a")
    metrics.inc("gateway_requests_total", 3, alias="b", status="429")
    text = metrics.render()
    assert 'gateway_requests_total{alias="a",status="200"} 2' in text
    assert 'gateway_requests_total{alias="b",status="429"} 3' in text
    assert text.count("gateway_requests_total{") == 2


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.inc("gateway_config_reloads_total", result='a"b\\c\nd')
    assert 'gateway_config_reloads_total{result="a\\"b\\\\c\\nd"} 1' in metrics.render()


# ---------------------------------------------------------------- several workers


def two_workers(tmp_path: Path) -> tuple[Metrics, MetricsExchange, Metrics, MetricsExchange]:
    first, second = Metrics(), Metrics()
    return first, MetricsExchange(tmp_path, first), second, MetricsExchange(tmp_path, second)


def test_a_scrape_sums_every_worker(tmp_path: Path) -> None:
    """The worker that answers sums its own counts, as of now, with every other worker's last published ones."""
    first, first_exchange, second, second_exchange = two_workers(tmp_path)
    first.inc("gateway_requests_total", alias="a", status="200")
    second.inc("gateway_requests_total", status="200", alias="a")
    second.inc("gateway_tokens_total", 7, alias="a", kind="prompt")
    second_exchange.publish()
    first.inc("gateway_requests_total", alias="a", status="200")  # not yet published: the scrape publishes it
    text = render(first_exchange.samples())
    assert 'gateway_requests_total{alias="a",status="200"} 3' in text
    assert 'gateway_tokens_total{alias="a",kind="prompt"} 7' in text
    second.inc("gateway_requests_total", alias="a", status="200")  # not published yet: the other worker's is as of its last
    assert 'gateway_requests_total{alias="a",status="200"} 3' in render(first_exchange.samples())
    assert 'gateway_requests_total{alias="a",status="200"} 4' in render(second_exchange.samples())


def test_a_departed_workers_counts_stay_in_the_totals(tmp_path: Path) -> None:
    """Counters never go back: a worker that died leaves its file, and the one started in its place adds its own."""
    gone = Metrics()
    gone_exchange = MetricsExchange(tmp_path, gone)
    gone.inc("gateway_requests_total", 5, alias="a", status="200")
    gone_exchange.publish()
    del gone, gone_exchange
    replacement = Metrics()
    replacement.inc("gateway_requests_total", alias="a", status="200")
    assert 'gateway_requests_total{alias="a",status="200"} 6' in render(MetricsExchange(tmp_path, replacement).samples())


def test_an_unreadable_file_is_skipped_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    metrics.inc("gateway_requests_total", alias="a", status="200")
    exchange = MetricsExchange(tmp_path, metrics)
    (exchange.directory / "123-junk.json").write_bytes(b"{not counters")
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        assert 'gateway_requests_total{alias="a",status="200"} 1' in render(exchange.samples())
    assert "123-junk.json" in caplog.text


def test_a_worker_publishes_while_it_runs_and_when_it_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_metrics, "PUBLISH_S", 0.01)
    metrics = Metrics()
    exchange = MetricsExchange(tmp_path, metrics)

    def published() -> str:
        return exchange.path.read_text() if exchange.path.exists() else ""

    async def run() -> tuple[str, str]:
        async with exchange.publishing():
            metrics.inc("gateway_requests_total", alias="while", status="200")
            for _ in range(200):
                await asyncio.sleep(0.01)
                if "while" in published():
                    break
            during = published()
            metrics.inc("gateway_requests_total", alias="last", status="200")
            monkeypatch.setattr(shared_metrics, "PUBLISH_S", 60.0)
            await asyncio.sleep(0.05)  # the publisher is asleep for a minute now: only the exit publishes "last"
        return during, published()

    during, after = asyncio.run(run())
    assert "while" in during and "last" in after


def test_one_process_has_no_exchange() -> None:
    assert MetricsExchange.from_environment(Metrics(), environ={}) is None


def scraped(client: httpx.Client, url: str, prefix: str) -> float:
    lines = [line for line in client.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_two_workers_answer_one_set_of_totals(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """`gateway serve --workers 2`: requests spread over both workers, and every scrape, whichever worker
    answers it, counts all of them (within a second)."""
    config = backend_toml(standin, "mback") + '\n[models."m-two"]\nbackend = "mback"\nmodel = "m-up"\n'
    gateway = gateway_factory(config, workers=2)
    gateway.wait_for_workers(2)
    served_by: set[int] = set()
    body = {"model": "m-two", "messages": [{"role": "user", "content": "count me"}]}
    for _ in range(30):
        with local_client() as fresh:  # a new connection each time: both workers get some
            assert fresh.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}).status_code == 200
            served_by.add(int(fresh.get(f"{gateway.url}/readyz").json()["pid"]))
    assert len(served_by) == 2
    series = 'gateway_requests_total{alias="m-two",status="200"}'
    deadline = time.monotonic() + 5
    totals: list[float] = []
    while time.monotonic() < deadline and totals[-1:] != [30.0]:
        with local_client() as fresh:
            totals.append(scraped(fresh, gateway.url, series))
        time.sleep(0.1)
    assert totals[-1] == 30.0, totals
    for _ in range(8):
        with local_client() as fresh:
            assert scraped(fresh, gateway.url, series) == 30.0
