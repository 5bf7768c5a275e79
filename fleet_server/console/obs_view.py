"""Time series of one model version per hardware cohort, from its telemetry: pure.

The input is what devices sent, per model hash in the shape of ``protocol.ModelStats``: the
per-minute sums the ingest keeps (``fleet_server.telemetry_minutes``), or raw batches, which
give the same figures when placed at their minute. They are summed into equal time buckets per cohort,
and each bucket gives latency quantiles (from the latency histogram, as the gates read it),
error rate, output PSI against the whole window's outputs of the same cohort (drift over
time), accuracy on the labels that arrived, and label coverage (labelled / inferences).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import zip_longest
from typing import Any

from device_agent.protocol import LATENCY_BOUNDS_US
from fleet_server.console.charts import Series
from fleet_server.gates import psi
from fleet_server.model_metrics import bucket_quantile
from fleet_server.slo.burn import evaluate
from fleet_server.slo.series import Sample
from fleet_server.slo.spec import SloSpec


def column_sums(rows: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Bucket-wise sum of histograms of any lengths, column by column in C (``zip_longest``):
    a chart sums thousands of batches per request."""
    present = [r for r in rows if r]
    return tuple(sum(c) for c in zip_longest(*present, fillvalue=0)) if present else ()


@dataclass
class Bucket:
    inferences: int = 0
    errors: int = 0
    labels: int = 0
    labels_correct: int = 0
    latency_rows: list[Sequence[int]] = field(default_factory=list)
    output_rows: list[Sequence[int]] = field(default_factory=list)

    def add(self, stats: Mapping[str, Any]) -> None:
        self.inferences += int(stats.get("inferences") or 0)
        self.errors += sum(int(v) for v in (stats.get("errors") or {}).values())
        self.latency_rows.append(stats.get("latency_buckets") or ())
        self.output_rows.append(stats.get("output_hist") or ())
        self.labels += int(stats.get("labels") or 0)
        self.labels_correct += int(stats.get("labels_correct") or 0)

    @cached_property
    def latency(self) -> tuple[int, ...]:
        return column_sums(self.latency_rows)

    @cached_property
    def output(self) -> tuple[int, ...]:
        return column_sums(self.output_rows)


@dataclass
class CohortSeries:
    cohort: str
    times: list[float] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)


def bucketed(
    rows: Iterable[tuple[float, str, Mapping[str, Any]]],
    sha256: str,
    start: float,
    end: float,
    n: int,
    resolution: float = 0.0,
) -> dict[str, CohortSeries]:
    """``rows``: (epoch seconds, hardware id, per-model stats), summed into ``n`` equal
    buckets per hardware id. The buckets span from the model's first batch in the window (or
    ``start``, if later) to ``end``: a version that started an hour ago fills the chart of a
    day instead of its last sliver. No bucket is narrower than ``resolution`` (the rows' spacing:
    fewer buckets then), so a version a few minutes old draws a line, not dots between gaps."""
    mine = [(t, hw, stats) for t, hw, models in rows if isinstance(stats := models.get(sha256), Mapping)]
    mine = [r for r in mine if start <= r[0] <= end]
    if not mine:
        return {}
    start = min(t for t, _, _ in mine)
    if resolution > 0:
        n = max(1, min(n, int((end - start) // resolution)))
    width = max(end - start, 1e-3) / n
    out: dict[str, CohortSeries] = {}
    for t, hw, stats in mine:
        series = out.get(hw)
        if series is None:
            times = [start + (i + 0.5) * width for i in range(n)]
            series = out[hw] = CohortSeries(hw, times, [Bucket() for _ in range(n)])
        series.buckets[min(int((t - start) / width), n - 1)].add(stats)
    return out


def _q(b: Bucket, q: float) -> float | None:
    value = bucket_quantile(b.latency, LATENCY_BOUNDS_US, q)
    return None if value is None else value / 1000.0  # ms


def charts(cohorts: Mapping[str, CohortSeries]) -> dict[str, list[Series]]:
    """Chart name -> its series (one per cohort, and per quantile for latency)."""
    out: dict[str, list[Series]] = {
        "Latency (ms)": [],
        "Error rate": [],
        "Output PSI vs the window": [],
        "Accuracy": [],
        "Label coverage": [],
    }
    for hw, s in sorted(cohorts.items()):
        total_output = column_sums([b.output for b in s.buckets])
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            out["Latency (ms)"].append(Series(f"{hw} {name}", _points(s, lambda b, q=q: _q(b, q))))
        out["Error rate"].append(
            Series(hw, _points(s, lambda b: b.errors / b.inferences if b.inferences else None))
        )
        out["Output PSI vs the window"].append(
            Series(hw, _points(s, lambda b, ref=total_output: psi(b.output, ref) if sum(b.output) else None))
        )
        out["Accuracy"].append(
            Series(hw, _points(s, lambda b: b.labels_correct / b.labels if b.labels else None))
        )
        out["Label coverage"].append(
            Series(hw, _points(s, lambda b: b.labels / b.inferences if b.inferences else None))
        )
    return out


def _points(s: CohortSeries, f: Any) -> Sequence[tuple[float, float | None]]:
    return [(t, f(b)) for t, b in zip(s.times, s.buckets, strict=True)]


def budget_series(spec: SloSpec, samples: Sequence[Sample], times: Sequence[float]) -> list[Series]:
    """Each objective's error budget left (1 untouched, 0 spent, below 0 overspent) as the SLO
    stood at each of ``times``, from the samples taken by then: how fast the budget burned."""
    out = []
    for i, objective in enumerate(spec.objectives):
        points: list[tuple[float, float | None]] = []
        for t in times:
            seen = [s for s in samples if s.t <= t]
            status = evaluate(spec, seen, t).objectives[i] if len(seen) > 1 else None
            points.append((t, status.budget_remaining if status is not None and status.events else None))
        out.append(Series(f"{spec.name} {objective.sli}", points))
    return out


UNITS = {
    "Latency (ms)": "",
    "Error rate": "%",
    "Output PSI vs the window": "",
    "Accuracy": "%",
    "Label coverage": "%",
}

__all__ = ["UNITS", "Bucket", "CohortSeries", "bucketed", "budget_series", "charts", "column_sums"]
