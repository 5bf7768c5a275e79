"""A/B experiments, the decisions: which arm a device is in, what each arm measured, and what the
figures say (pure: counts in, figures and verdicts out; ``fleet_server.experiments`` does the I/O).

- **Assignment** (:func:`assign`): per hardware cohort, the cohort's devices are ordered by a
  stable hash of (experiment id, device id) and cut into the arms by their weights (largest
  remainder). So every cohort is split by the weights (a cohort of 10 at 50/50 gives 5 and 5, not
  whatever a coin gives), the order is the same on every replica and every run, and no device's
  arm depends on the order the database returns rows in.
- **Metrics** (:func:`arm_metrics`): accuracy from labels, error rate from inferences, latency
  from the devices' latency histograms, and the app's outcome metrics, per arm, from counts made
  since each device joined the experiment.
- **Verdict** (:func:`evaluate`): every non-control arm against the control, on every metric,
  with the always-valid interval (``fleet_server.experiment_stats``), at ``alpha`` split evenly
  over the non-control arms (Bonferroni). A guardrail is breached when the interval lies wholly
  beyond the harm it allows; the primary metric names a winner when its interval excludes 0.
  Both may be read at any look: the figures keep their error rates however often they are read.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from device_agent.wire import LATENCY_BOUNDS_US
from fleet_server import experiment_stats as es
from fleet_server.accuracy_stats import wilson

Better = Literal["higher", "lower"]

ACCURACY = "accuracy"
ERROR_RATE = "error_rate"
LATENCY = "latency_ms"
OUTCOME_PREFIX = "outcome:"
BUILTIN_METRICS = (ACCURACY, ERROR_RATE, LATENCY)
DEFAULT_BETTER: dict[str, Better] = {ACCURACY: "higher", ERROR_RATE: "lower", LATENCY: "lower"}
# What the interval of a metric is tuned for (fixed by the declaration, never by the data): a
# proportion near its usual value; a mean with this spread per value, in the metric's unit.
DESIGN_RATE = {ACCURACY: 0.9, ERROR_RATE: 0.05}
DESIGN_SD = {LATENCY: 10.0}  # ms
DESIGN_SD_OUTCOME = 1.0
LATENCY_VARIANCE_FLOOR = 0.01  # ms^2: a latency spread below the histogram's resolution is not real


def metric_better(metric: str, declared: Better | None = None) -> Better:
    """Which way is better for ``metric``: declared for an outcome, fixed for the built-in ones."""
    if declared is not None:
        return declared
    return DEFAULT_BETTER.get(metric, "higher")


def is_metric(name: str) -> bool:
    return name in BUILTIN_METRICS or (name.startswith(OUTCOME_PREFIX) and len(name) > len(OUTCOME_PREFIX))


def order_key(experiment_id: str, device_id: str) -> str:
    """The device's place in its cohort's order: a stable hash, the same on every replica."""
    return hashlib.sha256(f"experiment:{experiment_id}:{device_id}".encode()).hexdigest()


def quotas(n: int, weights: Sequence[float]) -> list[int]:
    """``n`` devices split by ``weights`` (largest remainder; ties to the earlier arm)."""
    total = sum(weights)
    if n < 0 or total <= 0 or any(w < 0 for w in weights):
        raise ValueError("quotas need n >= 0 and non-negative weights with a positive sum")
    exact = [n * w / total for w in weights]
    base = [math.floor(x) for x in exact]
    rest = n - sum(base)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base


def assign(
    experiment_id: str, devices: Iterable[tuple[str, str]], arms: Sequence[tuple[str, float]]
) -> dict[str, str]:
    """device id -> arm name for ``devices`` ((device id, hardware id) pairs), every hardware cohort
    split by the arms' weights."""
    cohorts: dict[str, list[str]] = {}
    for device_id, hw in devices:
        cohorts.setdefault(hw, []).append(device_id)
    out: dict[str, str] = {}
    names = [a for a, _ in arms]
    weights = [w for _, w in arms]
    for members in cohorts.values():
        ordered = sorted(members, key=lambda d: order_key(experiment_id, d))
        start = 0
        for name, q in zip(names, quotas(len(ordered), weights), strict=True):
            for d in ordered[start : start + q]:
                out[d] = name
            start += q
    return out


