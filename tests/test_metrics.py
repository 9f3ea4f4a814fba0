"""The Prometheus counters (gateway.metrics): one series per label set, whatever order labels came in."""

from __future__ import annotations

from gateway.metrics import Metrics


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
