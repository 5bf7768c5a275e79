"""Gates judged per hardware class (cohort): a model failing on one class stops only that class.

Pure engine tests: a fleet of two or three hardware classes is driven tick by
tick (``decide``, then ``apply_plan`` as the ticker writes it back), the devices
of one class misbehaving. Each test states the behaviour docs/rollouts.md
promises ("Gates per hardware class").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fleet_server.engine import HELD, DeviceSnapshot, Plan, RolloutSnapshot, apply_plan, decide, stage_target
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.policy import GateAction, Policy

from .test_engine import OLD, SHA, T0, rollout, serving, tick


def classes(**sizes: int) -> list[DeviceSnapshot]:
    """``classes(rpi4=10, jetson=10)``: pending devices of each hardware id, running the old model."""
    return [
        DeviceSnapshot(device_id=f"{hw}-{i:02d}", state=DS.PENDING, running_sha256=OLD, hardware_id=hw)
        for hw, n in sizes.items()
        for i in range(n)
    ]


Behaviour = Callable[[DeviceSnapshot], DeviceSnapshot]


def healthy(d: DeviceSnapshot) -> DeviceSnapshot:
    return serving(d, inferences=30) if d.state in (DS.NOTIFIED, DS.INSTALLING) else d


def nan_on(bad_hw: str, inferences: int = 30) -> Behaviour:
    """The model outputs NaN (every inference an error) on ``bad_hw`` and serves well elsewhere."""

    def behave(d: DeviceSnapshot) -> DeviceSnapshot:
        if d.state not in (DS.NOTIFIED, DS.INSTALLING):
            return d
        if d.hardware_id == bad_hw:
            return dataclasses.replace(d, running_sha256=SHA, inferences=inferences, errors=inferences)
        return serving(d, inferences=30)

    return behave


def run(
    r: RolloutSnapshot, devices: list[DeviceSnapshot], behave: Behaviour, ticks: int = 60
) -> tuple[RolloutSnapshot, list[DeviceSnapshot], list[Plan]]:
    """Tick until the rollout leaves ``running`` (or ``ticks``), the devices answering as ``behave``."""
    plans = []
    now = T0
    for _ in range(ticks):
        r, devices, plan = tick(r, devices, now)
        plans.append(plan)
        if r.state != RS.RUNNING:
            break
        devices = [behave(d) for d in devices]
        now += timedelta(seconds=1)
    return r, devices, plans


def by_hw(devices: list[DeviceSnapshot], hw: str) -> list[DeviceSnapshot]:
    return [d for d in devices if d.hardware_id == hw]


def decisions(plans: list[Plan], action: str) -> list[dict[str, Any]]:
    return [d.figures | {"reason": d.reason} for p in plans for d in p.decisions if d.action == action]


def test_one_class_failing_is_rolled_back_alone_and_the_others_complete() -> None:
    r = rollout(stages=(10.0, 50.0, 100.0), soak_seconds=0, min_inferences=20)
    fleet = classes(rpi4=10, jetson=10)
    r, devices, plans = run(r, fleet, nan_on("rpi4"))
    assert r.state == RS.COMPLETED
    rpi4, jetson = by_hw(devices, "rpi4"), by_hw(devices, "jetson")
    assert all(d.state == DS.DONE for d in jetson)  # every jetson got v2 and serves it
    got_it = [d for d in rpi4 if d.stage is not None]
    assert got_it and all(d.state == DS.ROLLED_BACK for d in got_it)
    assert all(d.state == HELD for d in rpi4 if d.stage is None)  # the rest never got it
    rolled_back = {c for p in plans for c in p.roll_back}
    assert rolled_back == {d.device_id for d in got_it}
    [cohort] = decisions(plans, "roll_back_cohort")
    assert cohort["cohort"] == "rpi4" and cohort["gate"] == "error_rate" and cohort["scope"] == "cohort"
    assert cohort["inferences"] >= 20 and cohort["error_rate"] == 1.0  # the class's own figures
    assert decisions(plans, "roll_back") == []  # the rollout itself never rolled back
    [done] = decisions(plans, "completed")
    assert "rolled back on 'rpi4' only" in str(done["reason"])
    halted = done["halted_cohorts"]
    assert isinstance(halted, dict) and halted["rpi4"]["state"] == "rolled_back"
    assert set(done["cohorts"]) == {"jetson"}
    # stages still sized over the whole fleet: never more assigned than the stage allows
    assigned = sum(1 for d in devices if d.stage is not None)
    assert assigned <= stage_target(100.0, 20)


def test_all_classes_failing_roll_back_the_whole_rollout() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, min_inferences=20)

    def nan_everywhere(d: DeviceSnapshot) -> DeviceSnapshot:
        if d.state not in (DS.NOTIFIED, DS.INSTALLING):
            return d
        return dataclasses.replace(d, running_sha256=SHA, inferences=30, errors=30)

    fleet = classes(rpi4=4, jetson=4)
    _, devices, _ = tick(r, fleet, T0)
    assert {d.hardware_id for d in devices if d.stage is not None} == {"rpi4", "jetson"}
    plan = decide(r, [nan_everywhere(d) for d in devices], T0 + timedelta(seconds=1))
    assert plan.state == RS.ROLLED_BACK
    assert sorted(plan.roll_back) == sorted(d.device_id for d in devices if d.stage is not None)
    [decision] = plan.decisions
    assert decision.action == "roll_back" and decision.figures["scope"] == "rollout"
    assert set(decision.figures["failing_cohorts"]) == {"rpi4", "jetson"}
    assert "every hardware class fails" in decision.reason


def test_the_last_class_failing_after_another_was_rolled_back_rolls_back_the_rollout() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, min_inferences=20)
    fleet = classes(rpi4=4, jetson=4)
    r, devices, plans = run(r, fleet, nan_on("rpi4"), ticks=2)
    assert r.state == RS.RUNNING and decisions(plans, "roll_back_cohort")
    jetson_bad = [
        dataclasses.replace(d, running_sha256=SHA, inferences=30, errors=30)
        if d.hardware_id == "jetson" and d.stage is not None
        else d
        for d in devices
    ]
    plan = decide(r, jetson_bad, T0 + timedelta(seconds=10))
    assert plan.state == RS.ROLLED_BACK
    # the rpi4 devices were already sent back: no second directive for them
    assert plan.roll_back and all(x.startswith("jetson") for x in plan.roll_back)


def test_a_class_below_its_minimum_sample_never_triggers() -> None:
    r = rollout(stages=(100.0,), soak_seconds=0, min_inferences=20)
    fleet = classes(rpi4=1, jetson=3)
    _, devices, _ = tick(r, fleet, T0)
    # rpi4: 15 inferences, all errors (below its 20); jetson: 3 x 30 clean. Pooled: 15/105 = 14 % > 5 %.
    few = [nan_on("rpi4", inferences=15)(d) for d in devices]
    plan = decide(r, few, T0 + timedelta(seconds=1))
    assert plan.roll_back == [] and plan.state == RS.RUNNING
    assert not any(
        d.action in ("roll_back", "roll_back_cohort", "pause", "pause_cohort") for d in plan.decisions
    )
    # ... but the stage does not finish either: the pooled gate fails, the class's verdict is awaited
    assert plan.stage_ready_at is None and not any(d.action == "completed" for d in plan.decisions)
    _, devices = apply_plan(r, few, plan, T0)
    # once rpi4 has its own minimum sample, it alone is rolled back, and the rollout completes
    enough = [nan_on("rpi4", inferences=20)(d) if d.hardware_id == "rpi4" else d for d in devices]
    enough = [
        dataclasses.replace(d, inferences=20, errors=20) if d.hardware_id == "rpi4" else d for d in enough
    ]
    plan = decide(r, enough, T0 + timedelta(seconds=2))
    assert plan.roll_back == ["rpi4-00"] and plan.state == RS.COMPLETED
    assert [d.action for d in plan.decisions] == ["roll_back_cohort", "stage_finished", "completed"]


def test_thin_failures_pooled_over_classes_act_on_the_whole_rollout() -> None:
    r = rollout(stages=(100.0,), soak_seconds=0, min_inferences=20)
    fleet = classes(a=1, b=1, c=1)
    _, devices, _ = tick(r, fleet, T0)
    # every class: 10 inferences, 5 errors; none has its own sample, none looks healthy
    thin = [dataclasses.replace(serving(d, inferences=10, errors=5)) for d in devices]
    plan = decide(r, thin, T0 + timedelta(seconds=1))
    assert plan.state == RS.ROLLED_BACK
    assert (
        plan.decisions[-1].figures["gate"] == "error_rate" and plan.decisions[-1].figures["inferences"] == 30
    )


def test_a_pausing_gate_holds_only_its_class_and_the_rollout_waits_for_a_human_at_the_end() -> None:
    policy = Policy(error_action=GateAction.PAUSE)
    r = rollout(stages=(20.0, 100.0), soak_seconds=0, min_inferences=20, policy=policy)
    fleet = classes(rpi4=5, jetson=5)
    r, devices, plans = run(r, fleet, nan_on("rpi4"))
    # jetson went through every stage; rpi4's notified devices stay where they are, the rest are held
    assert r.state == RS.PAUSED
    assert all(d.state == DS.DONE for d in by_hw(devices, "jetson"))
    rpi4 = by_hw(devices, "rpi4")
    assert {d.state for d in rpi4 if d.stage is not None} <= {DS.NOTIFIED, DS.INSTALLING}
    assert all(d.state == HELD for d in rpi4 if d.stage is None)
    assert not any(p.roll_back for p in plans)
    [paused] = decisions(plans, "pause_cohort")
    assert paused["cohort"] == "rpi4" and paused["gate"] == "error_rate"
    [end] = decisions(plans, "pause")
    assert end["gate"] == "cohort_paused" and "'rpi4'" in str(end["reason"])
    # a repeated tick records nothing new (restart)
    assert decide(r, devices, T0 + timedelta(minutes=1)).decisions == []
    # approve: the human accepts the stage; the held rpi4 devices are released and assigned
    approved = dataclasses.replace(r, state=RS.RUNNING, approved_through=r.current_stage)
    plan = decide(approved, devices, T0 + timedelta(minutes=1))
    assert {c.device_id for c in plan.notify} == {d.device_id for d in rpi4 if d.stage is None}


def test_a_paused_class_is_still_protected_by_roll_back_gates() -> None:
    policy = Policy(error_action=GateAction.PAUSE, max_failures=0)
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, min_inferences=20, max_failure_rate=1.0, policy=policy)
    fleet = classes(rpi4=4, jetson=4)
    r, devices, _ = run(r, fleet, nan_on("rpi4"), ticks=2)
    assert any(d.state == HELD for d in devices)
    failing = [
        dataclasses.replace(d, event_failure="digest_mismatch")
        if d.hardware_id == "rpi4" and d.state in DS.IN_FLIGHT
        else d
        for d in devices
    ]
    plan = decide(r, failing, T0 + timedelta(seconds=5))
    assert plan.state != RS.ROLLED_BACK  # jetson goes on
    assert plan.roll_back and all(x.startswith("rpi4") for x in plan.roll_back)
    assert plan.decisions[0].action == "roll_back_cohort"


def test_a_device_joining_a_halted_class_is_held_and_restart_resumes() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, min_inferences=20)
    r, devices, plans = run(r, classes(rpi4=4, jetson=4), nan_on("rpi4"), ticks=2)
    assert decisions(plans, "roll_back_cohort")
    now = T0 + timedelta(seconds=30)
    joiner = DeviceSnapshot(device_id="rpi4-99", state=DS.PENDING, running_sha256=OLD, hardware_id="rpi4")
    plan = decide(r, [*devices, joiner], now)
    assert "rpi4-99" not in {c.device_id for c in plan.notify}
    change = next(c for c in plan.changes if c.device_id == "rpi4-99")
    assert change.state == HELD and "rolled back" in (change.reason or "")
    assert not any(d.action == "roll_back_cohort" for d in plan.decisions)  # recorded once, not per tick
    # the same persisted snapshot decided again gives the same plan, in any input order
    assert decide(r, [*devices, joiner], now) == plan
    shuffled = decide(r, [joiner, *reversed(devices)], now)
    assert (shuffled.notify, shuffled.roll_back, shuffled.decisions) == (
        plan.notify,
        plan.roll_back,
        plan.decisions,
    )
    assert sorted(shuffled.changes, key=repr) == sorted(plan.changes, key=repr)


def test_a_single_class_fleet_behaves_as_before() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, min_inferences=20)
    fleet = classes(rpi4=4)
    r, _, plans = run(r, fleet, nan_on("rpi4"))
    assert r.state == RS.ROLLED_BACK
    [decision] = decisions(plans, "roll_back")
    assert decision["gate"] == "error_rate" and decision["scope"] == "rollout"
    assert decisions(plans, "roll_back_cohort") == []


def test_all_classes_failing_a_pausing_gate_pause_the_rollout_without_holding_classes() -> None:
    policy = Policy(error_action=GateAction.PAUSE)
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, min_inferences=20, policy=policy)
    fleet = classes(rpi4=4, jetson=4)
    _, devices, _ = tick(r, fleet, T0)
    bad = [
        dataclasses.replace(d, running_sha256=SHA, inferences=30, errors=30) if d.stage is not None else d
        for d in devices
    ]
    plan = decide(r, bad, T0 + timedelta(seconds=1))
    assert plan.state == RS.PAUSED and plan.roll_back == [] and plan.notify == []
    assert [d.action for d in plan.decisions] == ["pause"]
    assert plan.decisions[0].figures["scope"] == "rollout"
    assert not any(c.state == HELD for c in plan.changes)


def test_a_failure_with_no_class_proven_rolls_back_everything() -> None:
    """The canary promise: a canary stage that held one class only gives no evidence the model
    works anywhere, so its failure stops the whole rollout; no other class ever receives it."""
    fleet = classes(rpi4=10, jetson=10)
    rpi4 = {d.device_id for d in by_hw(fleet, "rpi4")}
    # a rollout id whose pseudo-random canary pick (2 of 20) holds rpi4 devices only
    r = next(
        r
        for r in (rollout(id=f"r{i}", stages=(10.0, 50.0, 100.0), soak_seconds=0) for i in range(200))
        if {n.device_id for n in decide(r, fleet, T0).notify} <= rpi4
    )
    r, devices, plans = run(r, fleet, nan_on("rpi4"))
    assert r.state == RS.ROLLED_BACK
    assert all(d.stage is None for d in by_hw(devices, "jetson"))  # never notified
    assert sum(1 for d in devices if d.stage is not None) == 2
    assert decisions(plans, "roll_back_cohort") == []


def test_a_class_refusing_at_install_is_rolled_back_alone_while_another_is_still_on_its_way() -> None:
    """The on-device acceptance check fails a device at install, before any device of a healthy
    class can be done: that class is rolled back alone, and the healthy one, still installing,
    goes on to prove the model and complete (it is not taken down with the failing one)."""
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, min_inferences=20)
    fleet = classes(rpi4=4, jetson=4)
    slow = {"jetson"}  # the healthy class takes a few ticks longer to install and serve

    def behave(d: DeviceSnapshot) -> DeviceSnapshot:
        if d.state not in (DS.NOTIFIED, DS.INSTALLING):
            return d
        if d.hardware_id == "rpi4":
            return dataclasses.replace(d, event_failure="acceptance_failed")
        if d.state == DS.NOTIFIED and d.hardware_id in slow:
            return dataclasses.replace(d, event_progress=True, reported_state="installing")
        return serving(d, inferences=30)

    r, devices, plans = run(r, fleet, behave)
    cohort_decisions = decisions(plans, "roll_back_cohort")
    assert decisions(plans, "roll_back") == [], [p.decisions for p in plans if p.decisions]
    assert [c["cohort"] for c in cohort_decisions] == ["rpi4"]
    assert r.state == RS.COMPLETED
    assert all(d.state == DS.DONE for d in by_hw(devices, "jetson"))
