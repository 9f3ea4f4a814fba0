"""Counters for ``GET /metrics`` (Prometheus text format), cheap on the hot path.

Plain dict increments keyed by label tuples; rendering happens only when
scraped. Backends and upstream model ids appear here (operators' eyes only),
never in answers to clients.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

Labels = tuple[tuple[str, str], ...]
# One series' count: (metric name, labels, value).
Sample = tuple[str, Labels, float]

HELP = {
    "gateway_requests_total": "Completion requests answered, by requested alias and HTTP status.",
    "gateway_attempts_total": "Upstream attempts, by serving alias, backend and outcome.",
    "gateway_stream_malformed_chunks_total": "Upstream stream chunks dropped because they were not JSON.",
    "gateway_tokens_total": "Tokens reported by upstreams' usage, by serving alias and kind.",
    "gateway_config_reloads_total": "Configuration loads, by result; each worker loads the file itself.",
}


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[str, defaultdict[Labels, float]] = {name: defaultdict(float) for name in HELP}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        # Labels in the caller's order: sorting them here cost every request; render() merges.
        self.counters[name][tuple(labels.items())] += amount

    def samples(self) -> list[Sample]:
        return [(name, labels, value) for name, series in self.counters.items() for labels, value in series.items()]

    def render(self) -> str:
        return render(self.samples())


def render(samples: Iterable[Sample]) -> str:
    """The Prometheus text of ``samples``, summed per series: one process's, or every worker's."""
    merged: dict[str, defaultdict[Labels, float]] = {name: defaultdict(float) for name in HELP}
    for name, labels, value in samples:
        if name in merged:  # a name a newer or older worker of a run counts: not ours to describe
            merged[name][tuple(sorted(labels))] += value
    lines: list[str] = []
    for name, series in merged.items():
        lines.append(f"# HELP {name} {HELP[name]}")
        lines.append(f"# TYPE {name} counter")
        for labels, value in sorted(series.items()):
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
