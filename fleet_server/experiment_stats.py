"""Statistics of an A/B experiment between model versions: the effect of an arm against the
control, with an always-valid (anytime) confidence interval and p-value, for proportions
(accuracy, error rate) and for means (latency, an app's outcome metric).

People watch an experiment every day and stop it when it "looks significant". A
fixed-horizon test (a z-test at ``alpha``) read at every look then declares a difference
between two identical models in a fifth to a third of experiments (bench/experiments.py
measures it). The interval here is a *confidence sequence*: with probability at least
``1 - alpha`` it covers the true effect at every look at once, however many looks there are
and whenever the watcher stops. So the console and the CLI may show it at any time, and
"the interval excludes 0" is a decision with a false-positive rate of at most ``alpha``
(docs/decisions/0027-experiments-confidence-sequences.md says why this method).

The sequence is the two-sided normal mixture (Robbins 1970; the mSPRT of Johari, Pekelis and
Walsh 2017; the boundary of Howard, Ramdas, McAuliffe and Sekhon 2021), the two-sided twin of
the accuracy gate's one-sided test (``fleet_server.accuracy_stats``, whose mixture tuning it
reuses). With ``d`` the estimated effect (arm minus control), ``I`` its information (one over its
variance) and ``S = I d``:

    M = sqrt(rho / (I + rho)) exp(S^2 / (2 (I + rho)))   (the likelihood ratios of every
                                                          effect size, mixed with N(0, 1/rho))

is a non-negative martingale under "no effect" (normal approximation), so it ever reaches
``1 / alpha`` with probability at most ``alpha`` (Ville). Inverting it gives the interval

    d +- sqrt((I + rho) (log((I + rho) / rho) + 2 log(1 / alpha))) / I

and the anytime p-value ``min(1, 1 / M)``. Estimates are combined over hardware cohorts with
inverse-variance weights, as the accuracy gate does: assignment is stratified per cohort, and
the weights keep a difference in cohort mix from passing as an effect.

Pure: ``math`` and ``statistics`` only, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

from fleet_server.accuracy_stats import best_rho, proportion_variance

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Proportion:
    """Successes out of trials in one cohort, for the arm and for the control (accuracy: correct
    out of labelled; error rate: errors out of inferences)."""

    n: int
    x: int
    control_n: int
    control_x: int

    def __post_init__(self) -> None:
        if not (0 <= self.x <= self.n and 0 <= self.control_x <= self.control_n):
            raise ValueError(f"successes must lie within 0..trials: {self}")


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of a metric's values: enough for a mean and its variance,
    and additive across devices and telemetry windows."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def __post_init__(self) -> None:
        if self.n < 0 or not (math.isfinite(self.total) and math.isfinite(self.total_sq)):
            raise ValueError(f"moments need n >= 0 and finite sums: {self}")

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float:
        """The sample variance (0 with fewer than two values; never negative from rounding)."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))


@dataclass(frozen=True)
class MeanPair:
    """A metric's moments in one cohort, for the arm and for the control."""

    arm: Moments
    control: Moments


