"""The Prometheus counters (gateway.metrics): one series per label set, whatever order labels came in;
with several workers, one set of totals (gateway.shared_metrics)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import CLIENT_KEY, GatewayFactory, backend_toml
from gateway import shared_metrics
from gateway.api.completions import CompletionService
from gateway.metrics import HELP, HISTOGRAM_HELP, Metrics, render
from gateway.shared_metrics import MetricsExchange
from harness import StandIn, local_client, scraped, tiny_jpeg


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


def test_a_histogram_counts_each_value_in_its_bucket_and_renders_them_cumulative() -> None:
    metrics = Metrics()
    for seconds in (0.004, 0.01, 0.3, 400.0):  # 0.01 is on a bound: it counts in le="0.01"
        metrics.observe("gateway_request_seconds", seconds, alias="a", stream="false")
    text = metrics.render()
    assert "# TYPE gateway_request_seconds histogram" in text
    bucket = 'gateway_request_seconds_bucket{alias="a",stream="false",le="%s"}'
    for bound, count in [("0.01", 2), ("0.25", 2), ("0.5", 3), ("300", 3), ("+Inf", 4)]:
        assert f"{bucket % bound} {count}\n" in text
    assert 'gateway_request_seconds_count{alias="a",stream="false"} 4\n' in text
    assert 'gateway_request_seconds_sum{alias="a",stream="false"} 400.314' in text


def test_whole_counts_render_in_full() -> None:
    """A token count in the millions keeps every digit: a rate over it must see each increase."""
    metrics = Metrics()
    metrics.inc("gateway_tokens_total", 12_345_678, alias="a", kind="prompt_tokens")
    metrics.inc("gateway_estimated_cost_usd_total", 0.000123, alias="a")
    text = metrics.render()
    assert 'gateway_tokens_total{alias="a",kind="prompt_tokens"} 12345678\n' in text
    assert 'gateway_estimated_cost_usd_total{alias="a"} 0.000123\n' in text


def test_the_exposition_reads_back_with_prometheus_own_parser() -> None:
    """Every family, counters and histograms, with escaped labels, as Prometheus's client library parses it."""
    metrics = Metrics()
    metrics.inc("gateway_requests_total", alias='we"ird\\name', status="200")
    metrics.inc("gateway_tokens_total", 12_345_678, alias="a", kind="prompt_tokens")
    for seconds in (0.02, 0.02, 7.0):
        metrics.observe("gateway_first_byte_seconds", seconds, alias="a")
    families = {family.name: family for family in text_string_to_metric_families(metrics.render())}
    assert families["gateway_first_byte_seconds"].type == "histogram"
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("gateway_first_byte_seconds_bucket", (("alias", "a"), ("le", "0.025")))] == 2
    assert values[("gateway_first_byte_seconds_bucket", (("alias", "a"), ("le", "+Inf")))] == 3
    assert values[("gateway_first_byte_seconds_count", (("alias", "a"),))] == 3
    assert values[("gateway_requests_total", (("alias", 'we"ird\\name'), ("status", "200")))] == 1
    assert values[("gateway_tokens_total", (("alias", "a"), ("kind", "prompt_tokens")))] == 12_345_678


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
    first.observe("gateway_request_seconds", 0.2, alias="a", stream="true")
    second.observe("gateway_request_seconds", 3.0, stream="true", alias="a")
    second_exchange.publish()
    first.inc("gateway_requests_total", alias="a", status="200")  # not yet published: the scrape publishes it
    text = render(first_exchange.samples())
    assert 'gateway_requests_total{alias="a",status="200"} 3' in text
    assert 'gateway_tokens_total{alias="a",kind="prompt"} 7' in text
    assert 'gateway_request_seconds_bucket{alias="a",stream="true",le="0.25"} 1\n' in text
    assert 'gateway_request_seconds_bucket{alias="a",stream="true",le="5"} 2\n' in text
    assert 'gateway_request_seconds_sum{alias="a",stream="true"} 3.2\n' in text
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
    exchange.publish()
    (exchange.directory / "123-junk.json").write_bytes(b"{not counters")
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        assert 'gateway_requests_total{alias="a",status="200"} 1' in render(exchange.samples())
    assert "123-junk.json" in caplog.text


