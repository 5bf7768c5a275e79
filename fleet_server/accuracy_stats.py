"""Statistics of accuracy from labelled counts: the interval of one model's accuracy, and the
always-valid one-sided test that a new model is less accurate than the one it replaces.

The rollout engine looks at the figures on every tick, and labels keep arriving between two
ticks. A fixed-sample test (a z-test at ``alpha``) repeated on every tick raises a false alarm
far more often than ``alpha`` (the repeated looks of an A/B test that is "peeked at"; the gate
bench measures it: bench/gates.py). The test here is *always valid*: the chance that it ever
rejects, at any of any number of looks, while the new model is in truth no worse than the
margin allows, is at most ``alpha``. So the engine may look as often as it likes, through every
stage, a pause and a restart, without spending more than ``alpha``
(docs/decisions/0016-accuracy-gate-always-valid-test.md says why this test and not another).

The test is the one-sided normal-mixture test (Robbins 1970; the "mSPRT" of Johari et al.
2017; the boundary of Howard, Ramdas, McAuliffe and Sekhon 2021). With ``d`` the estimated
accuracy change (new minus replaced) and ``I`` its information (one over its variance),
``s = I * (-margin - d)`` is the evidence that the new model lost more than ``margin``, and

    M(s, I) = 2 sqrt(rho / (I + rho)) exp(s^2 / (2 (I + rho))) Phi(s / sqrt(I + rho))

is (in the normal approximation, where ``s`` moves like a Brownian motion in ``I``) a
non-negative supermartingale while the null holds: by Ville's inequality it ever reaches
``1 / alpha`` with probability at most ``alpha``. ``M`` mixes the likelihood ratios of every
drop size with a half-normal weight; ``rho`` sets where it is most sensitive (``best_rho``).
The estimate is the difference of the two raw accuracies, its variance from add-one
(Agresti-Caffo) estimates, so that a small sample that is perfect by chance does not have a
variance of zero. With several hardware classes the per-class changes are combined with
inverse-variance weights (the efficient estimate of a common change): a mix of hardware that
differs between the two models' devices then does not show up as an accuracy change.

Only ``math`` and ``statistics``: the server needs no numerical library for this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

_NORMAL = NormalDist()
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def wilson(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n`` (None when n is 0).

    Wilson rather than the textbook ``p +- z sqrt(p(1-p)/n)``: that one collapses to a single
    point at 0% or 100% and covers badly near them, where accuracies live.
    """
    if n <= 0:
        return None
    z = _NORMAL.inv_cdf(0.5 + confidence / 2)
    p = correct / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def log_ndtr(x: float) -> float:
    """log Phi(x), also far in the lower tail where Phi(x) underflows to 0."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2)))
    # Phi(x) ~ phi(x) / -x (1 - 1/x^2 + 3/x^4): the Mills ratio series, exact to 1e-9 here
    return -x * x / 2 - _LOG_SQRT_2PI - math.log(-x) + math.log1p(-1 / (x * x) + 3 / x**4)


def best_rho(v_opt: float, alpha: float) -> float:
    """The mixture's ``rho`` that makes the one-sided boundary lowest at information ``v_opt``.

    Howard et al. 2021 (eq. 14, one-sided: the two-sided choice at ``2 alpha``). The boundary
    is flat around its optimum (a factor 4 away from it costs ~2% in the crossing z), so an
    approximate ``v_opt`` loses little power.
    """
    if v_opt <= 0 or not 0 < alpha < 0.5:
        raise ValueError(f"best_rho needs v_opt > 0 and 0 < alpha < 0.5 (got {v_opt}, {alpha})")
    ell = math.log(1 / (2 * alpha))
    return v_opt / (2 * ell + math.log(1 + 2 * ell))


def log_mixture(s: float, v: float, rho: float) -> float:
    """log M(s, v) of the one-sided normal mixture (module docstring); increasing in ``s``."""
    total = v + rho
    return 0.5 * math.log(4 * rho / total) + s * s / (2 * total) + log_ndtr(s / math.sqrt(total))


def boundary(v: float, alpha: float, rho: float) -> float:
    """The ``s`` at which M(s, v) reaches ``1 / alpha``: the test rejects above it."""
    target = math.log(1 / alpha)
    lo, hi = 0.0, math.sqrt((v + rho) * (math.log(1 + v / rho) + 2 * target)) + 1.0
    while log_mixture(hi, v, rho) < target:  # the two-sided boundary is almost always enough
        hi *= 2
    for _ in range(80):  # bisection to ~1e-12 relative: far below anything a gate shows
        mid = (lo + hi) / 2
        if log_mixture(mid, v, rho) < target:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class Group:
    """Labelled predictions of the new and of the replaced model on one hardware class."""

    labels: int
    correct: int
    baseline_labels: int
    baseline_correct: int

    def __post_init__(self) -> None:
        if not (0 <= self.correct <= self.labels and 0 <= self.baseline_correct <= self.baseline_labels):
            raise ValueError(f"correct counts must lie within 0..labels: {self}")


@dataclass(frozen=True)
class Comparison:
    """The new model's accuracy against the replaced model's, and the always-valid verdict."""

    labels: int
    correct: int
    baseline_labels: int
    baseline_correct: int
    change: float  # estimated accuracy change, new minus replaced (-0.05: five points worse)
    change_upper: float  # always-valid upper confidence bound of the change at 1 - alpha
    p_value: float  # always-valid p-value of "the new model lost more than the margin"
    information: float  # 1 / variance of ``change``

    @property
    def accuracy(self) -> float:
        return self.correct / self.labels

    @property
    def baseline_accuracy(self) -> float:
        return self.baseline_correct / self.baseline_labels


def proportion_variance(correct: int, n: int) -> float:
    """Variance of an accuracy estimate from add-one counts (never 0, even at 0 or n correct)."""
    p = (correct + 1) / (n + 2)
    return p * (1 - p) / (n + 2)


def compare(groups: Iterable[Group], margin: float, alpha: float, v_opt: float) -> Comparison | None:
    """Test "the new model is less accurate than the replaced one by more than ``margin``".

    Over the groups where both models have labels (None when there is none). ``v_opt``: the
    information at which the test is most sensitive (``best_rho``); it must be fixed before the
    data is seen, never derived from it.
    """
    usable = [g for g in groups if g.labels > 0 and g.baseline_labels > 0]
    if not usable:
        return None
    weight_sum = weighted = 0.0
    for g in usable:
        w = 1 / (
            proportion_variance(g.correct, g.labels)
            + proportion_variance(g.baseline_correct, g.baseline_labels)
        )
        weight_sum += w
        weighted += w * (g.correct / g.labels - g.baseline_correct / g.baseline_labels)
    change, info = weighted / weight_sum, weight_sum
    rho = best_rho(v_opt, alpha)
    s = info * (-margin - change)
    p_value = min(1.0, math.exp(-log_mixture(s, info, rho)))
    return Comparison(
        labels=sum(g.labels for g in usable),
        correct=sum(g.correct for g in usable),
        baseline_labels=sum(g.baseline_labels for g in usable),
        baseline_correct=sum(g.baseline_correct for g in usable),
        change=change,
        change_upper=change + boundary(info, alpha, rho) / info,
        p_value=p_value,
        information=info,
    )


def design_information(min_labels: int) -> float:
    """The information the test is tuned for: the new model at ``min_labels`` labels and 90%
    accuracy, against a replaced model with many more labels.

    Fixed by the policy alone, so the test is the same whichever data arrives. The boundary is
    flat around its optimum: for models between 50% and 99% accurate the z it takes to trip at
    ``min_labels`` stays within ~8% of the best possible for that accuracy (2.8-3.0 at alpha
    0.05, against 1.64 for a test that looks only once).
    """
    return min_labels / (0.9 * 0.1)


__all__ = [
    "Comparison",
    "Group",
    "best_rho",
    "boundary",
    "compare",
    "design_information",
    "log_mixture",
    "log_ndtr",
    "proportion_variance",
    "wilson",
]
