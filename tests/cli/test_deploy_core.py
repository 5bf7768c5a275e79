"""The decisions of `edgefleet deploy`, without a server or a compile: which target each hardware
class gets, and what a failed class means for the others under the policy."""

from __future__ import annotations

from edgefleet.deploy import (
    ClassPlan,
    ClassState,
    TargetSource,
    built_in_target,
    class_version,
    plan_classes,
    settle_failures,
    worker_count,
)
from fleet_server.declarative import ModelSpec
from fleet_server.policy import ClassFailure


def test_each_class_gets_its_target_from_the_model_the_mapping_or_the_compiler() -> None:
    spec = ModelSpec.model_validate(
        {
            "source": "m.onnx",
            "gate": {"min_cosine": 0.9},
            "targets": {"rpi4": {"target": "qnn-htp", "gate": {"min_cosine": 0.95}}},
        }
    )
    plans = plan_classes(
        {"rpi4": 1, "qcs8550": 2, "rpi5": 3, "toaster": 1},
        "onnx",
        model=spec,
        hardware_targets={"qcs8550": "qnn-htp-a16", "rpi4": "tflite-int8"},
    )
    got = {p.hardware_class: (p.target, p.target_from, p.gate, p.code) for p in plans}
    assert got == {
        "qcs8550": ("qnn-htp-a16", TargetSource.HARDWARE_TARGETS, {"min_cosine": 0.9}, ""),
        "rpi4": ("qnn-htp", TargetSource.MODEL, {"min_cosine": 0.95}, ""),  # the model's own entry wins
        "rpi5": ("arm64-cpu", TargetSource.BUILT_IN, {"min_cosine": 0.9}, ""),
        "toaster": (None, TargetSource.NONE, {"min_cosine": 0.9}, "no_target"),
    }
    assert built_in_target("rpi4", "tflite") == "tflite-int8"  # the model's format picks the family
    assert built_in_target("ethos-u55-128-board", "onnx") is None


def _plans(*states: ClassState) -> list[ClassPlan]:
    return [ClassPlan(f"hw{i}", 1, "arm64-cpu", TargetSource.BUILT_IN, state=s) for i, s in enumerate(states)]


def test_abort_pushes_nothing_when_any_class_failed_and_skip_leaves_the_failed_out() -> None:
    plans = _plans(ClassState.COMPILED, ClassState.FAILED, ClassState.COMPILED)
    assert settle_failures(plans, ClassFailure.ABORT) == []
    assert [p.state for p in plans] == [ClassState.NOT_STARTED, ClassState.FAILED, ClassState.NOT_STARTED]
    plans = _plans(ClassState.COMPILED, ClassState.FAILED, ClassState.COMPILED)
    assert [p.hardware_class for p in settle_failures(plans, ClassFailure.SKIP)] == ["hw0", "hw2"]
    assert plans[1].state is ClassState.SKIPPED
    ok = _plans(ClassState.COMPILED, ClassState.COMPILED)
    assert len(settle_failures(ok, ClassFailure.ABORT)) == 2  # nothing failed: everything goes


def test_versions_and_workers() -> None:
    assert class_version("7", "ethos-u55-128-board") == "7-ethos-u55-128-board"
    assert class_version("7", "weird/class name") == "7-weird-class-name"  # never a ':' or '/' in a version
    assert worker_count(3, 1) == 1 and worker_count(2, 8) == 2 and 1 <= worker_count(5) <= 5