def test_a_lost_directory_loses_nothing_of_this_workers_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cleaner that takes the shared folder away: the scrape still answers this worker's counts, and
    publishing comes back once the folder can be made again."""
    metrics = Metrics()
    metrics.inc("gateway_requests_total", 2, alias="a", status="200")
    exchange = MetricsExchange(tmp_path / "shared", metrics)
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        assert 'gateway_requests_total{alias="a",status="200"} 2' in render(exchange.samples())
    assert "could not publish" in caplog.text and not exchange.path.exists()
    (tmp_path / "shared").mkdir()
    assert 'gateway_requests_total{alias="a",status="200"} 2' in render(exchange.samples())
    assert exchange.path.exists()


def test_a_failing_publisher_says_so_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shared_metrics, "PUBLISH_S", 0.001)
    exchange = MetricsExchange(tmp_path / "gone", Metrics())

    async def run() -> None:
        async with exchange.publishing():
            await asyncio.sleep(0.1)

    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        asyncio.run(run())
    assert caplog.text.count("could not publish") == 1


def test_a_worker_publishes_while_it_runs_and_when_it_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_metrics, "PUBLISH_S", 0.01)
    metrics = Metrics()
    exchange = MetricsExchange(tmp_path, metrics)

    def published() -> str:
        return exchange.path.read_text() if exchange.path.exists() else ""

    async def run() -> tuple[str, str, str]:
        async with exchange.publishing():
            metrics.inc("gateway_requests_total", alias="while", status="200")
            for _ in range(200):
                await asyncio.sleep(0.01)
                if "while" in published():
                    break
            during = published()
            monkeypatch.setattr(shared_metrics, "PUBLISH_S", 60.0)
            await asyncio.sleep(0.05)  # the publisher's last short sleep ends: it sleeps for a minute now
            metrics.inc("gateway_requests_total", alias="last", status="200")
            before_exit = published()
        return during, before_exit, published()

    during, before_exit, after = asyncio.run(run())
    assert "while" in during and "last" not in before_exit and "last" in after


def test_one_process_has_no_exchange() -> None:
    assert MetricsExchange.from_environment(Metrics(), environ={}) is None


def test_two_workers_answer_one_set_of_totals(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """`gateway serve --workers 2`: requests spread over both workers, and every scrape, whichever worker
    answers it, counts all of them (within a second)."""
    config = backend_toml(standin, "mback") + '\n[models."m-two"]\nbackend = "mback"\nmodel = "m-up"\n'
    gateway = gateway_factory(config, workers=2)
    gateway.wait_for_workers(2)
    served_by: Counter[int] = Counter()
    body = {"model": "m-two", "messages": [{"role": "user", "content": "count me"}]}
    # A new connection each time, until each worker has served some (the kernel picks which accepts).
    while served_by.total() < 30 or min(served_by.values()) < 5 or len(served_by) < 2:
        assert served_by.total() < 300, served_by
        with local_client() as fresh:
            assert fresh.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}).status_code == 200
            served_by[int(fresh.get(f"{gateway.url}/readyz").json()["pid"])] += 1
    sent = float(served_by.total())
    series = 'gateway_requests_total{alias="m-two",status="200"}'
    deadline = time.monotonic() + 5
    totals: list[float] = []
    while time.monotonic() < deadline and totals[-1:] != [sent]:
        with local_client() as fresh:
            totals.append(scraped(fresh, gateway.url, series))
        time.sleep(0.1)
    assert totals[-1] == sent, (totals, served_by)
    for _ in range(8):
        with local_client() as fresh:
            assert scraped(fresh, gateway.url, series) == sent


def test_only_whole_non_negative_token_counts_are_counted_and_priced() -> None:
    """An upstream's usage is read, not trusted: a count that is negative, a boolean or not a number would
    make a counter go back or count nothing real."""
    metrics = Metrics()
    service = CompletionService(holder=None, dispatcher=None, metrics=metrics)  # type: ignore[arg-type]
    priced = SimpleNamespace(alias="priced", cost_per_mtok_usd=2.5)
    for usage in ({"prompt_tokens": 1000, "completion_tokens": 3000}, {"prompt_tokens": -5, "completion_tokens": True}, {"prompt_tokens": "7"}, None):
        service._count("asked", priced, usage)
    service._count("asked", SimpleNamespace(alias="free", cost_per_mtok_usd=None), {"prompt_tokens": 10, "completion_tokens": 0})
    text = metrics.render()
    assert 'gateway_tokens_total{alias="priced",kind="prompt_tokens"} 1000\n' in text
    assert 'gateway_tokens_total{alias="priced",kind="completion_tokens"} 3000\n' in text
    assert 'gateway_estimated_cost_usd_total{alias="priced"} 0.01\n' in text
    assert 'gateway_tokens_total{alias="free",kind="prompt_tokens"} 10\n' in text and 'cost_usd_total{alias="free"}' not in text
    assert 'gateway_requests_total{alias="asked",status="200"} 5\n' in text


def parsed_metrics(client: httpx.Client, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = text_string_to_metric_families(client.get(f"{url}/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def test_a_live_gateway_times_and_prices_what_it_serves(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """Served requests are timed to the end of their answer, streams also to their first event; tokens
    are priced at the alias's cost_per_mtok_usd. A refused request is counted, not timed."""
    config = backend_toml(standin, "mback") + '\n[models."m-timed"]\nbackend = "mback"\nmodel = "m-up-timed"\ncost_per_mtok_usd = 4.0\n'
    gateway = gateway_factory(config)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": "m-timed", "messages": [{"role": "user", "content": "time me"}]}
    paced = {"kind": "ok", "chunks": 4, "interval_ms": 100}
    with local_client(timeout_s=30) as client:
        for _ in range(3):
            assert client.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers).status_code == 200
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}, "standin_step": paced}
        assert client.post(f"{gateway.url}/v1/chat/completions", json=streamed, headers=headers).text.endswith("data: [DONE]\n\n")
        image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(tiny_jpeg()).decode()}}
        refused = {**body, "messages": [{"role": "user", "content": [image]}]}  # m-timed takes text only
        assert client.post(f"{gateway.url}/v1/chat/completions", json=refused, headers=headers).status_code == 400
        values = parsed_metrics(client, gateway.url)
    plain, stream = (("alias", "m-timed"), ("stream", "false")), (("alias", "m-timed"), ("stream", "true"))
    assert values[("gateway_request_seconds_count", plain)] == 3
    assert values[("gateway_request_seconds_count", stream)] == 1
    assert 0.4 <= values[("gateway_request_seconds_sum", stream)] < 5
    assert values[("gateway_request_seconds_bucket", (("alias", "m-timed"), ("le", "0.25"), ("stream", "true")))] == 0  # it took 4 × 100 ms
    first_byte = values[("gateway_first_byte_seconds_sum", (("alias", "m-timed"),))]
    assert first_byte < values[("gateway_request_seconds_sum", stream)] - 0.3
    tokens = sum(v for (name, labels), v in values.items() if name == "gateway_tokens_total" and ("alias", "m-timed") in labels)
    assert tokens > 0
    assert values[("gateway_estimated_cost_usd_total", (("alias", "m-timed"),))] == pytest.approx(tokens * 4.0 / 1e6)
    assert values[("gateway_requests_total", (("alias", "m-timed"), ("status", "400")))] == 1