def latency_moments(buckets: Sequence[int]) -> es.Moments:
    """Count, sum and sum of squares of latencies (ms) from a latency histogram: each bucket's
    values taken at the geometric middle of its bounds (the bounds are a factor sqrt(2) apart, so
    a value is off by at most 19%; the error is the same for both arms and cancels in the
    difference). The last bucket (above the largest bound) counts at the largest bound."""
    n = 0
    total = total_sq = 0.0
    for i, k in enumerate(buckets):
        if k <= 0:
            continue
        value_us = LATENCY_BOUNDS_US[i] / 2**0.25 if i < len(LATENCY_BOUNDS_US) else LATENCY_BOUNDS_US[-1]
        v = value_us / 1000.0
        n += k
        total += k * v
        total_sq += k * v * v
    return es.Moments(n, total, total_sq)


@dataclass
class Counts:
    """What one arm's devices of one hardware cohort measured on the arm's model (additive)."""

    devices: int = 0
    inferences: int = 0
    errors: int = 0
    labels: int = 0
    labels_correct: int = 0
    latency: list[int] = field(default_factory=list)
    outcomes: dict[str, es.Moments] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        self.devices += other.devices
        self.inferences += other.inferences
        self.errors += other.errors
        self.labels += other.labels
        self.labels_correct += other.labels_correct
        width = max(len(self.latency), len(other.latency))
        self.latency = [
            (self.latency[i] if i < len(self.latency) else 0)
            + (other.latency[i] if i < len(other.latency) else 0)
            for i in range(width)
        ]
        for name, m in other.outcomes.items():
            self.outcomes[name] = self.outcomes.get(name, es.Moments()) + m

    def minus(self, start: Counts) -> Counts:
        """These counts less those at ``start`` (cumulative counters: what happened since), never
        below zero (a device whose counts were reset starts afresh)."""
        lat = [
            max(0, v - (start.latency[i] if i < len(start.latency) else 0))
            for i, v in enumerate(self.latency)
        ]
        outcomes = {}
        for name, m in self.outcomes.items():
            s = start.outcomes.get(name, es.Moments())
            if m.n >= s.n:
                outcomes[name] = es.Moments(m.n - s.n, m.total - s.total, max(0.0, m.total_sq - s.total_sq))
            else:
                outcomes[name] = m
        return Counts(
            devices=self.devices,
            inferences=max(0, self.inferences - start.inferences),
            errors=max(0, min(self.errors - start.errors, self.inferences - start.inferences)),
            labels=max(0, self.labels - start.labels),
            labels_correct=max(
                0, min(self.labels_correct - start.labels_correct, self.labels - start.labels)
            ),
            latency=lat,
            outcomes=outcomes,
        )


ArmCounts = Mapping[str, Counts]  # hardware cohort -> counts


def _total(counts: ArmCounts) -> Counts:
    t = Counts()
    for c in counts.values():
        t.add(c)
    return t


@dataclass(frozen=True)
class MetricFigure:
    """One metric of one arm: its value, the sample behind it and a 95% interval of the value alone
    (a single look: for reading, never for deciding; deciding is :class:`Comparison`'s)."""

    metric: str
    value: float | None
    samples: int
    low: float | None = None
    high: float | None = None


