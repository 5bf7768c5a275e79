"""The rollout engine as a pure function: no database, no broker."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from fleet_server.engine import (
    DeviceSnapshot,
    Plan,
    RolloutSnapshot,
    apply_plan,
    assignment_order,
    decide,
    stage_target,
)
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.policy import Policy

SHA = "a" * 64
OLD = "b" * 64
T0 = datetime(2026, 1, 1, tzinfo=UTC)


BASE = {"soak_seconds": 5.0}  # the tests' policy: the defaults, with a soak to wait for


def rollout(**over: object) -> RolloutSnapshot:
    """A running rollout over stages 10/50/100 %; ``over`` sets snapshot and policy fields alike
    (``policy=`` gives the policy, whose explicitly set fields win over ``BASE``)."""
    given = over.pop("policy", None)
    fields = {k: over.pop(k) for k in list(over) if k in Policy.model_fields}
    explicit = given.model_dump(exclude_unset=True) if isinstance(given, Policy) else {}
    base = RolloutSnapshot(
        id="r1",
        state=RS.RUNNING,
        model_sha256=SHA,
        stages=(10.0, 50.0, 100.0),
        current_stage=0,
        stage_ready_at=None,
        policy=Policy.model_validate({**BASE, **explicit, **fields}),
    )
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def fleet(n: int) -> list[DeviceSnapshot]:
    return [DeviceSnapshot(device_id=f"d{i:03d}", state=DS.PENDING, running_sha256=OLD) for i in range(n)]


def tick(
    r: RolloutSnapshot, devices: list[DeviceSnapshot], now: datetime
) -> tuple[RolloutSnapshot, list[DeviceSnapshot], Plan]:
    """One ticker tick: decide, then the plan applied as the ticker writes it back."""
    plan = decide(r, devices, now)
    r, devices = apply_plan(r, devices, plan, now)
    return r, devices, plan


def first_stage(r: RolloutSnapshot, n: int) -> list[DeviceSnapshot]:
    """A fresh fleet of ``n`` after the rollout's first tick (its first stage notified)."""
    return tick(r, fleet(n), T0)[1]


def serving(d: DeviceSnapshot, inferences: int = 10, errors: int = 0) -> DeviceSnapshot:
    return dataclasses.replace(
        d, running_sha256=SHA, served_ok=inferences - errors, inferences=inferences, errors=errors
    )


def test_stage_target_is_ceil_of_cumulative_percent() -> None:
    assert stage_target(10, 10) == 1
    assert stage_target(10, 11) == 2
    assert stage_target(1, 1000) == 10
    assert stage_target(7, 100) == 7  # no float drift (0.07 * 100 = 7.000000000000001)
    assert stage_target(1, 3) == 1
    assert stage_target(100, 3) == 3


def test_first_stage_assigns_exactly_its_share_in_hash_order() -> None:
    devices = fleet(20)
    plan = decide(rollout(), devices, T0)
    assert len(plan.notify) == 2  # ceil(10% of 20)
    expected = sorted(devices, key=lambda d: assignment_order("r1", d.device_id))[:2]
    assert [c.device_id for c in plan.notify] == [d.device_id for d in expected]
    assert all(c.stage == 0 for c in plan.notify)
    assert plan.decisions[0].action == "assign"
    # a second tick with nothing reported assigns nobody more
    _, devices = apply_plan(rollout(), devices, plan, T0)
    assert decide(rollout(), devices, T0 + timedelta(seconds=1)).notify == []


def test_never_assigns_more_than_the_stage_allows_even_when_devices_finish() -> None:
    r = rollout(soak_seconds=0)
    devices = fleet(10)
    now = T0
    assigned_per_stage = []
    for _ in range(20):
        r, devices, _ = tick(r, devices, now)
        n = sum(1 for d in devices if d.stage is not None)
        assert n <= stage_target(r.stages[r.current_stage], 10)
        assigned_per_stage.append(n)
        devices = [serving(d) if d.state == DS.NOTIFIED else d for d in devices]
        now += timedelta(seconds=1)
        if r.state == RS.COMPLETED:
            break
    assert r.state == RS.COMPLETED
    assert {1, 5, 10} <= set(assigned_per_stage)
    assert all(d.state == DS.DONE for d in devices)


def test_done_needs_running_hash_and_a_successful_inference() -> None:
    devices = first_stage(rollout(stages=(100.0,)), 1)
    d = devices[0]
    running_only = dataclasses.replace(d, running_sha256=SHA, reported_seq=1)
    plan = decide(rollout(stages=(100.0,)), [running_only], T0)
    assert [c.state for c in plan.changes] == [DS.INSTALLING]
    plan = decide(rollout(stages=(100.0,)), [serving(d, inferences=3)], T0)
    assert [c.state for c in plan.changes] == [DS.DONE]
    errors_only = serving(d, inferences=3, errors=3)
    assert decide(rollout(stages=(100.0,)), [errors_only], T0).changes[0].state != DS.DONE


