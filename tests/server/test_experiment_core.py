"""Experiments' pure decisions: stratified stable assignment, per-arm figures, guardrails and the winner."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server import experiment_core as core
from fleet_server.experiment_stats import Moments


def test_every_cohort_is_split_by_the_weights_and_the_split_is_stable() -> None:
    devices = [(f"d{i}", "rpi4") for i in range(10)] + [(f"j{i}", "jetson") for i in range(7)]
    a = core.assign("exp1", devices, [("control", 1), ("candidate", 1)])
    per = {(hw, arm): 0 for hw in ("rpi4", "jetson") for arm in ("control", "candidate")}
    for d, hw in devices:
        per[(hw, a[d])] += 1
    assert per == {
        ("rpi4", "control"): 5,
        ("rpi4", "candidate"): 5,
        ("jetson", "control"): 4,
        ("jetson", "candidate"): 3,
    }
    shuffled = devices[:]
    random.Random(3).shuffle(shuffled)
    assert core.assign("exp1", shuffled, [("control", 1), ("candidate", 1)]) == a  # order does not matter
    assert (
        core.assign("exp2", devices, [("control", 1), ("candidate", 1)]) != a
    )  # another experiment: another split


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.lists(st.floats(0.01, 10), min_size=1, max_size=6))
def test_quotas_add_up_and_follow_the_weights_within_one(n: int, weights: list[float]) -> None:
    q = core.quotas(n, weights)
    assert sum(q) == n
    total = sum(weights)
    assert all(abs(k - n * w / total) < 1 for k, w in zip(q, weights, strict=True))


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError):
        core.quotas(3, [0, 0])
    with pytest.raises(ValueError):
        core.quotas(3, [1, -1])


def test_latency_moments_from_a_histogram() -> None:
    buckets = [0] * 41
    buckets[20] = 10  # bound 10 * 2^10 us = 10.24 ms; geometric middle of (7.24, 10.24]
    m = core.latency_moments(buckets)
    assert m.n == 10 and m.mean == pytest.approx(10.24 / 2**0.25)
    buckets[40] = 1  # above the largest bound: counted at it
    assert core.latency_moments(buckets).n == 11


def test_counts_since_the_start_never_go_negative() -> None:
    now = core.Counts(
        inferences=100,
        errors=3,
        labels=50,
        labels_correct=45,
        latency=[1, 5],
        outcomes={"x": Moments(4, 8.0, 20.0)},
    )
    start = core.Counts(
        inferences=40,
        errors=1,
        labels=10,
        labels_correct=9,
        latency=[1, 2],
        outcomes={"x": Moments(1, 2.0, 4.0)},
    )
    d = now.minus(start)
    assert (d.inferences, d.errors, d.labels, d.labels_correct, d.latency) == (60, 2, 40, 36, [0, 3])
    assert d.outcomes["x"] == Moments(3, 6.0, 16.0)
    reset = core.Counts(inferences=5).minus(start)  # the device's counters were reset: no negative counts
    assert reset.inferences == 0 and reset.errors == 0


def _arm(
    labels: int, correct: int, inferences: int = 1000, errors: int = 10, hw: str = "rpi4"
) -> dict[str, core.Counts]:
    return {
        hw: core.Counts(
            devices=5, inferences=inferences, errors=errors, labels=labels, labels_correct=correct
        )
    }


def test_an_arm_proven_more_accurate_wins() -> None:
    spec = core.Spec(control="control", metric="accuracy")
    arms = {"control": _arm(4000, 3600), "candidate": _arm(4000, 3800)}
    ev = core.evaluate(spec, arms, ["control", "candidate"])
    assert ev.winner == "candidate" and not ev.breaches
    (acc,) = [c for c in ev.comparisons if c.metric == "accuracy"]
    assert acc.verdict == "better" and acc.effect is not None and acc.effect.lower > 0
    assert acc.effect.estimate == pytest.approx(0.05)


def test_no_verdict_below_the_minimum_sample_and_none_for_equal_arms() -> None:
    spec = core.Spec(control="control", metric="accuracy", min_samples=500)
    small = {"control": _arm(100, 50), "candidate": _arm(100, 99)}
    assert core.evaluate(spec, small, ["control", "candidate"]).winner is None
    equal = {"control": _arm(3000, 2700), "candidate": _arm(3000, 2700)}
    ev = core.evaluate(spec, equal, ["control", "candidate"])
    assert ev.winner is None and ev.reason.startswith("no arm")


def test_a_guardrail_breach_is_reported_and_the_breaching_arm_cannot_win() -> None:
    spec = core.Spec(
        control="control",
        metric="accuracy",
        guardrails=(core.Guardrail("error_rate", 0.01),),
    )
    arms = {
        "control": _arm(4000, 3600, inferences=20_000, errors=200),
        "candidate": _arm(4000, 3800, inferences=20_000, errors=2_000),  # 10% errors against 1%
    }
    ev = core.evaluate(spec, arms, ["control", "candidate"])
    (b,) = ev.breaches
    assert b.arm == "candidate" and b.metric == "error_rate" and "allowed 0.01" in b.reason
    assert ev.winner is None
    # within the allowed harm: no breach
    ok = {"control": arms["control"], "candidate": _arm(4000, 3800, inferences=20_000, errors=240)}
    assert not core.evaluate(spec, ok, ["control", "candidate"]).breaches


def test_an_outcome_metric_with_lower_is_better() -> None:
    spec = core.Spec(control="a", metric="outcome:seconds_to_fix", better="lower", min_samples=10)
    rng = random.Random(1)

    def moments(mu: float) -> Moments:
        vals = [rng.gauss(mu, 1.0) for _ in range(2000)]
        return Moments(len(vals), sum(vals), sum(v * v for v in vals))

    arms = {
        "a": {"rpi4": core.Counts(outcomes={"seconds_to_fix": moments(10.0)})},
        "b": {"rpi4": core.Counts(outcomes={"seconds_to_fix": moments(9.5)})},
    }
    ev = core.evaluate(spec, arms, ["a", "b"])
    assert ev.winner == "b"
    figures = core.arm_metrics(arms["b"])
    assert figures["outcome:seconds_to_fix"].samples == 2000


def test_alpha_is_split_over_the_arms() -> None:
    spec = core.Spec(control="c", alpha=0.06)
    ev = core.evaluate(spec, {"c": {}, "x": {}, "y": {}, "z": {}}, ["c", "x", "y", "z"])
    assert ev.alpha_per_arm == pytest.approx(0.02) and ev.winner is None