def arm_metrics(counts: ArmCounts) -> dict[str, MetricFigure]:
    t = _total(counts)
    out: dict[str, MetricFigure] = {}
    acc = wilson(t.labels_correct, t.labels)
    out[ACCURACY] = MetricFigure(
        ACCURACY, t.labels_correct / t.labels if t.labels else None, t.labels, *(acc or (None, None))
    )
    err = wilson(t.errors, t.inferences)
    out[ERROR_RATE] = MetricFigure(
        ERROR_RATE, t.errors / t.inferences if t.inferences else None, t.inferences, *(err or (None, None))
    )
    out[LATENCY] = _mean_figure(LATENCY, latency_moments(t.latency))
    for name, m in sorted(t.outcomes.items()):
        out[OUTCOME_PREFIX + name] = _mean_figure(OUTCOME_PREFIX + name, m)
    return out


def _mean_figure(metric: str, m: es.Moments) -> MetricFigure:
    if m.mean is None:
        return MetricFigure(metric, None, 0)
    half = 1.96 * math.sqrt(m.variance / m.n) if m.n > 1 else None
    return MetricFigure(
        metric, m.mean, m.n, None if half is None else m.mean - half, None if half is None else m.mean + half
    )


def _samples(metric: str, c: Counts) -> int:
    if metric == ACCURACY:
        return c.labels
    if metric == ERROR_RATE:
        return c.inferences
    if metric == LATENCY:
        return sum(c.latency)
    return c.outcomes.get(metric[len(OUTCOME_PREFIX) :], es.Moments()).n


def effect(
    metric: str, arm: ArmCounts, control: ArmCounts, alpha: float, design_samples: int
) -> es.Effect | None:
    """The arm's ``metric`` minus the control's, per cohort present in both, always valid."""
    cohorts = sorted(set(arm) & set(control))
    if metric in (ACCURACY, ERROR_RATE):
        groups = [
            es.Proportion(arm[h].labels, arm[h].labels_correct, control[h].labels, control[h].labels_correct)
            if metric == ACCURACY
            else es.Proportion(arm[h].inferences, arm[h].errors, control[h].inferences, control[h].errors)
            for h in cohorts
        ]
        v_opt = es.design_information_proportion(design_samples, DESIGN_RATE[metric])
        return es.compare_proportions(groups, alpha, v_opt)
    if metric == LATENCY:
        pairs = [
            es.MeanPair(latency_moments(arm[h].latency), latency_moments(control[h].latency)) for h in cohorts
        ]
        v_opt = es.design_information_mean(design_samples, DESIGN_SD[LATENCY])
        return es.compare_means(pairs, alpha, v_opt, variance_floor=LATENCY_VARIANCE_FLOOR)
    name = metric[len(OUTCOME_PREFIX) :]
    pairs = [
        es.MeanPair(arm[h].outcomes.get(name, es.Moments()), control[h].outcomes.get(name, es.Moments()))
        for h in cohorts
    ]
    return es.compare_means(pairs, alpha, es.design_information_mean(design_samples, DESIGN_SD_OUTCOME))


@dataclass(frozen=True)
class Guardrail:
    """Stop an arm whose ``metric`` is worse than the control's by more than ``max_harm`` (in the
    metric's unit: 0.02 = two points of accuracy, 5 = 5 ms), proven by the always-valid interval."""

    metric: str
    max_harm: float = 0.0
    better: Better | None = None


@dataclass(frozen=True)
class Spec:
    """What an experiment declared: the figures it is judged by."""

    control: str
    metric: str = ACCURACY
    better: Better | None = None
    alpha: float = 0.05
    min_samples: int = 200  # of the primary metric, on the arm and on the control, before any verdict
    design_samples: int = 1000  # per arm: where the intervals are tuned to be narrowest
    guardrails: tuple[Guardrail, ...] = ()


@dataclass(frozen=True)
class Comparison:
    arm: str
    metric: str
    effect: es.Effect | None
    better: Better
    samples: int
    control_samples: int

    @property
    def verdict(self) -> str:
        """``better``, ``worse``, ``no_difference_yet`` (the interval holds 0) or ``no_data``."""
        if self.effect is None:
            return "no_data"
        if not self.effect.significant:
            return "no_difference_yet"
        up = self.effect.estimate > 0
        return "better" if up == (self.better == "higher") else "worse"