def test_the_readme_describes_every_family() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    assert {*HELP, *HISTOGRAM_HELP} == set(re.findall(r"^\| `(gateway_\w+)` \|", section, re.MULTILINE))


def test_attempts_are_counted_when_no_target_serves(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """A backend that only fails shows in gateway_attempts_total, by outcome: the attempts of a request
    answered 502 (every target failed) or with the upstream's own 400 count as much as a served one's."""
    config = (
        "[routing]\nbackoff_s = 0.01\ncooldown_failures = 50\n\n" + backend_toml(standin, "mdown")
        + '\n[models."m-down"]\nbackend = "mdown"\nmodel = "m-up-down"\nretries = 1\n'
    )
    gateway = gateway_factory(config)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    failing = {"model": "m-down", "messages": [{"role": "user", "content": "hi"}], "standin_step": {"kind": "status", "status": 503}}
    refused = {**failing, "standin_step": {"kind": "status", "status": 400}}
    with local_client(timeout_s=30) as client:
        for _ in range(2):
            assert client.post(f"{gateway.url}/v1/chat/completions", json=failing, headers=headers).status_code == 502
        assert client.post(f"{gateway.url}/v1/chat/completions", json=refused, headers=headers).status_code == 400
        values = parsed_metrics(client, gateway.url)
    attempts = {labels: v for (name, labels), v in values.items() if name == "gateway_attempts_total"}
    assert attempts == {
        (("alias", "m-down"), ("backend", "mdown"), ("outcome", "503")): 4,  # two requests, each retried once
        (("alias", "m-down"), ("backend", "mdown"), ("outcome", "400")): 1,
    }


def test_a_stream_whose_upstream_ends_after_its_done_is_counted_and_charged(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """The upstream's chunked end coming a moment after [DONE]: the gateway waited for it before counting,
    and the disconnect granian reports once an answer has ended cancelled that wait, so such a stream
    counted as nothing, its usage was never charged to the key's tpm, and its connection was dropped."""
    gateway = gateway_factory(backend_toml(standin) + '[models."late-end"]\nbackend = "local"\nmodel = "late-end-up"\n')
    body = {"model": "late-end", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
    with local_client() as client:
        for _ in range(3):
            standin.script("late-end-up", [{"kind": "ok", "end_delay_ms": 150}])
            with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"}) as response:
                assert response.status_code == 200 and response.read().endswith(b"data: [DONE]\n\n")
        time.sleep(0.5)  # the last drain ends after the answer did
        assert scraped(client, gateway.url, 'gateway_requests_total{alias="late-end",status="200"}') == 3
        assert scraped(client, gateway.url, 'gateway_tokens_total{alias="late-end",kind="completion_tokens"}') > 0


def test_a_client_that_leaves_is_a_499_a_cancelled_attempt_and_no_latency(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """Its upstream call was made and cut short: it was missing from the attempts; and the time until it
    gave up was observed as a served request's latency."""
    gateway = gateway_factory(backend_toml(standin) + '[models."leaver"]\nbackend = "local"\nmodel = "leaver-up"\n')
    standin.script("leaver-up", [{"kind": "delay", "delay_ms": 1500}])
    body = {"model": "leaver", "messages": [{"role": "user", "content": "hi"}]}
    with local_client(timeout_s=0.4) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"})
    with local_client() as client:
        deadline = time.monotonic() + 5
        while scraped(client, gateway.url, 'gateway_requests_total{alias="leaver",status="499"}') < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scraped(client, gateway.url, 'gateway_requests_total{alias="leaver",status="499"}') == 1
        assert scraped(client, gateway.url, 'gateway_attempts_total{alias="leaver",backend="local",outcome="cancelled"}') == 1
        assert scraped(client, gateway.url, 'gateway_request_seconds_count{alias="leaver"') == 0


def test_answers_thrown_away_are_counted_in_tokens_and_cost(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """An image alias's answer without an image is moved on from, but the upstream charged for it: its
    tokens and cost were missing from the metrics, which counted only the answer served."""
    aliases = "".join(
        f'[models."{name}"]\nbackend = "local"\nmodel = "{name}-up"\noutput = ["image", "text"]\ncost_per_mtok_usd = 10.0\n'
        for name in ("draw-first", "draw-second")
    )
    gateway = gateway_factory(backend_toml(standin) + aliases + '[models."draw"]\nroute = ["draw-first", "draw-second"]\n')
    standin.script("draw-first-up", [{"kind": "no_image"}])
    standin.script("draw-second-up", [{"kind": "ok"}])
    body = {"model": "draw", "modalities": ["image", "text"], "messages": [{"role": "user", "content": "a cat"}]}
    with local_client() as client:
        answer = client.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        assert answer.status_code == 200 and answer.headers["x-gateway-served-by"] == "draw-second", answer.text
        values = parsed_metrics(client, gateway.url)
    for name in ("draw-first", "draw-second"):
        assert values[("gateway_tokens_total", (("alias", name), ("kind", "prompt_tokens")))] > 0
        assert values[("gateway_estimated_cost_usd_total", (("alias", name),))] > 0
