"""Property tests (hypothesis) of the pure engine over random fleets, policies and device behaviour.

A small in-test ticker applies each plan the way fleet_server.ticker does, a
simulated fleet answers the directives (serve well, serve with errors, fail,
revert, or never answer), and a simulated operator approves whenever the
rollout waits for a human. Properties: the engine never assigns more than the
stage allows, never advances through a failing gate, always terminates, and a
restart (the same persisted snapshot decided again, or a repeated tick) gives
exactly the same plan and never notifies a device twice.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server import gates
from fleet_server.engine import DeviceSnapshot, Plan, RolloutSnapshot, decide, stage_target
from fleet_server.gates import Policy
from fleet_server.models import DeviceRolloutState as DS
from fleet_server.models import RolloutState as RS

from .test_engine import OLD, SHA, T0

OUTCOMES = ("ok", "errors", "fail", "revert", "silent")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[RolloutSnapshot, list[str], list[int]]:
    n = draw(st.integers(1, 30))
    unit = draw(st.sampled_from(["percent", "count"]))
    if unit == "percent":
        cuts = [*sorted(set(draw(st.lists(st.integers(1, 99), max_size=3)))), 100]
    else:
        cuts = sorted(set(draw(st.lists(st.integers(1, n + 5), min_size=1, max_size=4))))
    policy = Policy(
        failure_action=draw(st.sampled_from(gates.GATE_ACTIONS)),
        error_action=draw(st.sampled_from(gates.GATE_ACTIONS)),
        max_failures=draw(st.none() | st.integers(0, 5)),
        min_success_rate=draw(st.sampled_from([0.0, 0.5])),
        require_approval=draw(st.booleans()),
        retry_limits=draw(st.sampled_from([{}, {"download_failed": 1}, {"*": 2}])),
        retry_backoff_seconds=draw(st.sampled_from([0.0, 5.0])),
        rate_per_minute=draw(st.none() | st.integers(1, 10)),
        rate_increment_factor=draw(st.sampled_from([1.0, 2.0])),
    )
    r = RolloutSnapshot(
        id="prop",
        state=RS.RUNNING,
        model_sha256=SHA,
        stages=tuple(float(c) for c in cuts),
        current_stage=0,
        stage_ready_at=None,
        soak_seconds=draw(st.sampled_from([0.0, 10.0])),
        device_timeout_seconds=120.0,
        max_error_rate=0.1,
        min_inferences=draw(st.integers(1, 30)),
        max_failure_rate=draw(st.sampled_from([0.0, 0.3, 1.0])),
        policy=policy,
        stage_unit=unit,
        started_at=T0,
    )
    outcomes = draw(st.lists(st.sampled_from(OUTCOMES), min_size=n, max_size=n))
    delays = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return r, outcomes, delays


def _apply(devices: dict[str, DeviceSnapshot], plan: Plan, now: object, seq: list[int]) -> None:
    for c in plan.changes:
        devices[c.device_id] = dataclasses.replace(devices[c.device_id], state=c.state, retry_at=c.retry_at)
    for c in plan.notify:
        seq[0] += 1
        devices[c.device_id] = dataclasses.replace(
            devices[c.device_id],
            state=c.state,
            stage=c.stage,
            seq=seq[0],
            notified_at=now,  # type: ignore[arg-type]
            attempts=c.attempts,
            retry_at=None,
            event_failure=None,
            reported_state=None,
        )


def _behave(d: DeviceSnapshot, outcome: str, ticks_since: int, delay: int) -> DeviceSnapshot:
    if d.state not in (DS.NOTIFIED, DS.INSTALLING) or ticks_since < delay:
        return d
    if outcome == "ok":
        return dataclasses.replace(d, running_sha256=SHA, served_ok=10, inferences=10)
    if outcome == "errors":
        return dataclasses.replace(d, running_sha256=SHA, served_ok=5, inferences=10, errors=5)
    if outcome == "fail":
        return dataclasses.replace(d, event_failure="download_failed")
    if outcome == "revert":
        return dataclasses.replace(d, running_sha256=OLD, reported_seq=d.seq or 0, reported_state="reverted")
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_engine_properties(scenario: tuple[RolloutSnapshot, list[str], list[int]]) -> None:
    r, outcomes, delays = scenario
    n = len(outcomes)
    devices = {
        f"d{i:02d}": DeviceSnapshot(device_id=f"d{i:02d}", state=DS.PENDING, running_sha256=OLD)
        for i in range(n)
    }
    behaviour = {f"d{i:02d}": (outcomes[i], delays[i]) for i in range(n)}
    notified_tick: dict[str, int] = {}
    seq = [0]
    now = T0
    for tick in range(600):
        snapshot = list(devices.values())
        plan = decide(r, snapshot, now)
        # restart resumes exactly: the same persisted inputs give the same plan
        assert decide(r, list(reversed(snapshot)), now).notify == plan.notify
        assert decide(r, snapshot, now) == plan
        # never advances through a failing gate
        for d in plan.decisions:
            if d.action in ("next_stage", "completed"):
                trip = gates.check(r.policy, d.figures, stage_finished=True)
                assert trip is None or (
                    trip.action == gates.PAUSE and r.approved_through >= r.current_stage
                ), (
                    d,
                    trip,
                )
        _apply(devices, plan, now, seq)
        for c in plan.notify:
            notified_tick[c.device_id] = tick
        r = dataclasses.replace(
            r, state=plan.state, current_stage=plan.current_stage, stage_ready_at=plan.stage_ready_at
        )
        # never more than the stage allows
        assigned = sum(1 for d in devices.values() if d.stage is not None)
        assert assigned <= stage_target(r.stages[r.current_stage], n, r.stage_unit)
        # a repeated tick right after (a restart mid-tick) never notifies anyone twice
        again = decide(r, list(devices.values()), now)
        assert not {c.device_id for c in again.notify} & {c.device_id for c in plan.notify}
        if r.state in RS.FINISHED:
            break
        # the simulated operator: approves whatever waits for a human
        if r.state in (RS.PAUSED, RS.AWAITING_APPROVAL):
            r = dataclasses.replace(r, state=RS.RUNNING, approved_through=r.current_stage)
        now += timedelta(seconds=20)
        for k, dev in devices.items():
            outcome, delay = behaviour[k]
            devices[k] = _behave(dev, outcome, tick - notified_tick.get(k, tick), delay)
    assert r.state in RS.FINISHED, f"no end after 600 ticks: {r.state} stage {r.current_stage}"
    if r.state == RS.COMPLETED:
        finished = [x for x in devices.values() if x.stage is not None]
        assert all(x.state in (DS.DONE, DS.FAILED, DS.TIMED_OUT) for x in finished)
        assert len(finished) == stage_target(r.stages[-1], n, r.stage_unit)
