"""The accuracy gate in the pure engine: relative to the replaced model per hardware class, a
minimum labelled sample on both sides, waiting for labels (then a human), cohorts, and the
figures each decision carries."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleet_server import gates
from fleet_server.engine import DeviceSnapshot, Plan, RolloutSnapshot, apply_plan, decide
from fleet_server.gates import Histograms
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.policy import Policy

from .test_engine import OLD, SHA, T0, fleet, rollout, serving

GATE = {"max_accuracy_drop": 0.0, "min_labels": 200}


def policy(**over: object) -> Policy:
    return Policy.model_validate({"soak_seconds": 1.0, **GATE, **over})


def labelled(d: DeviceSnapshot, labels: int, correct: int) -> DeviceSnapshot:
    """A device serving the rollout model whose app labelled ``labels`` of its predictions."""
    return dataclasses.replace(serving(d, inferences=max(labels, 10)), labels=labels, labels_correct=correct)


def replaced(labels: int, correct: int, hw: str = "") -> dict[str, Histograms]:
    """The replaced model's label counts on one hardware id (the ticker's baseline)."""
    return {hw: Histograms(labels=labels, labels_correct=correct)}


def step(
    r: RolloutSnapshot, devices: Sequence[DeviceSnapshot], now: datetime, base: Mapping[str, Histograms]
) -> tuple[RolloutSnapshot, list[DeviceSnapshot], Plan]:
    plan = decide(r, devices, now, base)
    r, applied = apply_plan(r, devices, plan, now)
    return r, applied, plan


def canary(r: RolloutSnapshot, n: int, base: Mapping[str, Histograms]) -> list[DeviceSnapshot]:
    return step(r, fleet(n), T0, base)[1]


def test_a_less_accurate_model_is_rolled_back_at_the_canary_with_its_figures() -> None:
    r = rollout(stages=(10.0, 100.0), policy=policy())
    base = replaced(4000, 3800)  # 95%
    devices = canary(r, 20, base)
    worse = [labelled(d, 200, 170) if d.stage == 0 else d for d in devices]  # 85% on 400 labels
    plan = decide(r, worse, T0, base)
    assert plan.state == RS.ROLLED_BACK and len(plan.roll_back) == 2
    (decision,) = [d for d in plan.decisions if d.action == "roll_back"]
    f = decision.figures
    assert f["gate"] == "accuracy"
    assert (f["labels"], f["accuracy"], f["baseline_labels"], f["baseline_accuracy"]) == (
        400,
        0.85,
        4000,
        0.95,
    )
    assert f["accuracy_change"] == pytest.approx(-0.10)
    assert f["accuracy_ci95"][0] < 0.85 < f["accuracy_ci95"][1]
    assert f["baseline_accuracy_ci95"][0] < 0.95 < f["baseline_accuracy_ci95"][1]
    assert f["accuracy_p_value"] < f["accuracy_alpha"] == 0.05
    assert f["accuracy_change_upper"] < 0
    assert f["accuracy_groups"] == {
        "": {
            "labels": 400,
            "accuracy": 0.85,
            "baseline_labels": 4000,
            "baseline_accuracy": 0.95,
            "change": -0.1,
        }
    }
    assert "accuracy 85.0% over 400 labels vs 95.0% over 4000" in decision.reason
    assert "-10.0 points" in decision.reason


def test_below_the_minimum_labelled_sample_it_never_trips() -> None:
    r = rollout(stages=(10.0, 100.0), policy=policy())
    devices = canary(r, 20, replaced(4000, 3800))
    hopeless = [labelled(d, 99, 0) if d.stage == 0 else d for d in devices]  # 198 labels, all wrong
    assert decide(r, hopeless, T0, replaced(4000, 3800)).state == RS.RUNNING
    # ... nor when the replaced model has too few labels to compare with
    enough = [labelled(d, 200, 0) if d.stage == 0 else d for d in devices]
    assert decide(r, enough, T0, replaced(199, 199)).state == RS.RUNNING
    assert decide(r, enough, T0, replaced(200, 199)).state == RS.ROLLED_BACK


def test_a_stage_waits_for_its_labels_then_pauses_for_a_human() -> None:
    r = rollout(stages=(50.0, 100.0), policy=policy(max_label_wait_seconds=60))
    base = replaced(1000, 950)
    devices = [labelled(d, 50, 48) if d.stage == 0 else d for d in canary(r, 4, base)]
    r, devices, plan = step(r, devices, T0, base)
    assert [d.action for d in plan.decisions] == ["stage_finished"]
    # soaked, but 100 labels < 200: not passing, not failing: waiting
    r, devices, plan = step(r, devices, T0 + timedelta(seconds=30), base)
    assert plan.empty and r.state == RS.RUNNING and r.current_stage == 0
    r, devices, plan = step(r, devices, T0 + timedelta(seconds=61), base)
    assert r.state == RS.PAUSED
    (pause,) = plan.decisions
    assert pause.action == "pause" and pause.figures["gate"] == "label_wait"
    assert pause.figures["waited_seconds"] == 61.0
    assert "only 100 labelled predictions of the new model (the accuracy gate needs 200 of each)" in (
        pause.reason
    )
    # paused: nothing more; resume alone pauses again; approve promotes without the labels
    assert decide(r, devices, T0 + timedelta(seconds=90), base).empty
    resumed = dataclasses.replace(r, state=RS.RUNNING)
    assert decide(resumed, devices, T0 + timedelta(seconds=90), base).state == RS.PAUSED
    approved = dataclasses.replace(resumed, approved_through=0)
    plan = decide(approved, devices, T0 + timedelta(seconds=90), base)
    assert plan.state == RS.RUNNING and plan.current_stage == 1 and len(plan.notify) == 2


def test_the_replaced_model_without_labels_also_makes_a_stage_wait() -> None:
    r = rollout(stages=(50.0, 100.0), policy=policy(max_label_wait_seconds=10))
    devices = [labelled(d, 500, 480) if d.stage == 0 else d for d in canary(r, 4, {})]
    r, devices, _ = step(r, devices, T0, {})
    r, devices, plan = step(r, devices, T0 + timedelta(seconds=11), {})
    assert r.state == RS.PAUSED
    assert "0 of the replaced model on the same hardware" in plan.decisions[0].reason


def test_an_equally_accurate_model_goes_on_once_it_has_its_labels() -> None:
    r = rollout(stages=(50.0, 100.0), policy=policy())
    base = replaced(2000, 1900)
    devices = [labelled(d, 150, 143) if d.stage == 0 else d for d in canary(r, 4, base)]
    r, devices, _ = step(r, devices, T0, base)
    r, devices, plan = step(r, devices, T0 + timedelta(seconds=5), base)
    assert plan.current_stage == 1
    (nxt,) = [d for d in plan.decisions if d.action == "next_stage"]
    f = nxt.figures
    assert (f["labels"], f["baseline_labels"]) == (300, 2000) and f["accuracy_p_value"] > 0.05
    assert f["cohorts"][""]["accuracy"] == f["accuracy"]


def test_the_gate_can_pause_instead() -> None:
    r = rollout(stages=(10.0, 100.0), policy=policy(accuracy_action="pause"))
    devices = canary(r, 20, replaced(4000, 3800))
    worse = [labelled(d, 200, 170) if d.stage == 0 else d for d in devices]
    plan = decide(r, worse, T0, replaced(4000, 3800))
    assert plan.state == RS.PAUSED and plan.roll_back == []
    assert plan.decisions[-1].figures["gate"] == "accuracy"


def test_without_the_gate_labels_change_nothing() -> None:
    r = rollout(stages=(50.0, 100.0), policy=Policy(soak_seconds=1.0))
    devices = [labelled(d, 10, 0) if d.stage == 0 else d for d in canary(r, 4, {})]
    r, devices, plan = step(r, devices, T0, {})
    assert "accuracy" not in plan.decisions[0].figures
    r, devices, plan = step(r, devices, T0 + timedelta(seconds=2), {})
    assert plan.current_stage == 1


def _classes(n_rpi: int, n_jetson: int) -> list[DeviceSnapshot]:
    return [
        DeviceSnapshot(device_id=f"{hw}-{i:02d}", state=DS.PENDING, running_sha256=OLD, hardware_id=hw)
        for hw, n in (("rpi4", n_rpi), ("jetson", n_jetson))
        for i in range(n)
    ]


def test_a_class_that_loses_accuracy_is_rolled_back_alone_with_its_share_of_alpha() -> None:
    r = rollout(stages=(50.0, 100.0), policy=policy())
    base = {
        "rpi4": Histograms(labels=3000, labels_correct=2850),
        "jetson": Histograms(labels=3000, labels_correct=2850),
    }
    devices = step(r, _classes(4, 4), T0, base)[1]
    served = [
        labelled(d, 150, 120 if d.hardware_id == "rpi4" else 143) if d.stage == 0 else d for d in devices
    ]
    plan = decide(r, served, T0, base)
    assert plan.state == RS.RUNNING
    (cohort,) = [d for d in plan.decisions if d.action == "roll_back_cohort"]
    assert cohort.figures["cohort"] == "rpi4" and cohort.figures["gate"] == "accuracy"
    # two classes: three verdicts (each class, and the pooled one) share alpha evenly
    assert cohort.figures["accuracy_alpha"] == pytest.approx(0.05 / 3)
    assert {d.device_id for d in served if d.hardware_id == "rpi4" and d.stage == 0} == set(plan.roll_back)


def test_a_hardware_mix_the_models_ran_on_is_not_mistaken_for_a_loss() -> None:
    """The replaced model ran mostly on the easy class, the canary mostly on the hard one."""
    r = rollout(stages=(50.0, 100.0), policy=policy(min_labels=300))
    base = {
        "rpi4": Histograms(labels=500, labels_correct=450),
        "jetson": Histograms(labels=5000, labels_correct=4950),
    }
    devices = step(r, _classes(6, 2), T0, base)[1]
    served = [
        (labelled(d, 300, 270) if d.hardware_id == "rpi4" else labelled(d, 200, 198)) if d.stage == 0 else d
        for d in devices
    ]
    pooled_naively = sum(d.labels_correct for d in served) / sum(d.labels for d in served)
    assert pooled_naively < 0.93 < (450 + 4950) / 5500  # a 5-point "loss" if pooled naively
    r, served, plan = step(r, served, T0, base)
    r, served, plan = step(r, served, T0 + timedelta(seconds=5), base)
    assert r.state == RS.RUNNING and r.current_stage == 1
    (nxt,) = [d for d in plan.decisions if d.action == "next_stage"]
    assert nxt.figures["accuracy_change"] == pytest.approx(0.0, abs=0.001)


def test_a_pooled_loss_driven_by_a_class_below_its_minimum_waits_for_that_class() -> None:
    r = rollout(stages=(100.0,), policy=policy(min_labels=300))
    base = {
        "rpi4": Histograms(labels=3000, labels_correct=2850),
        "jetson": Histograms(labels=3000, labels_correct=2850),
    }
    devices = step(r, _classes(2, 2), T0, base)[1]

    def serve(rpi_labels: int) -> list[DeviceSnapshot]:
        """Each rpi4 device labelled ``rpi_labels`` predictions at 60%; each jetson 75 at 96%."""
        return [
            labelled(d, rpi_labels, int(rpi_labels * 0.6)) if d.hardware_id == "rpi4" else labelled(d, 75, 72)
            for d in devices
        ]

    # jetson (150 labels, no loss on its face) and rpi4 (200 labels at 60%) are each below 300;
    # pooled they trip, but jetson contradicts it: nothing acts, and the stage does not finish
    pooled = decide(r, serve(100), T0, base)
    assert pooled.state == RS.RUNNING and not pooled.roll_back
    assert [d.action for d in pooled.decisions] == []
    # rpi4 reaches its own minimum: it is rolled back alone (jetson has proved the model)
    plan = decide(r, serve(150), T0 + timedelta(seconds=1), base)
    assert [d.figures["cohort"] for d in plan.decisions if d.action == "roll_back_cohort"] == ["rpi4"]
    assert plan.state == RS.RUNNING


def test_accuracy_alpha_is_split_only_between_classes() -> None:
    p = policy(accuracy_alpha=0.1)
    assert [gates.accuracy_alpha(p, n) for n in (1, 2, 4)] == [
        0.1,
        pytest.approx(0.1 / 3),
        pytest.approx(0.02),
    ]


def test_bad_policies_are_refused() -> None:
    for bad in ({"max_accuracy_drop": -0.1}, {"max_accuracy_drop": 1.0}, {"accuracy_alpha": 0.5},
                {"accuracy_alpha": 0}, {"min_labels": 0}, {"max_label_wait_seconds": -1},
                {"accuracy_action": "ignore"}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            Policy.model_validate(bad)


# -- the engine with the gate, tick by tick (hypothesis) --------------------------------------


@st.composite
def label_runs(draw: st.DrawFn) -> tuple[RolloutSnapshot, int, float, float, int, int]:
    p = policy(
        min_labels=draw(st.sampled_from([20, 100, 300])),
        max_label_wait_seconds=draw(st.sampled_from([0.0, 30.0, 300.0])),
        accuracy_action=draw(st.sampled_from(list(gates.GATE_ACTIONS))),
        soak_seconds=draw(st.sampled_from([0.0, 10.0])),
        require_approval=draw(st.booleans()),
    )
    r = RolloutSnapshot(
        id="acc",
        state=RS.RUNNING,
        model_sha256=SHA,
        stages=(25.0, 50.0, 100.0),
        current_stage=0,
        stage_ready_at=None,
        policy=p,
    )
    return (
        r,
        draw(st.integers(2, 12)),  # devices
        draw(st.sampled_from([0.95, 0.9, 0.8])),  # the new model's true accuracy (replaced: 0.95)
        draw(st.sampled_from([0.0, 0.3, 1.0])),  # labels per inference
        draw(st.integers(0, 3000)),  # labels the replaced model has already
        draw(st.integers(0, 2**31)),  # seed
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_runs())
def test_a_stage_never_promotes_blind_or_through_a_tripping_accuracy_gate(
    run: tuple[RolloutSnapshot, int, float, float, int, int],
) -> None:
    import random

    r, n, accuracy, share, prior, seed = run
    rng = random.Random(seed)
    p = r.policy
    base = replaced(prior, round(prior * 0.95))
    devices = fleet(n)
    now = T0
    for _ in range(400):
        plan = decide(r, devices, now, base)
        approved = r.approved_through >= r.current_stage
        for dec in plan.decisions:
            if dec.action in ("next_stage", "completed", "await_approval"):
                f = dec.figures
                assert approved or (f["labels"] >= p.min_labels and f["baseline_labels"] >= p.min_labels), dec
                trip = gates.check(p, f, stage_finished=True)
                assert trip is None or (trip.action == gates.PAUSE and approved), (dec, trip)
            if dec.action == "pause" and dec.figures.get("gate") == "label_wait":
                assert gates.labels_wanted(p, dec.figures) is not None
            if dec.action in ("pause", "roll_back"):
                event(f"{dec.action} by {dec.figures.get('gate')}")
        r, devices = apply_plan(r, devices, plan, now)
        if r.state in RS.FINISHED:
            break
        if r.state in (RS.PAUSED, RS.AWAITING_APPROVAL):  # a human approves whatever waits
            r = dataclasses.replace(r, state=RS.RUNNING, approved_through=r.current_stage)
        now += timedelta(seconds=10)
        # devices serve 20 inferences per tick, a share labelled, each right with its model's accuracy
        out = []
        for d in devices:
            if d.state in (DS.NOTIFIED, DS.INSTALLING, DS.DONE) and d.running_sha256 in (SHA, OLD):
                labels = sum(rng.random() < share for _ in range(20))
                right = sum(rng.random() < accuracy for _ in range(labels))
                d = dataclasses.replace(
                    serving(d, inferences=d.inferences + 20),
                    labels=d.labels + labels,
                    labels_correct=d.labels_correct + right,
                )
            out.append(d)
        devices = out
        # the unassigned devices still run the replaced model, and are labelled too
        grow = sum(1 for d in devices if d.stage is None) * round(20 * share)
        h = base[""]
        base = replaced(h.labels + grow, h.labels_correct + round(grow * 0.95))
    assert r.state in RS.FINISHED, (r.state, r.current_stage)
    event(f"ended {r.state}")
