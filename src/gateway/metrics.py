"""Counters for ``GET /metrics`` (Prometheus text format), cheap on the hot path.

Plain dict increments keyed by label tuples; rendering happens only when
scraped. Backends and upstream model ids appear here (operators' eyes only),
never in answers to clients.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable

Labels = tuple[tuple[str, str], ...]
# One series' value: (name, labels, value). A histogram's are its buckets' own counts (not yet
# cumulative, the bound in an ``le`` label) as ``<name>_bucket``, and its total as ``<name>_sum``.
Sample = tuple[str, Labels, float]

HELP = {
    "gateway_requests_total": "Completion requests answered, by requested alias and HTTP status.",
    "gateway_attempts_total": "Upstream attempts and skipped targets of every request, served or not, by alias tried, backend and outcome.",
    "gateway_stream_malformed_chunks_total": "Upstream stream chunks dropped because they were not JSON.",
    "gateway_tokens_total": "Tokens reported by upstreams' usage, by serving alias and kind.",
    "gateway_estimated_cost_usd_total": "Estimated spend: tokens reported times the serving alias's cost_per_mtok_usd, a rough price from models.toml.",
    "gateway_config_reloads_total": "Configuration loads, by result; each worker loads the file itself.",
}
HISTOGRAM_HELP = {
    "gateway_request_seconds": "Time from a served completion request's arrival to the end of its answer (a stream's last event), by requested alias and whether it streamed.",
    "gateway_first_byte_seconds": "Time from a streamed request's arrival to its first event leaving the gateway (the upstream's first token, after any fallback), by serving alias.",
}
# An answer takes from tens of milliseconds (a short reply from a warm local model) to minutes.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BOUNDS = (*(f"{bound:g}" for bound in BUCKETS), "+Inf")
_BOUND_INDEX = {bound: index for index, bound in enumerate(_BOUNDS)}


class Metrics:
    def __init__(self) -> None:
        self.counters = _new_counters()
        self.histograms = _new_histograms()

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        # Labels in the caller's order: sorting them here cost every request; render() merges.
        self.counters[name][tuple(labels.items())] += amount

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        cells = self.histograms[name][tuple(labels.items())]
        cells[bisect_left(BUCKETS, seconds)] += 1  # a value on a bound counts in that bound's bucket (le)
        cells[-1] += seconds

    def samples(self) -> list[Sample]:
        samples = [(name, labels, value) for name, series in self.counters.items() for labels, value in series.items()]
        for name, histogram in self.histograms.items():
            for labels, cells in histogram.items():
                samples += [(f"{name}_bucket", (*labels, ("le", bound)), count) for bound, count in zip(_BOUNDS, cells) if count]
                samples.append((f"{name}_sum", labels, cells[-1]))
        return samples

    def render(self) -> str:
        return render(self.samples())


def render(samples: Iterable[Sample]) -> str:
    """The Prometheus text of ``samples``, summed per series: one process's, or every worker's."""
    counters = _new_counters()
    histograms = _new_histograms()
    for name, labels, value in samples:
        if name in counters:
            counters[name][tuple(sorted(labels))] += value
            continue
        family, _, part = name.rpartition("_")
        if family not in histograms:
            continue  # a name a newer or older worker of a run counts: not ours to describe
        if part == "sum":
            histograms[family][tuple(sorted(labels))][-1] += value
        elif part == "bucket":
            bound = dict(labels).get("le")
            if bound in _BOUND_INDEX:
                histograms[family][tuple(sorted(pair for pair in labels if pair[0] != "le"))][_BOUND_INDEX[bound]] += value
    lines: list[str] = []
    for name, series in counters.items():
        lines += [f"# HELP {name} {HELP[name]}", f"# TYPE {name} counter"]
        lines += [f"{name}{_label_text(labels)} {_number(value)}" for labels, value in sorted(series.items())]
    for name, histogram in histograms.items():
        lines += [f"# HELP {name} {HISTOGRAM_HELP[name]}", f"# TYPE {name} histogram"]
        for labels, cells in sorted(histogram.items()):
            total = 0.0
            for bound, count in zip(_BOUNDS, cells):
                total += count
                lines.append(f"{name}_bucket{_label_text((*labels, ('le', bound)))} {_number(total)}")
            lines.append(f"{name}_sum{_label_text(labels)} {_number(cells[-1])}")
            lines.append(f"{name}_count{_label_text(labels)} {_number(total)}")
    return "\n".join(lines) + "\n"


def _new_counters() -> dict[str, defaultdict[Labels, float]]:
    return {name: defaultdict(float) for name in HELP}


def _new_histograms() -> dict[str, defaultdict[Labels, list[float]]]:
    # Per series: each bucket's own count, the +Inf bucket's, then the sum of the values.
    return {name: defaultdict(lambda: [0.0] * (len(_BOUNDS) + 1)) for name in HISTOGRAM_HELP}


def _label_text(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


def _number(value: float) -> str:
    # Whole counts in full: "%g" would show 12,345,678 tokens as 1.23457e+07.
    return str(int(value)) if value.is_integer() else repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
