"""The SLIs of one SLO as cumulative counters sampled over time, and their change over a window.

The ingest keeps running totals per (device, model); the server sums them for an
SLO's model and cohort every evaluation and keeps the sums with their time. As
with Prometheus counters, any window's good and bad events are then the
difference of two samples, and thinning old samples (``thin``) loses no count:
only the resolution of old windows.

A total that goes down (a device deleted with its aggregates) is taken as no
change for that step rather than as negative events.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from device_agent.protocol import LATENCY_BOUNDS_US
from fleet_server.gates import add_counts, psi
from fleet_server.slo.spec import DRIFT_MIN_OUTPUTS, Objective, Sli


@dataclass(frozen=True)
class Totals:
    """Running totals of one model (every version) on one cohort, as the ingest keeps them."""

    inferences: int = 0
    errors: int = 0
    requests: int = 0
    request_errors: int = 0
    latency: tuple[int, ...] = ()  # per LATENCY_BOUNDS_US, then the overflow bucket
    output: tuple[int, ...] = ()  # per VALUE_BOUNDS
    labels: int = 0
    labels_correct: int = 0
    cpu_ms: float = 0.0  # agent CPU time spent on the model's inferences (cost per inference)
    # feature checks summed over the inputs, in INPUT_CHECKS order (checked, nan, missing, outside)
    input_checks: tuple[int, ...] = ()

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.inferences + other.inferences,
            self.errors + other.errors,
            self.requests + other.requests,
            self.request_errors + other.request_errors,
            add_counts(self.latency, other.latency),
            add_counts(self.output, other.output),
            self.labels + other.labels,
            self.labels_correct + other.labels_correct,
            self.cpu_ms + other.cpu_ms,
            add_counts(self.input_checks, other.input_checks),
        )


@dataclass(frozen=True)
class Sample:
    """Totals at time ``t`` (epoch seconds), with the drift steps judged so far (cumulative)."""

    t: float
    totals: Totals
    drift_bad: int = 0
    drift_steps: int = 0


def next_sample(
    previous: Sample | None, t: float, totals: Totals, drift_threshold: float | None = None
) -> Sample:
    """The sample at ``t``: the new totals, and when a drift objective is set, whether the outputs
    since ``previous`` stayed within ``drift_threshold`` PSI of every output before them."""
    if previous is None:
        return Sample(t, totals)
    bad, steps = previous.drift_bad, previous.drift_steps
    if drift_threshold is not None:
        before = previous.totals.output
        step = tuple(max(n - (before[i] if i < len(before) else 0), 0) for i, n in enumerate(totals.output))
        if sum(step) >= DRIFT_MIN_OUTPUTS and sum(before) >= DRIFT_MIN_OUTPUTS:
            steps += 1
            bad += psi(step, before) > drift_threshold
    return Sample(t, totals, bad, steps)


def latency_good(buckets: Sequence[int], threshold_ms: float) -> int:
    """Inferences whose bucket lies wholly at or under the threshold (a bucket across it counts slow)."""
    fast = bisect.bisect_right(LATENCY_BOUNDS_US, threshold_ms * 1000.0)
    return sum(buckets[:fast])


def events(objective: Objective, s: Sample) -> tuple[int, int]:
    """(bad, total) events of ``objective`` counted up to sample ``s``."""
    t = s.totals
    match objective.sli:
        case Sli.AVAILABILITY:
            # a request that got no prediction, or whose inference failed; inferences made without the
            # local API count as requests
            total = max(t.requests, t.inferences)
            return min(t.request_errors + t.errors, total), total
        case Sli.ERROR_RATE:
            return min(t.errors, t.inferences), t.inferences
        case Sli.LATENCY_P95 | Sli.LATENCY_P99:
            n = sum(t.latency)
            return n - latency_good(t.latency, objective.threshold or 0.0), n
        case Sli.ACCURACY:
            return t.labels - min(t.labels_correct, t.labels), t.labels
        case Sli.DRIFT_PSI:
            return s.drift_bad, s.drift_steps
    raise ValueError(objective.sli)  # pragma: no cover - every Sli is matched


def _time(s: Sample) -> float:
    return s.t


def at_or_before(samples: Sequence[Sample], t: float) -> Sample | None:
    """The latest sample taken at or before ``t`` (samples sorted by time)."""
    i = bisect.bisect_right(samples, t, key=_time)
    return samples[i - 1] if i else None


def window_events(
    objective: Objective, samples: Sequence[Sample], now: float, window_s: float
) -> tuple[int, int]:
    """(bad, total) events in the ``window_s`` before ``now``: the last sample minus the one at the
    window's start (the oldest kept when the history is shorter than the window)."""
    if not samples:
        return 0, 0
    end = at_or_before(samples, now) or samples[0]
    start = at_or_before(samples, now - window_s) or samples[0]
    b1, n1 = events(objective, end)
    b0, n0 = events(objective, start)
    total = max(n1 - n0, 0)
    return min(max(b1 - b0, 0), total), total


def burn_rate(bad: int, total: int, objective: Objective) -> float:
    """How many times faster than sustainable the budget burns (1.0: spent exactly at the window's end)."""
    return (bad / total) / objective.budget if total else 0.0


def sli_value(bad: int, total: int) -> float | None:
    return 1.0 - bad / total if total else None


# (age, spacing): samples younger than the age are kept at least this far apart
RESOLUTION: tuple[tuple[float, float], ...] = (
    (2 * 3600.0, 0.0),  # every sample of the last two hours (the 5 min and 1 h windows)
    (8 * 3600.0, 60.0),  # one a minute up to 8 h (the 30 min and 6 h windows)
    (4 * 86400.0, 600.0),  # one per 10 min up to 4 days (the 6 h and 3 d windows)
    (float("inf"), 3600.0),  # one an hour beyond (the 28-day budget)
)


def thin(samples: Sequence[Sample], now: float, keep_s: float) -> list[Sample]:
    """The samples worth keeping: none older than ``keep_s`` (but the one that starts it), and older
    ones further apart (``RESOLUTION``). Counts are cumulative, so dropping samples loses no event."""
    horizon = now - keep_s
    start = at_or_before(samples, horizon)
    kept: list[Sample] = [start] if start is not None else []
    for s in samples:
        if s.t <= horizon:
            continue
        age = now - s.t
        spacing = next(sp for limit, sp in RESOLUTION if age < limit)
        if kept and spacing and s.t - kept[-1].t < spacing and s is not samples[-1]:
            continue
        kept.append(s)
    return kept
