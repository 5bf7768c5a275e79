"""The full engine as a pure function: gates and their actions, approval, retries, rate, shadow."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from fleet_server.engine import DeviceSnapshot, apply_plan, decide, stage_target
from fleet_server.gates import Histograms
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.policy import Policy

from .test_engine import OLD, SHA, T0, first_stage, fleet, rollout, serving


def with_policy(**kw: object) -> Policy:
    return Policy.model_validate(kw)


def test_stages_by_count() -> None:
    assert stage_target(3, 100, "count") == 3
    assert stage_target(500, 10, "count") == 10
    r = rollout(stages=(1.0, 3.0, 5.0), stage_unit="count", soak_seconds=0)
    plan = decide(r, fleet(10), T0)
    assert len(plan.notify) == 1


def test_reverted_report_is_a_failure_of_the_new_model() -> None:
    r = rollout(stages=(100.0,), max_failure_rate=1.0)
    d = first_stage(r, 1)[0]
    reverted = dataclasses.replace(
        d, running_sha256=OLD, reported_seq=d.seq or 0, reported_state="reverted", reported_error="latency"
    )
    plan = decide(r, [reverted], T0)
    assert [(c.state, c.reason) for c in plan.changes] == [(DS.FAILED, "reverted: latency")]


def test_probation_is_not_done_even_when_serving() -> None:
    r = rollout(stages=(100.0,))
    d = first_stage(r, 1)[0]
    on_probation = dataclasses.replace(serving(d), reported_state="probation", reported_seq=d.seq or 0)
    assert [c.state for c in decide(r, [on_probation], T0).changes] == [DS.INSTALLING]
    passed = dataclasses.replace(on_probation, reported_state="serving")
    assert [c.state for c in decide(r, [passed], T0).changes] == [DS.DONE]


def test_failure_gate_can_pause_and_a_human_approval_overrides_it() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, policy=with_policy(failure_action="pause"))
    devices = first_stage(r, 2)
    devices = [
        dataclasses.replace(d, event_failure="digest_mismatch") if d.stage == 0 else d for d in devices
    ]
    plan = decide(r, devices, T0)
    assert plan.state == RS.PAUSED and plan.roll_back == []
    assert plan.decisions[-1].action == "pause" and plan.decisions[-1].figures["gate"] == "failure_rate"
    r, devices = apply_plan(r, devices, plan, T0)
    # paused: no assignment; a repeated tick adds no second pause decision
    again = decide(r, devices, T0)
    assert again.decisions == [] and again.notify == []
    # resume alone: the gate pauses again; approve (approved_through = stage) lets it go on
    resumed = dataclasses.replace(r, state=RS.RUNNING)
    assert decide(resumed, devices, T0).state == RS.PAUSED
    approved = dataclasses.replace(resumed, approved_through=0)
    plan = decide(approved, devices, T0)
    assert plan.state == RS.RUNNING and plan.current_stage == 1 and len(plan.notify) == 1


def test_manual_approval_between_stages() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, policy=with_policy(require_approval=True))
    devices = first_stage(r, 2)
    devices = [serving(d) if d.stage is not None else d for d in devices]
    plan = decide(r, devices, T0)
    assert plan.state == RS.AWAITING_APPROVAL and plan.notify == []
    assert plan.decisions[-1].action == "await_approval"
    r, devices = apply_plan(r, devices, plan, T0)
    assert decide(r, devices, T0 + timedelta(seconds=60)).empty
    plan = decide(dataclasses.replace(r, approved_through=0), devices, T0)
    assert plan.state == RS.RUNNING and plan.current_stage == 1 and len(plan.notify) == 1


def test_last_stage_completes_without_approval() -> None:
    r = rollout(stages=(100.0,), soak_seconds=0, policy=with_policy(require_approval=True))
    devices = [serving(d) for d in first_stage(r, 1)]
    assert decide(r, devices, T0).state == RS.COMPLETED


def test_retries_per_failure_class_with_exponential_backoff() -> None:
    policy = with_policy(retry_limits={"download_failed": 2}, retry_backoff_seconds=10)
    r = rollout(stages=(100.0,), policy=policy)
    d = first_stage(r, 1)[0]
    failed = dataclasses.replace(d, event_failure="download_failed: reset")
    plan = decide(r, [failed], T0)
    assert plan.state == RS.RUNNING
    (change,) = plan.changes
    assert change.state == DS.RETRY_WAIT and change.retry_at == T0 + timedelta(seconds=10)
    waiting = dataclasses.replace(d, state=DS.RETRY_WAIT, retry_at=change.retry_at)
    assert decide(r, [waiting], T0 + timedelta(seconds=9)).notify == []
    plan = decide(r, [waiting], T0 + timedelta(seconds=10))
    assert [(c.state, c.attempts) for c in plan.notify] == [(DS.NOTIFIED, 2)]
    # second failure: backoff doubles; third: no retries left -> failed; a download failure is the
    # delivery path's, not the model's: the rollout holds (delivery_action) instead of rolling back
    second = dataclasses.replace(d, attempts=2, event_failure="download_failed")
    assert decide(r, [second], T0).changes[0].retry_at == T0 + timedelta(seconds=20)
    third = dataclasses.replace(d, attempts=3, event_failure="download_failed")
    plan = decide(r, [third], T0)
    assert plan.state == RS.PAUSED and plan.decisions[-1].figures["gate"] == "delivery"
    # another class has no retries
    other = dataclasses.replace(d, event_failure="digest_mismatch")
    assert decide(r, [other], T0).state == RS.ROLLED_BACK


def test_timeouts_can_be_retried_too() -> None:
    r = rollout(stages=(100.0,), device_timeout_seconds=5, policy=with_policy(retry_limits={"timed_out": 1}))
    d = first_stage(r, 1)[0]
    plan = decide(r, [d], T0 + timedelta(seconds=6))
    assert plan.changes[0].state == DS.RETRY_WAIT


def test_rate_limit_ramps_exponentially() -> None:
    policy = with_policy(rate_per_minute=2, rate_increment_factor=2.0, max_rate_per_minute=5)
    r = rollout(stages=(100.0,), policy=policy, started_at=T0, device_timeout_seconds=3600)
    devices = fleet(20)
    plan = decide(r, devices, T0)
    assert len(plan.notify) == 2
    _, devices = apply_plan(r, devices, plan, T0)
    assert decide(r, devices, T0 + timedelta(seconds=30)).notify == []  # 2 in the last minute
    plan = decide(r, devices, T0 + timedelta(seconds=61))  # minute 1: 4/min, none in the last 60 s
    assert len(plan.notify) == 4
    _, devices = apply_plan(r, devices, plan, T0 + timedelta(seconds=61))
    plan = decide(r, devices, T0 + timedelta(minutes=5))  # 2 * 2**5 = 64, capped at 5
    assert len(plan.notify) == 5


def test_shadow_first_then_promote_when_agreement_passes() -> None:
    policy = with_policy(min_shadow_agreement=0.9, min_shadow_samples=100)
    r = rollout(stages=(100.0,), soak_seconds=0, policy=policy)
    plan = decide(r, fleet(2), T0)
    assert {c.state for c in plan.notify} == {DS.SHADOWING}
    _, devices = apply_plan(r, fleet(2), plan, T0)
    # running the new hash as a shadow is not success
    few = [dataclasses.replace(d, shadow_samples=40, shadow_agree=40) for d in devices]
    plan = decide(r, few, T0)
    assert plan.notify == [] and plan.changes == []
    enough = [dataclasses.replace(d, shadow_samples=60, shadow_agree=58) for d in devices]
    plan = decide(r, enough, T0)
    assert {c.state for c in plan.notify} == {DS.NOTIFIED}
    assert plan.decisions[0].action == "promote"


def test_shadow_disagreement_rolls_back_before_anything_is_served() -> None:
    policy = with_policy(min_shadow_agreement=0.9, min_shadow_samples=100)
    r = rollout(stages=(100.0,), policy=policy)
    devices = first_stage(r, 2)
    bad = [dataclasses.replace(d, shadow_samples=60, shadow_agree=30) for d in devices]
    plan = decide(r, bad, T0)
    assert plan.state == RS.ROLLED_BACK
    assert plan.decisions[-1].figures["gate"] == "shadow_agreement"
    assert abs(plan.decisions[-1].figures["shadow_agreement"] - 0.5) < 1e-9


def _latency(bucket: int, n: int) -> tuple[int, ...]:
    return tuple(n if i == bucket else 0 for i in range(41))


def test_latency_gate_compares_with_the_replaced_model_on_the_same_hardware() -> None:
    policy = with_policy(max_latency_ratio=1.5, min_latency_samples=50)
    r = rollout(stages=(100.0,), policy=policy)
    devices = first_stage(r, 2)
    slow = [
        dataclasses.replace(serving(d), hardware_id="rpi4", latency_buckets=_latency(12, 40)) for d in devices
    ]
    baseline = {"rpi4": Histograms(latency=_latency(10, 500)), "jetson": Histograms(latency=_latency(2, 500))}
    plan = decide(r, slow, T0, baseline)
    assert plan.state == RS.ROLLED_BACK  # 80 samples, p95 two buckets up = 2x
    f = plan.decisions[-1].figures
    assert f["gate"] == "latency_p95" and f["latency_p95_ratio"] == 2.0
    assert set(f["latency_groups"]) == {"rpi4"}
    # below the minimum sample on either side: no verdict
    few = [dataclasses.replace(d, latency_buckets=_latency(12, 20)) for d in slow]
    assert decide(r, few, T0, baseline).state != RS.ROLLED_BACK
    # a fast baseline on *other* hardware is not compared
    assert decide(r, slow, T0, {"jetson": baseline["jetson"]}).state != RS.ROLLED_BACK
    # within the allowed ratio
    ok = [dataclasses.replace(d, latency_buckets=_latency(11, 40)) for d in slow]
    assert decide(r, ok, T0, baseline).state != RS.ROLLED_BACK


def test_drift_gate_pauses_on_a_shifted_output_distribution() -> None:
    policy = with_policy(max_output_psi=0.2, min_drift_samples=100)
    r = rollout(stages=(50.0, 100.0), policy=policy)
    devices = first_stage(r, 2)
    old_hist = tuple([0] * 30 + [100, 300, 100] + [0] * 34)
    same = tuple([0] * 30 + [50, 150, 50] + [0] * 34)
    shifted = tuple([0] * 40 + [50, 150, 50] + [0] * 24)
    baseline = {"": Histograms(output=old_hist)}
    assigned = [d for d in devices if d.stage is not None]
    ok = [dataclasses.replace(serving(d), output_hist=same) if d.stage is not None else d for d in devices]
    assert decide(r, ok, T0, baseline).state == RS.RUNNING
    bad = [
        dataclasses.replace(serving(d), output_hist=shifted) if d.stage is not None else d for d in devices
    ]
    plan = decide(r, bad, T0, baseline)
    assert len(assigned) == 1 and plan.state == RS.PAUSED
    assert (
        plan.decisions[-1].figures["gate"] == "output_drift" and plan.decisions[-1].figures["output_psi"] > 1
    )


def test_install_success_threshold_applies_when_the_stage_ends() -> None:
    policy = with_policy(min_success_rate=0.75)
    r = rollout(stages=(100.0,), max_failure_rate=1.0, policy=policy, soak_seconds=0)
    devices = first_stage(r, 4)
    half = [serving(d) if i < 2 else dataclasses.replace(d, event_failure="x") for i, d in enumerate(devices)]
    plan = decide(r, half, T0)
    assert plan.state == RS.ROLLED_BACK and plan.decisions[-1].figures["gate"] == "install_success"
    # while devices are still in flight the success threshold is not judged yet
    partly = [serving(d) if i < 2 else d for i, d in enumerate(devices)]
    assert decide(r, partly, T0).state == RS.RUNNING


def test_max_failures_as_a_count() -> None:
    r = rollout(stages=(100.0,), max_failure_rate=1.0, policy=with_policy(max_failures=1))
    devices = first_stage(r, 4)
    one = [dataclasses.replace(d, event_failure="x") if i == 0 else d for i, d in enumerate(devices)]
    assert decide(r, one, T0).state == RS.RUNNING
    two = [dataclasses.replace(d, event_failure="x") if i < 2 else d for i, d in enumerate(devices)]
    assert decide(r, two, T0).state == RS.ROLLED_BACK


def test_operator_rollback_from_a_completed_rollout() -> None:
    r = rollout(stages=(100.0,), state=RS.COMPLETED, rollback_requested=True)
    devices = [dataclasses.replace(d, state=DS.DONE, stage=0) for d in fleet(3)]
    devices.append(DeviceSnapshot(device_id="never", state=DS.PENDING))
    plan = decide(r, devices, T0)
    assert plan.state == RS.ROLLED_BACK and plan.rollback_done
    assert sorted(plan.roll_back) == ["d000", "d001", "d002"]
    assert plan.decisions[-1].figures["gate"] == "operator"


def test_devices_joining_grow_the_stage_targets() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0)
    devices = first_stage(r, 2)
    devices = [serving(d) if d.stage is not None else d for d in devices]
    joined = devices + [
        DeviceSnapshot(device_id=f"j{i}", state=DS.PENDING, running_sha256=OLD) for i in range(2)
    ]
    plan = decide(r, joined, T0)
    # 50 % of 4 = 2: one more device joins stage 1 before the stage can finish
    assert len(plan.notify) == 1 and plan.current_stage == 0
    assert SHA != OLD
