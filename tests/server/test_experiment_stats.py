"""The experiments' always-valid statistics against their definitions, and the small version of the
experiments bench (bench/experiments.py): seeded A/A experiments watched at every look keep
alpha, a fixed-horizon test watched the same way does not, and a 3-point lift is detected."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from bench.experiments import ALPHA, measure
from fleet_server import experiment_stats as es

V_OPT = es.design_information_proportion(1000)


@pytest.mark.parametrize(("s", "v"), [(0.0, 100.0), (30.0, 900.0), (-20.0, 400.0), (150.0, 5000.0)])
def test_closed_form_mixture_equals_its_integral(s: float, v: float) -> None:
    """M = the N(0, 1/rho)-weighted mean of the likelihood ratios exp(theta S - theta^2 V / 2)."""
    rho = es.two_sided_rho(V_OPT, ALPHA)
    sd = 1 / math.sqrt(rho)

    def integrand(theta: float) -> float:
        return float(stats.norm.pdf(theta, scale=sd)) * math.exp(theta * s - theta * theta * v / 2)

    numeric, _ = integrate.quad(integrand, -12 * sd, 12 * sd, points=[s / v], limit=200)
    assert es.log_mixture(s, v, rho) == pytest.approx(math.log(numeric), rel=1e-7, abs=1e-9)


def test_the_interval_is_where_the_mixture_stays_under_one_over_alpha() -> None:
    rho = es.two_sided_rho(V_OPT, ALPHA)
    for info in (50.0, 2_000.0, 40_000.0):
        r = es.radius(info, ALPHA, rho)
        assert es.log_mixture(info * r, info, rho) == pytest.approx(math.log(1 / ALPHA), abs=1e-9)
        # wider than the fixed-horizon interval, which is valid at one look only
        assert r > stats.norm.ppf(1 - ALPHA / 2) / math.sqrt(info)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5_000),
    st.floats(0, 1),
    st.integers(1, 5_000),
    st.floats(0, 1),
)
def test_significant_exactly_when_the_anytime_p_value_is_at_most_alpha(
    n: int, a: float, m: int, b: float
) -> None:
    eff = es.compare_proportions([es.Proportion(n, round(a * n), m, round(b * m))], ALPHA, V_OPT)
    assert eff is not None
    assert eff.lower <= eff.estimate <= eff.upper
    if abs(eff.p_value - ALPHA) > 1e-9:
        assert eff.significant == (eff.p_value < ALPHA)


def test_a_difference_in_cohort_mix_is_not_an_effect() -> None:
    """Arm and control equally accurate per cohort, but the arm has more of the worse cohort:
    pooled raw counts would call that 7 points worse; per cohort it is no effect."""
    groups = [es.Proportion(900, 810, 100, 90), es.Proportion(100, 99, 900, 891)]
    eff = es.compare_proportions(groups, ALPHA, V_OPT)
    assert eff is not None and abs(eff.estimate) < 0.005 and not eff.significant
    raw = 909 / 1000 - 981 / 1000
    assert raw < -0.07


def test_means_from_moments_and_a_variance_floor() -> None:
    a = es.Moments(3, 3.0 + 4.0 + 5.0, 9.0 + 16.0 + 25.0)
    assert a.mean == 4.0 and a.variance == pytest.approx(1.0)
    assert (a + es.Moments(1, 4.0, 16.0)).n == 4
    constant = es.MeanPair(es.Moments(10, 10.0, 10.0), es.Moments(10, 10.0, 10.0))
    assert es.compare_means([constant], ALPHA, 100.0) is None  # variance 0 on both sides: no weight
    eff = es.compare_means([constant], ALPHA, 100.0, variance_floor=1.0)
    assert eff is not None and eff.estimate == 0.0 and not eff.significant
    assert es.compare_means([es.MeanPair(es.Moments(1, 1.0, 1.0), a)], ALPHA, 100.0) is None


@pytest.mark.parametrize(
    "bad",
    [lambda: es.Proportion(5, 6, 1, 0), lambda: es.Moments(-1), lambda: es.Moments(1, math.nan, 0.0)],
)
def test_impossible_counts_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


def test_alpha_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        es.combine([(0.1, 0.01)], 1.5, 100.0)


def test_watched_at_every_look_the_always_valid_interval_keeps_alpha_and_detects_a_3_point_lift() -> None:
    m = measure(trials=60, seed=7, looks=40, per_look=100)
    n = m["trials"]
    # A/A: at most alpha (with a margin for 60 trials) although it was read at every one of 40 looks
    assert m["aa_always_valid"]["count"] <= 2 * ALPHA * n, m
    assert m["aa_means_always_valid"]["count"] <= 2 * ALPHA * n, m
    # the same data read by a fixed-horizon z-test at every look: the peeking problem
    assert m["aa_z_every_look"]["count"] >= 3 * ALPHA * n, m
    assert m["aa_z_every_look"]["count"] > 3 * max(1, m["aa_always_valid"]["count"]), m
    # 90% -> 93%: detected, the right way round, within the 4,000 labels per arm
    assert m["lift_detected"]["count"] >= 0.85 * n and m["lift_wrong_sign"] == 0, m
    assert m["lift_median_labels"] is not None and 1_000 <= m["lift_median_labels"] <= 8_000