def test_soak_time_holds_the_next_stage() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=5)
    devices = [serving(d) if d.state == DS.NOTIFIED else d for d in first_stage(r, 2)]
    plan = decide(r, devices, T0 + timedelta(seconds=1))
    assert plan.stage_ready_at == T0 + timedelta(seconds=1)
    assert plan.notify == []
    r, devices = apply_plan(r, devices, plan, T0)
    assert decide(r, devices, T0 + timedelta(seconds=5)).notify == []  # 4 s soaked
    plan = decide(r, devices, T0 + timedelta(seconds=6.5))
    assert plan.current_stage == 1 and len(plan.notify) == 1
    assert [d.action for d in plan.decisions] == ["next_stage", "assign"]


def test_error_rate_gate_respects_the_minimum_sample() -> None:
    r = rollout(stages=(100.0,), min_inferences=20, max_error_rate=0.05)
    devices = first_stage(r, 2)
    # 5 errors in 10 inferences: 50 %, but below the minimum sample -> no decision yet
    few = [
        dataclasses.replace(d, running_sha256=SHA, inferences=5, errors=0 if i else 5)
        for i, d in enumerate(devices)
    ]
    plan = decide(r, few, T0)
    assert plan.state == RS.RUNNING and plan.roll_back == []
    many = [dataclasses.replace(d, inferences=15, errors=3) for d in few]
    plan = decide(r, many, T0)
    assert plan.state == RS.ROLLED_BACK
    assert sorted(plan.roll_back) == sorted(d.device_id for d in devices)
    decision = plan.decisions[-1]
    assert decision.action == "roll_back"
    assert decision.figures["inferences"] == 30 and decision.figures["errors"] == 6
    assert abs(decision.figures["error_rate"] - 0.2) < 1e-9


def test_rollback_spares_devices_never_notified() -> None:
    r = rollout(stages=(10.0, 100.0))
    devices = first_stage(r, 10)
    failed = [
        dataclasses.replace(
            d, reported_seq=d.seq or 0, reported_state="failed", reported_error="digest_mismatch"
        )
        if d.stage is not None
        else d
        for d in devices
    ]
    plan = decide(r, failed, T0)
    assert plan.state == RS.ROLLED_BACK
    assert len(plan.roll_back) == 1
    change = next(c for c in plan.changes if c.device_id == plan.roll_back[0])
    assert change.state == DS.ROLLED_BACK and "digest_mismatch" in (change.reason or "")
    assert plan.notify == []


def test_failure_within_the_allowed_rate_lets_the_stage_finish() -> None:
    r = rollout(stages=(100.0,), max_failure_rate=0.5, soak_seconds=0)
    devices = first_stage(r, 2)
    devices = [serving(devices[0]), dataclasses.replace(devices[1], event_failure="hardware_mismatch")]
    plan = decide(r, devices, T0)
    assert plan.state == RS.COMPLETED
    assert {c.state for c in plan.changes} == {DS.DONE, DS.FAILED}


def test_timeout_marks_device_and_counts_as_failure() -> None:
    r = rollout(stages=(100.0,), device_timeout_seconds=30, max_failure_rate=0.0)
    devices = first_stage(r, 1)
    assert decide(r, devices, T0 + timedelta(seconds=29)).changes == []
    plan = decide(r, devices, T0 + timedelta(seconds=31))
    assert plan.state == RS.ROLLED_BACK
    assert "timed_out" in (plan.changes[0].reason or "")
    r_lenient = dataclasses.replace(r, policy=r.policy.model_copy(update={"max_failure_rate": 1.0}))
    plan = decide(r_lenient, devices, T0 + timedelta(seconds=31))
    assert [c.state for c in plan.changes] == [DS.TIMED_OUT]


def test_pause_stops_assignment_resume_continues_abort_stops_everything() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0)
    devices = fleet(2)
    paused = dataclasses.replace(r, state=RS.PAUSED)
    assert decide(paused, devices, T0).notify == []
    plan = decide(r, devices, T0)  # resumed
    assert len(plan.notify) == 1
    devices = [serving(d) if d.state == DS.NOTIFIED else d for d in apply_plan(r, devices, plan, T0)[1]]
    plan = decide(paused, devices, T0)
    assert [c.state for c in plan.changes] == [DS.DONE]  # still observes devices
    assert plan.notify == [] and plan.current_stage == 0
    aborted = dataclasses.replace(r, state=RS.ABORTED)
    assert decide(aborted, devices, T0).empty


def test_gate_still_protects_a_paused_rollout() -> None:
    r = rollout(stages=(100.0,), state=RS.PAUSED, min_inferences=10)
    devices = first_stage(rollout(stages=(100.0,)), 1)
    bad = [serving(devices[0], inferences=10, errors=5)]
    assert decide(r, bad, T0).state == RS.ROLLED_BACK


def test_decide_is_deterministic() -> None:
    devices = fleet(50)
    a = decide(rollout(), devices, T0)
    b = decide(rollout(), list(reversed(devices)), T0)
    assert [c.device_id for c in a.notify] == [c.device_id for c in b.notify]
