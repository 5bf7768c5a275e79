"""The engine and devices that wait for their maintenance window, a deferral or their link."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from fleet_server.engine import DeviceSnapshot
from fleet_server.lifecycle import DeviceRolloutState as DS

from .test_engine import SHA, T0, first_stage, rollout, serving, tick


def waiting(d: DeviceSnapshot, reason: str = "maintenance_window") -> DeviceSnapshot:
    """The device reports it waits for the seq it was sent (its Reported ``waiting``)."""
    return dataclasses.replace(d, reported_seq=d.seq or 0, reported_state="staged", waiting=reason)


def proceeding(d: DeviceSnapshot) -> DeviceSnapshot:
    return dataclasses.replace(d, reported_state="warming", waiting=None, event_progress=True)


def test_a_waiting_device_is_not_timed_out_and_its_timeout_counts_from_the_wait_end() -> None:
    r = rollout(stages=(100.0,), device_timeout_seconds=60, max_wait_seconds=7 * 86400, max_failure_rate=1.0)
    (d,) = first_stage(r, 1)
    assert d.state == DS.NOTIFIED
    r, (d,), plan = tick(r, [waiting(d)], T0 + timedelta(seconds=10))
    assert d.state == DS.WAITING and d.reason == "waiting: maintenance_window"
    assert d.timeout_from == T0 + timedelta(seconds=10)
    # Two days on (the window is on Saturday night): still waiting, not timed out, the stage waits.
    sat = T0 + timedelta(days=2)
    r, (d,), plan = tick(r, [d], sat)
    assert d.state == DS.WAITING and not plan.changes and r.stage_ready_at is None
    # The window opens: the device gets on with it, and the timeout starts again from now ...
    r, (d,), _ = tick(r, [proceeding(d)], sat + timedelta(seconds=1))
    assert d.state == DS.INSTALLING and d.timeout_from == sat + timedelta(seconds=1)
    r, (d,), _ = tick(r, [d], sat + timedelta(seconds=50))
    assert d.state == DS.INSTALLING  # 50 s after the window opened, within the 60 s timeout
    # ... and a device that never proves the model is timed out 60 s after the wait ended.
    r, (d,), _ = tick(r, [d], sat + timedelta(seconds=62))
    assert d.state == DS.TIMED_OUT and "no success within 60s" in (d.reason or "")


def test_a_waiting_device_that_serves_is_done_at_once() -> None:
    r = rollout(stages=(100.0,))
    (d,) = first_stage(r, 1)
    r, (d,), _ = tick(r, [waiting(d, "deferred")], T0 + timedelta(seconds=1))
    assert d.state == DS.WAITING
    done = dataclasses.replace(serving(d), waiting=None, reported_state="serving")
    r, (d,), _ = tick(r, [done], T0 + timedelta(hours=3))
    assert d.state == DS.DONE


def test_waiting_forever_is_a_timeout_after_max_wait_seconds() -> None:
    r = rollout(stages=(100.0,), max_wait_seconds=3600, max_failure_rate=1.0)
    (d,) = first_stage(r, 1)
    r, (d,), _ = tick(r, [waiting(d, "metered_link")], T0)
    r, (d,), _ = tick(r, [d], T0 + timedelta(seconds=3599))
    assert d.state == DS.WAITING
    r, (d,), _ = tick(r, [d], T0 + timedelta(seconds=3601))
    assert d.state == DS.TIMED_OUT and "waited more than 3600s (metered_link)" in (d.reason or "")


def test_a_report_of_waiting_for_another_seq_does_not_stop_the_clock() -> None:
    r = rollout(stages=(100.0,), device_timeout_seconds=60, max_failure_rate=1.0)
    (d,) = first_stage(r, 1)
    # The ticker sets ``waiting`` only for the seq the rollout sent; a stale report leaves it None.
    stale = dataclasses.replace(d, reported_seq=(d.seq or 0) - 1, reported_state="staged")
    r, (d,), _ = tick(r, [stale], T0 + timedelta(seconds=61))
    assert d.state == DS.TIMED_OUT


def test_gates_count_only_the_devices_that_are_not_waiting() -> None:
    # 1 of 10 failing is 10 %, but with 8 of them waiting it is 1 of 2 that got on with it: 50 %.
    r = rollout(stages=(100.0,), max_failure_rate=0.3, min_inferences=1)
    devices = first_stage(r, 10)
    failed = dataclasses.replace(devices[0], event_failure="load_failed")
    ok = serving(devices[1])
    rest = [waiting(d) for d in devices[2:]]
    _, _, plan = tick(r, [failed, ok, *rest], T0 + timedelta(seconds=5))
    decision = next(dec for dec in plan.decisions if dec.action == "roll_back")
    assert decision.figures["assigned"] == 2 and decision.figures["waiting"] == 8
    assert decision.figures["failure_rate"] == 0.5


def test_a_stage_of_only_waiting_devices_waits_and_then_finishes() -> None:
    r = rollout(stages=(100.0,), soak_seconds=0)
    devices = first_stage(r, 3)
    r, devices, plan = tick(r, [waiting(d) for d in devices], T0 + timedelta(seconds=1))
    assert all(d.state == DS.WAITING for d in devices) and r.state == "running"
    r, devices, plan = tick(r, devices, T0 + timedelta(days=5))
    assert all(d.state == DS.WAITING for d in devices) and not plan.decisions
    now = T0 + timedelta(days=5, seconds=1)
    r, devices, plan = tick(r, [dataclasses.replace(serving(d), waiting=None) for d in devices], now)
    assert all(d.state == DS.DONE for d in devices)
    r, devices, plan = tick(r, devices, now + timedelta(seconds=1))
    assert r.state == "completed" and devices[0].running_sha256 == SHA


def test_a_device_waiting_with_its_directive_is_not_drift() -> None:
    """It reports the desired seq, settled on its old model: without ``waiting`` that is a model
    mismatch the server would republish every interval; waiting for that seq, it is in sync."""
    from datetime import UTC, datetime

    from fleet_server import reconcile

    now = datetime(2026, 3, 1, tzinfo=UTC)
    held = reconcile.Directive(5, "a" * 64, False, now + timedelta(days=1), None, 0.0)
    policy = reconcile.Policy(grace=10.0, interval=30.0)
    old = reconcile.Reported(seq=5, state="serving", running_sha256="b" * 64)
    assert reconcile.decide(5, held, old, None, 100.0, now, policy).drift is reconcile.Drift.MODEL
    waits = reconcile.Reported(seq=5, state="serving", running_sha256="b" * 64, waiting_seq=5)
    verdict = reconcile.decide(5, held, waits, None, 100.0, now, policy)
    assert verdict.drift is reconcile.Drift.NONE and not verdict.republish
    stale = reconcile.Reported(seq=5, state="serving", running_sha256="b" * 64, waiting_seq=4)
    assert reconcile.decide(5, held, stale, None, 100.0, now, policy).drift is reconcile.Drift.MODEL
