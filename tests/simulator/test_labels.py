"""The simulator's label source: labels drawn at the configured accuracy, delays as configured,
the truth when the inputs carry it, and the scenario table that configures it."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.accuracy_stats import wilson
from simulator.labels import LabelDelay, LabelPlan, draw_label, top1
from simulator.scenario import ScenarioError, parse_scenario

from .test_scenario_file import minimal

SHA, OTHER = "a" * 64, "b" * 64


def scores(predicted: int, classes: int = 10) -> list[np.ndarray]:
    out = np.zeros((1, classes), dtype=np.float32)
    out[0, predicted] = 1.0
    return [out]


@pytest.mark.parametrize("accuracy", [0.0, 0.9, 0.95, 1.0])
def test_labels_confirm_the_prediction_at_the_configured_accuracy(accuracy: float) -> None:
    source = LabelPlan(accuracy={SHA: accuracy}, seed=3).source("d0")
    n, right = 20_000, 0
    for i in range(n):
        got = source.label(SHA, scores(i % 10), None)
        assert got is not None
        label, delay = got
        assert 0 <= label < 10 and delay == 0.0
        right += label == i % 10
    low, high = wilson(right, n, confidence=0.999) or (0.0, 1.0)
    assert low <= accuracy <= high


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 9), st.integers(2, 12), st.integers(0, 2**32))
def test_a_wrong_label_is_another_class_never_the_predicted_one(
    predicted: int, classes: int, seed: int
) -> None:
    predicted %= classes
    label = draw_label(predicted, classes, 0.0, random.Random(seed))
    assert label != predicted and 0 <= label < classes


def test_the_wrong_labels_spread_over_every_other_class() -> None:
    rng = random.Random(1)
    seen = {draw_label(4, 10, 0.0, rng) for _ in range(2000)}
    assert seen == set(range(10)) - {4}


def test_share_models_without_accuracy_and_the_truth() -> None:
    plan = LabelPlan(share=0.25, accuracy={SHA: 1.0}, seed=5)
    source = plan.source("d1")
    got = [source.label(SHA, scores(2), None) for _ in range(8000)]
    labelled = sum(g is not None for g in got)
    low, high = wilson(labelled, 8000, confidence=0.999) or (0.0, 1.0)
    assert low <= 0.25 <= high
    assert all(source.label(OTHER, scores(2), None) is None for _ in range(100))  # no accuracy: no label
    # the inputs' real labels win over any configured accuracy
    truth = np.array([7, 3, 1])
    real = LabelPlan(truth=truth, accuracy={SHA: 0.0}).source("d0")
    assert [real.label(SHA, scores(0), row) for row in (0, 1, 5)] == [(7, 0.0), (3, 0.0), (1, 0.0)]


def test_the_same_plan_labels_the_same_way_per_device() -> None:
    plan = LabelPlan(accuracy={SHA: 0.5}, delay=LabelDelay("uniform", 1, 3), seed=9)

    def run(device: int) -> list[tuple[int, float] | None]:
        source = plan.source(f"d{device}")
        return [source.label(SHA, scores(i % 10), None) for i in range(50)]

    assert run(4) == run(4) and run(4) != run(5)


@pytest.mark.parametrize(
    ("delay", "check"),
    [
        (LabelDelay("fixed", 2.5), lambda xs: set(xs) == {2.5}),
        (
            LabelDelay("uniform", 1.0, 3.0),
            lambda xs: min(xs) >= 1.0 and max(xs) <= 3.0 and 1.9 < np.mean(xs) < 2.1,
        ),
        (LabelDelay("exponential", 4.0), lambda xs: min(xs) >= 0 and 3.7 < np.mean(xs) < 4.3),
    ],
)
def test_delays_follow_their_distribution(delay: LabelDelay, check: Any) -> None:
    rng = random.Random(2)
    assert check([delay.draw(rng) for _ in range(5000)])


def test_top1_of_a_classifier_output() -> None:
    assert top1(scores(6, 10)) == (6, 10)
    assert top1([np.array([0.2, 0.9, 0.1])]) == (1, 3)


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="share"):
        LabelPlan(share=1.5)
    with pytest.raises(ValueError, match="probabilities"):
        LabelPlan(accuracy={SHA: 1.2})
    with pytest.raises(ValueError, match="delay"):
        LabelDelay("uniform", 3.0, 1.0)


def with_labels(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"models": {"v1": {"version": "1", "accuracy": 0.95}}, "labels": {"share": 0.5}}
    return minimal(**{**fields, **over})


def test_the_scenario_table_configures_the_source() -> None:
    sc = parse_scenario(with_labels())
    assert sc.labels is not None and sc.labels.share == 0.5 and sc.models["v1"].accuracy == 0.95
    assert sc.labels.delay() == LabelDelay("fixed", 0.0)
    uniform = parse_scenario(with_labels(labels={"delay_s": [0.5, 2]})).labels
    assert uniform is not None and uniform.delay() == LabelDelay("uniform", 0.5, 2.0)
    exp = parse_scenario(with_labels(labels={"delay_mean_s": 3})).labels
    assert exp is not None and exp.delay() == LabelDelay("exponential", 3.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (with_labels(labels={"delay_s": 1, "delay_mean_s": 2}), "not both"),
        (with_labels(labels={"delay_s": [2, 1]}), "low <= high"),
        (with_labels(labels={"delay_s": -1}), "delay_s must be >= 0"),
        (with_labels(labels={"share": 2}), "labels.share"),
        (with_labels(labels={"rate": 2}), "labels.rate"),
        (minimal(models={"v1": {"version": "1", "accuracy": 0.9}}), "no \\[labels\\] table"),
        (minimal(labels={}), "labels only models with an accuracy"),
        (minimal(models={"v1": {"version": "1", "accuracy": 1.5}}), "models.v1.accuracy"),
        (
            with_labels(expect=[{"check": "stopped_by", "rollout": "r"}]),
            "check 'stopped_by' needs gate",
        ),
    ],
)
def test_bad_label_tables_fail_at_load_time_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(data)
