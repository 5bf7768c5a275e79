"""The per-input and per-class series of the debug dashboard: summed over devices, bounded per group
and over groups, nothing lost to the bound (the rest is summed as ``other``)."""

from __future__ import annotations

from fleet_server.debug_series import (
    DEBUG_BUCKET_INPUTS,
    DEBUG_CLASSES,
    DEBUG_GROUPS,
    DEBUG_INPUTS,
    Detail,
    bucket_series,
    class_series,
    input_series,
    pooled,
)
from fleet_server.metrics import debug_groups
from fleet_server.slo.series import Totals
from fleet_server.slo_store import VersionName


def test_devices_are_pooled_input_by_input_and_class_by_class() -> None:
    got = pooled(
        [
            ({"x": [10, 1, 0, 2]}, {"0": 7, "1": 3}, {"0:0": 2, "1:0": 1}, {"x": [1] * 12}),
            ({"x": [5, 0, 1, 0], "y": [5, 0, 0, 5]}, None, {"0:0": 1}, {"x": [0, 2] + [0] * 10, "y": [3]}),
            (None, {"1": 2}, None, None),
        ]
    )
    buckets = {"x": (1, 3) + (1,) * 10, "y": (3,) + (0,) * 11}
    assert got == Detail(
        {"x": (15, 1, 1, 2), "y": (5, 0, 0, 5)}, {"0": 7, "1": 5}, {"0:0": 3, "1:0": 1}, buckets
    )
    assert got + Detail({"y": (1, 1, 0, 0)}, buckets={"y": (0, 4)}) == Detail(
        {"x": (15, 1, 1, 2), "y": (6, 1, 0, 5)},
        {"0": 7, "1": 5},
        {"0:0": 3, "1:0": 1},
        {"x": (1, 3) + (1,) * 10, "y": (3, 4) + (0,) * 10},
    )


def test_inputs_past_the_bound_are_summed_as_other() -> None:
    inputs = {f"in{i:02d}": (100 - i, i, 0, 1) for i in range(DEBUG_INPUTS + 4)}
    out = input_series(Detail(inputs))
    assert set(out) == {f"in{i:02d}" for i in range(DEBUG_INPUTS)} | {"other"}  # the most checked kept
    rest = range(DEBUG_INPUTS, DEBUG_INPUTS + 4)
    assert out["other"] == (sum(100 - i for i in rest), sum(rest), 0, 4)
    assert input_series(Detail({"x": (3,)})) == {"x": (3, 0, 0, 0)}  # a short row padded, not dropped


def test_value_buckets_follow_the_most_checked_inputs_and_are_never_summed_across_inputs() -> None:
    inputs = {f"in{i:02d}": (100 - i, 0, 0, 0) for i in range(DEBUG_INPUTS + 4)}
    buckets = {name: (i,) * 12 for i, name in enumerate(inputs)}
    del buckets["in01"]  # no calibration range: checked, but no distribution
    buckets["late"] = (7, 1)  # buckets before any check was counted: ranks after the checked ones
    out = bucket_series(Detail(inputs, buckets=buckets))
    named = ["in00", *(f"in{i:02d}" for i in range(2, DEBUG_BUCKET_INPUTS + 1))]
    assert list(out) == named and "other" not in out  # a sum over inputs' own ranges means nothing
    assert out["in02"] == (2,) * 12 and len(out) == DEBUG_BUCKET_INPUTS < DEBUG_INPUTS
    few = bucket_series(Detail({"x": (5, 0, 0, 0)}, buckets={"late": (7, 1), "x": (1,) * 13}))
    assert few == {"x": (1,) * 12, "late": (7, 1) + (0,) * 10}  # cut and padded to the 12 buckets


def test_classes_count_predictions_truths_predicted_and_right_ones_bounded() -> None:
    confusion = {"a:a": 8, "a:b": 2, "b:b": 5, "b:a": 1, "x:y": 0, "bad": 3}
    out = class_series(Detail({}, {"a": 50, "b": 40}, confusion))
    assert out == {
        "a": {"predictions": 50, "true": 10, "predicted": 9, "correct": 8},
        "b": {"predictions": 40, "true": 6, "predicted": 7, "correct": 5},
    }
    many = {str(c): 1000 - c for c in range(DEBUG_CLASSES + 5)} | {"other": 3}
    out = class_series(Detail({}, many, {f"{DEBUG_CLASSES + 4}:0": 2}))
    assert len(out) == DEBUG_CLASSES + 1 and "0" in out and str(DEBUG_CLASSES) not in out
    folded = [1000 - c for c in range(DEBUG_CLASSES, DEBUG_CLASSES + 5)]
    assert out["other"] == {"predictions": sum(folded) + 3, "true": 2, "predicted": 0, "correct": 0}
    assert sum(r["predictions"] for r in out.values()) == sum(many.values())


def test_only_the_busiest_groups_get_debug_series() -> None:
    names = {f"{i:064d}": VersionName("m", str(i)) for i in range(DEBUG_GROUPS + 3)}
    cohorts = {(sha, "rpi4"): Totals(inferences=100 + i) for i, sha in enumerate(names)}
    details = {key: Detail({"x": (1, 0, 0, 0)}) for key in cohorts}
    groups = debug_groups(cohorts, details, names)
    assert sorted(groups) == sorted(("m", str(i), "rpi4") for i in range(3, DEBUG_GROUPS + 3))