@dataclass(frozen=True)
class Breach:
    arm: str
    metric: str
    reason: str


@dataclass(frozen=True)
class Evaluation:
    comparisons: tuple[Comparison, ...]
    breaches: tuple[Breach, ...]
    winner: str | None  # an arm proven better than the control (or the control, all others worse)
    reason: str
    alpha_per_arm: float


def _harm(g: Guardrail, e: es.Effect) -> float:
    """How much worse than the control the arm is at least, by the interval (> 0: proven harm)."""
    return -e.upper if metric_better(g.metric, g.better) == "higher" else e.lower


def evaluate(spec: Spec, arms: Mapping[str, ArmCounts], running: Iterable[str]) -> Evaluation:
    """Every non-control arm of ``running`` against the control: comparisons on the primary metric and
    the guardrails, guardrail breaches, and a winner once the primary metric proves one. ``arms``
    holds every declared arm (``alpha`` is split over all of them)."""
    control = arms.get(spec.control, {})
    others = [a for a in running if a != spec.control]
    # split over every arm the experiment declared, not only those still running: an arm stopped
    # early spent its share already
    alpha = spec.alpha / max(1, len([a for a in set(arms) | set(running) if a != spec.control]))
    comparisons: list[Comparison] = []
    breaches: list[Breach] = []
    better_arms: list[tuple[float, str]] = []
    worse = 0
    metrics = [spec.metric] + [g.metric for g in spec.guardrails if g.metric != spec.metric]
    ctl_total = _total(control)
    for arm in others:
        counts = arms.get(arm, {})
        total = _total(counts)
        for metric in metrics:
            better = metric_better(metric, spec.better if metric == spec.metric else None)
            for g in spec.guardrails:
                if g.metric == metric and g.better is not None:
                    better = g.better
            e = effect(metric, counts, control, alpha, spec.design_samples)
            c = Comparison(arm, metric, e, better, _samples(metric, total), _samples(metric, ctl_total))
            comparisons.append(c)
            for g in spec.guardrails:
                if g.metric == metric and e is not None and _harm(g, e) > g.max_harm:
                    breaches.append(
                        Breach(
                            arm,
                            metric,
                            f"{metric} worse than {spec.control} by at least {_harm(g, e):.4g}"
                            f" (allowed {g.max_harm:g}; effect {e.estimate:+.4g},"
                            f" interval {e.lower:+.4g}..{e.upper:+.4g}, anytime p {e.p_value:.3g})",
                        )
                    )
            if metric == spec.metric:
                enough = c.samples >= spec.min_samples and c.control_samples >= spec.min_samples
                if enough and c.verdict == "better" and e is not None:
                    better_arms.append((abs(e.estimate), arm))
                elif enough and c.verdict == "worse":
                    worse += 1
    breached = {b.arm for b in breaches}
    candidates = sorted((v, a) for v, a in better_arms if a not in breached)
    if candidates:
        winner = candidates[-1][1]
        reason = f"{winner} beats {spec.control} on {spec.metric}"
    elif others and worse == len(others):
        winner, reason = spec.control, f"every arm is worse than {spec.control} on {spec.metric}"
    else:
        winner, reason = None, "no arm proven better or worse yet"
    return Evaluation(tuple(comparisons), tuple(breaches), winner, reason, alpha)


__all__ = [
    "ACCURACY",
    "BUILTIN_METRICS",
    "ERROR_RATE",
    "LATENCY",
    "OUTCOME_PREFIX",
    "Breach",
    "Comparison",
    "Counts",
    "Evaluation",
    "Guardrail",
    "MetricFigure",
    "Spec",
    "arm_metrics",
    "assign",
    "effect",
    "evaluate",
    "is_metric",
    "latency_moments",
    "metric_better",
    "order_key",
    "quotas",
]
