"""The accuracy gate's statistics against their definitions and a reference library (scipy)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import integrate, special, stats

from fleet_server.accuracy_stats import (
    Group,
    best_rho,
    boundary,
    compare,
    design_information,
    log_mixture,
    log_ndtr,
    wilson,
)

ALPHA = 0.05
V_OPT = design_information(500)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 20), (20, 20), (97, 100), (450, 500), (3, 7)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert wilson(0, 0) is None


@pytest.mark.parametrize("x", [-60.0, -38.5, -30.1, -29.9, -5.0, 0.0, 3.0, 12.0])
def test_log_ndtr_matches_scipy_far_into_the_tail(x: float) -> None:
    assert log_ndtr(x) == pytest.approx(float(special.log_ndtr(x)), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("s", "v"), [(0.0, 100.0), (30.0, 900.0), (-20.0, 400.0), (150.0, 5000.0)])
def test_closed_form_mixture_equals_its_integral(s: float, v: float) -> None:
    """M(s, v) is the half-normal mixture of the exponential supermartingales exp(l s - l^2 v / 2)."""
    rho = best_rho(V_OPT, ALPHA)

    def integrand(lam: float) -> float:
        density = 2 * math.sqrt(rho / (2 * math.pi)) * math.exp(-rho * lam * lam / 2)
        return math.exp(lam * s - lam * lam * v / 2) * density

    value, _ = integrate.quad(integrand, 0, math.inf, limit=200)
    assert log_mixture(s, v, rho) == pytest.approx(math.log(value), rel=1e-7, abs=1e-9)


def test_the_boundary_is_where_the_mixture_reaches_one_over_alpha() -> None:
    rho = best_rho(V_OPT, ALPHA)
    for v in (10.0, V_OPT, 50 * V_OPT):
        b = boundary(v, ALPHA, rho)
        assert log_mixture(b, v, rho) == pytest.approx(math.log(1 / ALPHA), abs=1e-9)
    # at the information it is tuned for, crossing takes z ~ 2.77 (a single look at 5%: 1.64)
    assert boundary(V_OPT, ALPHA, rho) / math.sqrt(V_OPT) == pytest.approx(2.77, abs=0.01)


def test_best_rho_is_the_lowest_boundary_at_its_information() -> None:
    rho = best_rho(V_OPT, ALPHA)
    best = boundary(V_OPT, ALPHA, rho)
    for k in (0.5, 0.8, 1.25, 2.0):
        assert boundary(V_OPT, ALPHA, rho * k) >= best * 0.999


def test_bad_input_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="correct counts"):
        Group(10, 11, 5, 5)
    with pytest.raises(ValueError, match="correct counts"):
        Group(10, 5, 5, -1)
    with pytest.raises(ValueError, match="alpha"):
        best_rho(100.0, 0.5)
    with pytest.raises(ValueError, match="v_opt"):
        best_rho(0.0, 0.05)


def test_nothing_to_compare_without_labels_on_both_sides() -> None:
    assert compare([], 0.0, ALPHA, V_OPT) is None
    assert compare([Group(100, 90, 0, 0), Group(0, 0, 500, 450)], 0.0, ALPHA, V_OPT) is None


def test_a_five_point_drop_is_proven_and_an_equal_model_is_not() -> None:
    worse = compare([Group(800, 720, 5000, 4750)], 0.0, ALPHA, V_OPT)
    assert worse is not None
    assert worse.change == pytest.approx(-0.05)
    assert worse.p_value < ALPHA and worse.change_upper < 0
    same = compare([Group(800, 760, 5000, 4750)], 0.0, ALPHA, V_OPT)
    assert same is not None and same.p_value == 1.0 and same.change_upper > 0
    # the margin tolerates what it says: a 5-point loss is not proven beyond 6 points
    tolerated = compare([Group(800, 720, 5000, 4750)], 0.06, ALPHA, V_OPT)
    assert tolerated is not None and tolerated.p_value > ALPHA


def test_a_difference_in_hardware_mix_is_not_an_accuracy_change() -> None:
    """Simpson's paradox: the new model ran mostly on the class that is harder for every model.

    Pooled naively, 90.9% vs 98.2% looks like a 7-point loss; class by class nothing changed.
    """
    groups = [Group(900, 810, 500, 450), Group(100, 99, 5000, 4950)]  # rpi4 90%, jetson 99%, both models
    c = compare(groups, 0.0, ALPHA, V_OPT)
    assert c is not None
    assert c.accuracy == pytest.approx(0.909) and c.baseline_accuracy == pytest.approx(0.9818, abs=1e-4)
    assert c.change == pytest.approx(0.0, abs=1e-12) and c.p_value == 1.0


counts = st.integers(1, 3000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n)))


@st.composite
def groups(draw: st.DrawFn) -> Group:
    (n1, x1), (n0, x0) = draw(counts), draw(counts)
    return Group(n1, x1, n0, x0)


@settings(max_examples=300, deadline=None)
@given(st.lists(groups(), min_size=1, max_size=3), st.sampled_from([0.0, 0.01, 0.03]))
def test_verdicts_are_coherent(gs: list[Group], margin: float) -> None:
    c = compare(gs, margin, ALPHA, V_OPT)
    assert c is not None
    assert 0.0 <= c.p_value <= 1.0 and c.information > 0
    assert c.change_upper >= c.change
    # the test and its confidence bound say the same (away from the boundary itself)
    if abs(c.change_upper + margin) > 1e-9:
        assert (c.p_value <= ALPHA) == (c.change_upper < -margin)
    # the order of the hardware classes does not matter
    again = compare(list(reversed(gs)), margin, ALPHA, V_OPT)
    assert again is not None and again.p_value == pytest.approx(c.p_value, rel=1e-9)
    # a larger margin never makes a loss easier to prove
    looser = compare(gs, margin + 0.02, ALPHA, V_OPT)
    assert looser is not None and looser.p_value >= c.p_value


@settings(max_examples=300, deadline=None)
@given(groups())
def test_a_model_at_least_as_accurate_never_trips_and_more_correct_labels_never_hurt(g: Group) -> None:
    c = compare([g], 0.0, ALPHA, V_OPT)
    assert c is not None
    if g.correct / g.labels >= g.baseline_correct / g.baseline_labels:
        assert c.p_value == 1.0 or c.p_value > ALPHA
    assume(g.correct < g.labels)
    better = compare(
        [Group(g.labels, g.correct + 1, g.baseline_labels, g.baseline_correct)], 0.0, ALPHA, V_OPT
    )
    assert better is not None and better.p_value >= c.p_value