@dataclass(frozen=True)
class Effect:
    """The arm's effect against the control (arm minus control), always valid at ``1 - alpha``."""

    estimate: float
    lower: float
    upper: float
    p_value: float  # anytime p-value of "no effect"
    information: float  # 1 / variance of ``estimate``
    alpha: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (equivalently, ``p_value <= alpha``)."""
        return self.lower > 0 or self.upper < 0


def radius(information: float, alpha: float, rho: float) -> float:
    """Half-width of the confidence sequence at ``information`` (in the effect's own units)."""
    total = information + rho
    return math.sqrt(total * (math.log(total / rho) + 2 * math.log(1 / alpha))) / information


def log_mixture(s: float, information: float, rho: float) -> float:
    """log M of the two-sided normal mixture at ``S = I d`` (module docstring)."""
    total = information + rho
    return 0.5 * math.log(rho / total) + s * s / (2 * total)


def two_sided_rho(v_opt: float, alpha: float) -> float:
    """The mixture tuning that makes the two-sided interval narrowest at information ``v_opt``
    (the one-sided optimum at ``alpha / 2``: Howard et al. 2021, eq. 14)."""
    return best_rho(v_opt, alpha / 2)


def combine(estimates: Iterable[tuple[float, float]], alpha: float, v_opt: float) -> Effect | None:
    """Pool per-cohort (effect, variance) pairs with inverse-variance weights and put the always-
    valid interval around the pooled effect. ``v_opt``: the information the interval is tuned
    for, fixed before any data is seen (``design_information_*``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    weight_sum = weighted = 0.0
    for d, var in estimates:
        if var <= 0 or not math.isfinite(var) or not math.isfinite(d):
            continue
        weight_sum += 1 / var
        weighted += d / var
    if weight_sum <= 0:
        return None
    d, info = weighted / weight_sum, weight_sum
    rho = two_sided_rho(v_opt, alpha)
    r = radius(info, alpha, rho)
    p = min(1.0, math.exp(-log_mixture(info * d, info, rho)))
    return Effect(estimate=d, lower=d - r, upper=d + r, p_value=p, information=info, alpha=alpha)


def proportion_estimates(groups: Iterable[Proportion]) -> list[tuple[float, float]]:
    """Per cohort with data on both sides: (rate difference, its add-one variance)."""
    return [
        (
            g.x / g.n - g.control_x / g.control_n,
            proportion_variance(g.x, g.n) + proportion_variance(g.control_x, g.control_n),
        )
        for g in groups
        if g.n > 0 and g.control_n > 0
    ]


def mean_estimates(groups: Iterable[MeanPair], variance_floor: float = 0.0) -> list[tuple[float, float]]:
    """Per cohort with at least two values on both sides: (mean difference, its variance).

    ``variance_floor`` bounds a per-value variance from below (a metric that happened to take one
    value so far would otherwise have a variance of 0 and an infinite weight)."""
    out: list[tuple[float, float]] = []
    for g in groups:
        a, c = g.arm, g.control
        if a.n < 2 or c.n < 2 or a.mean is None or c.mean is None:
            continue
        var = max(a.variance, variance_floor) / a.n + max(c.variance, variance_floor) / c.n
        out.append((a.mean - c.mean, var))
    return out


def compare_proportions(groups: Iterable[Proportion], alpha: float, v_opt: float) -> Effect | None:
    """The arm's rate minus the control's, pooled over cohorts, always valid (None: no data)."""
    return combine(proportion_estimates(groups), alpha, v_opt)


def compare_means(
    groups: Iterable[MeanPair], alpha: float, v_opt: float, variance_floor: float = 0.0
) -> Effect | None:
    """The arm's mean minus the control's, pooled over cohorts, always valid (None: no data)."""
    return combine(mean_estimates(groups, variance_floor), alpha, v_opt)


def design_information_proportion(n_per_arm: int, rate: float = 0.9) -> float:
    """Information of a rate difference with ``n_per_arm`` trials on each side at ``rate``: what
    the interval is tuned for. Fixed by the experiment's declaration, never by its data."""
    rate = min(max(rate, 0.01), 0.99)
    return n_per_arm / (2 * rate * (1 - rate))


def design_information_mean(n_per_arm: int, sd: float) -> float:
    """Information of a mean difference with ``n_per_arm`` values each side of spread ``sd``."""
    if sd <= 0:
        raise ValueError("a design spread must be > 0")
    return n_per_arm / (2 * sd * sd)


def fixed_horizon_p_value(estimates: Iterable[tuple[float, float]]) -> float | None:
    """The two-sided z-test p-value of the pooled effect: valid only when read ONCE, at a sample
    size fixed in advance. Kept to show (in the bench and the docs) what reading it at every look
    does to the false-positive rate; never used to decide."""
    weight_sum = weighted = 0.0
    for d, var in estimates:
        if var > 0:
            weight_sum += 1 / var
            weighted += d / var
    if weight_sum <= 0:
        return None
    z = (weighted / weight_sum) * math.sqrt(weight_sum)
    return 2 * (1 - _NORMAL.cdf(abs(z)))


__all__ = [
    "Effect",
    "MeanPair",
    "Moments",
    "Proportion",
    "combine",
    "compare_means",
    "compare_proportions",
    "design_information_mean",
    "design_information_proportion",
    "fixed_horizon_p_value",
    "log_mixture",
    "mean_estimates",
    "proportion_estimates",
    "radius",
    "two_sided_rho",
]
