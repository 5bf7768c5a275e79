"""Devices that could not fetch the release hold a rollout instead of rolling back its model
(pure: the gates and the engine; through a server: test_delivery_hold_server.py).

A delivery failure (the mirror, CDN or server out of reach or overloaded) says nothing about the
model: the install gates judge the devices' own failures, and the delivery failures trip only
gate ``delivery``, tried after every gate that judges the model, with ``delivery_action`` (pause
by default). Such failures are retried by default (``delivery_retries``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from device_agent import protocol
from fleet_server import gates
from fleet_server.engine import RESENT_ON_RESUME, DeviceSnapshot, RolloutSnapshot, redelivery
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.policy import AGENT_REASON_CODES, DELIVERY_FAILURES, GateAction, Policy

from .test_engine import T0, first_stage, rollout, serving, tick


def figures(p: Policy, assigned: int, done: int, failures: dict[str, int]) -> dict[str, Any]:
    """The install figures as the engine computes them (``engine._figures``) for these outcomes."""
    failed = sum(failures.values())
    return {
        "assigned": assigned,
        "done": done,
        "failed": failed,
        "failure_rate": failed / assigned,
        "max_failure_rate": p.max_failure_rate,
        "success_rate": done / assigned,
        "failure_classes": dict(sorted(failures.items())),
        "delivery_failed": sum(n for c, n in failures.items() if c in DELIVERY_FAILURES),
    }


def install_trip(p: Policy, f: dict[str, Any], finished: bool = False) -> gates.Trip | None:
    """The first install gate that trips, or else the delivery hold (the gates between them need
    figures these tests omit)."""
    for gate in ("failure_rate", "failures", "install_success", "delivery"):
        trip = gates.verdict(p, f, finished, gate)
        if trip is not None:
            return trip
    return None


def two_classes(
    r: RolloutSnapshot, n: int, fails: Callable[[DeviceSnapshot], str | None]
) -> list[DeviceSnapshot]:
    """``n`` devices of ``r`` assigned its first stage, every other one rpi4, the rest jetson; in
    that stage each fails with what ``fails`` says of it (None: it serves the model)."""
    devices = [
        dataclasses.replace(d, hardware_id="rpi4" if i % 2 else "jetson")
        for i, d in enumerate(first_stage(r, n))
    ]
    out = []
    for d in devices:
        if d.stage == 0:
            why = fails(d)
            d = dataclasses.replace(d, event_failure=why) if why is not None else serving(d)
        out.append(d)
    return out


def test_the_delivery_classes_are_agent_codes_that_mean_nothing_was_fetched() -> None:
    assert {"delivery_unavailable", "unavailable", "download_failed", "download_incomplete"} <= (
        DELIVERY_FAILURES
    )
    assert DELIVERY_FAILURES <= AGENT_REASON_CODES
    # a verdict on what was fetched is a model or security failure, never an outage
    for verdict in ("digest_mismatch", "bad_signature", "metadata_expired", "target_mismatch", "expired"):
        assert verdict not in DELIVERY_FAILURES
    assert "timed_out" not in DELIVERY_FAILURES and "reverted" not in DELIVERY_FAILURES


def test_delivery_failures_over_the_rate_pause_with_a_reason_that_says_so() -> None:
    p = Policy(max_failure_rate=0.01)
    f = figures(p, 1000, 670, {"delivery_unavailable": 300, "download_failed": 30})
    trip = install_trip(p, f)
    assert trip == gates.Trip(
        "delivery",
        GateAction.PAUSE,
        "330 of 1000 devices could not fetch the release (delivery_unavailable 300, download_failed 30):"
        " the delivery path failed, not the model (failure rate 0.330 > 0.01)",
    )
    # the whole check (every gate, in order) gives the same verdict
    full = {**f, "inferences": 0, "errors": 0, "error_rate": 0.0, "max_error_rate": 0.05}
    full |= {"min_inferences": 20, "shadow_samples": 0, "shadow_agreement": None}
    assert gates.check(p, full, stage_finished=False) == trip
    # an operator who wants delivery outages rolled back says so
    back = Policy(max_failure_rate=0.01, delivery_action=GateAction.ROLL_BACK)
    trip = install_trip(back, figures(back, 1000, 670, {"delivery_unavailable": 330}))
    assert trip is not None and (trip.gate, trip.action) == ("delivery", GateAction.ROLL_BACK)


def test_model_failures_over_the_rate_roll_back_with_the_same_reason_as_before() -> None:
    p = Policy(max_failure_rate=0.01)
    trip = install_trip(p, figures(p, 100, 95, {"digest_mismatch": 3, "timed_out": 2}))
    assert trip == gates.Trip(
        "failure_rate", GateAction.ROLL_BACK, "5 of 100 devices failed or timed out (0.050 > 0.01)"
    )


def test_mixed_failures_roll_back_when_the_devices_own_failures_alone_trip() -> None:
    p = Policy(max_failure_rate=0.05)
    # 6 of the 90 devices that fetched the release failed: 0.067 > 0.05, whatever the mirror did
    trip = install_trip(p, figures(p, 100, 84, {"load_failed": 6, "delivery_unavailable": 10}))
    assert trip == gates.Trip(
        "failure_rate",
        GateAction.ROLL_BACK,
        "6 of 90 devices failed or timed out (0.067 > 0.05); 10 more could not fetch the release",
    )
    # 2 of 90 is within the rate: only the delivery failures make it trip, and they hold it
    trip = install_trip(p, figures(p, 100, 88, {"load_failed": 2, "delivery_unavailable": 10}))
    assert trip is not None and (trip.gate, trip.action) == ("delivery", GateAction.PAUSE)
    assert trip.reason.startswith("10 of 100 devices could not fetch the release (delivery_unavailable 10)")


def test_failure_count_and_install_success_judge_the_devices_own_failures_first() -> None:
    p = Policy(max_failure_rate=1.0, max_failures=3)
    assert install_trip(p, figures(p, 10, 6, {"io_error": 4})) == gates.Trip(
        "failures", GateAction.ROLL_BACK, "4 devices failed (> 3)"
    )
    trip = install_trip(p, figures(p, 10, 5, {"io_error": 2, "download_incomplete": 3}))
    assert trip is not None and (trip.gate, trip.action) == ("delivery", GateAction.PAUSE)
    assert trip.reason.endswith("the delivery path failed, not the model (5 devices failed > 3)")

    s = Policy(max_failure_rate=1.0, min_success_rate=0.9)
    assert install_trip(s, figures(s, 10, 8, {"acceptance_failed": 2}), finished=True) == gates.Trip(
        "install_success", GateAction.ROLL_BACK, "only 8 of 10 devices serve the model (0.800 < 0.9)"
    )
    # 8 of the 9 that fetched it serve it (0.889 < 0.9): the model's own shortfall
    trip = install_trip(s, figures(s, 10, 8, {"acceptance_failed": 1, "unavailable": 1}), finished=True)
    assert trip is not None and (trip.gate, trip.action) == ("install_success", GateAction.ROLL_BACK)
    assert (
        trip.reason == "only 8 of 9 devices serve the model (0.889 < 0.9); 1 more could not fetch the release"
    )
    # every device that fetched it serves it: the stage falls short only by the outage
    trip = install_trip(s, figures(s, 10, 8, {"unavailable": 2}), finished=True)
    assert trip is not None and (trip.gate, trip.action) == ("delivery", GateAction.PAUSE)


def test_figures_recorded_without_the_delivery_count_are_judged_as_before() -> None:
    p = Policy(max_failure_rate=0.01)
    old = figures(p, 100, 95, {"download_failed": 5})
    del old["delivery_failed"]
    trip = install_trip(p, old)
    assert trip is not None and trip.gate == "failure_rate"


@pytest.mark.parametrize(
    ("limits", "delivery_retries", "expected"),
    [
        ({}, 2, {"delivery_unavailable": 2, "download_failed": 2, "digest_mismatch": 0, "timed_out": 0}),
        ({}, 0, {"delivery_unavailable": 0, "digest_mismatch": 0}),
        ({"*": 1}, 2, {"delivery_unavailable": 1, "digest_mismatch": 1}),  # '*' is the operator's word
        ({"download_failed": 5}, 2, {"download_failed": 5, "unavailable": 2, "timed_out": 0}),
    ],
)
def test_delivery_failures_are_retried_by_default(
    limits: dict[str, int], delivery_retries: int, expected: dict[str, int]
) -> None:
    p = Policy(retry_limits=limits, delivery_retries=delivery_retries)
    assert {cls: gates.retries_allowed(p, cls) for cls in expected} == expected


def test_engine_pauses_on_delivery_failures_and_rolls_back_on_model_failures() -> None:
    r = rollout(stages=(100.0,), max_failure_rate=0.2, delivery_retries=0)
    devices = first_stage(r, 10)

    def outcome(failures: dict[int, str]) -> list[Any]:
        return [
            dataclasses.replace(d, event_failure=f"{failures[i]}: GET /m: HTTP 503")
            if i in failures
            else serving(d)
            for i, d in enumerate(devices)
        ]

    plan = tick(r, outcome({0: "delivery_unavailable", 1: "delivery_unavailable", 2: "download_failed"}), T0)[
        2
    ]
    assert plan.state == RS.PAUSED and plan.roll_back == []
    decision = plan.decisions[-1]
    assert decision.action == "pause" and decision.figures["gate"] == "delivery"
    assert decision.figures["delivery_failed"] == 3 and decision.figures["failed"] == 3
    assert decision.reason == (
        "3 of 10 devices could not fetch the release (delivery_unavailable 2, download_failed 1):"
        " the delivery path failed, not the model (failure rate 0.300 > 0.2)"
    )

    plan = tick(r, outcome({0: "load_failed", 1: "load_failed", 2: "load_failed"}), T0)[2]
    assert plan.state == RS.ROLLED_BACK and len(plan.roll_back) == 10
    assert plan.decisions[-1].figures["gate"] == "failure_rate"
    assert plan.decisions[-1].figures["delivery_failed"] == 0

    # 2 of the 8 that fetched it failed on their own (0.25 > 0.2): rolled back despite the outage
    mixed = outcome({0: "load_failed", 1: "load_failed", 2: "download_failed", 3: "unavailable"})
    plan = tick(r, mixed, T0)[2]
    assert plan.state == RS.ROLLED_BACK and plan.decisions[-1].figures["gate"] == "failure_rate"
    assert plan.decisions[-1].reason == (
        "2 of 8 devices failed or timed out (0.250 > 0.2); 2 more could not fetch the release"
    )


def test_a_paused_delivery_hold_is_approved_by_a_human_and_the_rollout_goes_on() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=0, delivery_retries=0)
    devices = first_stage(r, 4)
    devices = [
        dataclasses.replace(d, event_failure="delivery_unavailable") if d.stage == 0 and i % 2 else d
        for i, d in enumerate(devices)
    ]
    devices = [serving(d) if d.stage == 0 and d.event_failure is None else d for d in devices]
    r, devices, plan = tick(r, devices, T0)
    assert r.state == RS.PAUSED and plan.decisions[-1].figures["gate"] == "delivery"
    # running again with the failed device still failed (nothing sent again): the hold trips again
    resumed = dataclasses.replace(r, state=RS.RUNNING)
    assert tick(resumed, devices, T0)[0].state == RS.PAUSED
    # approve accepts the stage: the next one starts, the failed device is not sent the model again
    r, devices, plan = tick(dataclasses.replace(resumed, approved_through=0), devices, T0)
    assert r.state == RS.RUNNING and r.current_stage == 1 and len(plan.notify) == 2
    assert Counter(d.state for d in devices)[DS.FAILED] == 1


def test_a_delivery_failure_is_retried_by_default_and_the_device_then_counts_done() -> None:
    r = rollout(stages=(100.0,), soak_seconds=0, retry_backoff_seconds=10)
    (d,) = first_stage(r, 1)
    r, devices, plan = tick(r, [dataclasses.replace(d, event_failure="download_failed: HTTP 503")], T0)
    (change,) = plan.changes
    assert change.state == DS.RETRY_WAIT and change.retry_at == T0 + timedelta(seconds=10)
    assert "retry 1 in 10s" in (change.reason or "")
    # waiting for its retry it is not a failure: nothing trips, the stage waits for it
    assert r.state == RS.RUNNING and plan.decisions == []
    later = T0 + timedelta(seconds=10)
    r, devices, plan = tick(r, devices, later)
    assert [(c.state, c.attempts) for c in plan.notify] == [(DS.NOTIFIED, 2)]
    # the second attempt fails too; the third (the last of the two retries) gets through
    r, devices, plan = tick(r, [dataclasses.replace(devices[0], event_failure="unavailable")], later)
    assert plan.changes[0].retry_at == later + timedelta(seconds=20)
    r, devices, plan = tick(r, devices, later + timedelta(seconds=20))
    assert [(c.state, c.attempts) for c in plan.notify] == [(DS.NOTIFIED, 3)]
    r, devices, plan = tick(r, [serving(devices[0])], later + timedelta(seconds=21))
    assert r.state == RS.COMPLETED and devices[0].state == DS.DONE
    assert plan.decisions[-1].figures["failed"] == 0 and plan.decisions[-1].figures["done"] == 1


def test_retries_exhausted_the_device_fails_and_the_rollout_holds() -> None:
    r = rollout(stages=(100.0,), retry_backoff_seconds=0)
    (d,) = first_stage(r, 1)
    third = dataclasses.replace(d, attempts=3, event_failure="delivery_unavailable")
    plan = tick(r, [third], T0)[2]
    assert plan.changes[0].state == DS.FAILED
    assert plan.state == RS.PAUSED and plan.decisions[-1].figures["gate"] == "delivery"


def test_a_hardware_class_whose_devices_could_not_fetch_is_paused_not_rolled_back() -> None:
    r = rollout(stages=(40.0, 100.0), delivery_retries=0, soak_seconds=0)
    devices = two_classes(r, 10, lambda d: "delivery_unavailable" if d.hardware_id == "rpi4" else None)
    got = [d for d in devices if d.stage == 0]
    assert {d.hardware_id for d in got} == {"rpi4", "jetson"}, got
    r, devices, plan = tick(r, devices, T0)
    assert r.state == RS.RUNNING and plan.roll_back == []
    assert [(x.action, x.figures["gate"]) for x in plan.decisions if x.action.endswith("_cohort")] == [
        ("pause_cohort", "delivery")
    ]
    assert all(d.state in (DS.HELD, DS.FAILED) for d in devices if d.hardware_id == "rpi4")


def test_the_policy_refuses_an_unknown_delivery_action() -> None:
    with pytest.raises(ValueError, match="delivery_action"):
        Policy.model_validate({"delivery_action": "shrug"})
    with pytest.raises(ValueError, match="delivery_retries"):
        Policy.model_validate({"delivery_retries": -1})
    assert protocol.ReasonCode.DOWNLOAD_FAILED in DELIVERY_FAILURES


def serving_figures(p: Policy, f: dict[str, Any], inferences: int, errors: int) -> dict[str, Any]:
    """``f`` with the serving figures every gate after the install gates reads."""
    return {
        **f,
        "inferences": inferences,
        "errors": errors,
        "error_rate": errors / inferences if inferences else 0.0,
        "max_error_rate": p.max_error_rate,
        "min_inferences": p.min_inferences,
        "shadow_samples": 0,
        "shadow_agreement": None,
    }


def test_a_delivery_hold_never_hides_a_gate_that_judges_the_model() -> None:
    # one device of ten could not fetch; the nine that did serve a model failing 30 % of its
    # inferences: the error gate rolls back, the hold would have kept the bad model serving
    p = Policy()
    f = serving_figures(p, figures(p, 10, 9, {"download_failed": 1}), inferences=1000, errors=300)
    trip = gates.check(p, f, stage_finished=False)
    assert trip is not None and (trip.gate, trip.action) == ("error_rate", GateAction.ROLL_BACK)
    # with a healthy model the same figures hold for the delivery path
    healthy = serving_figures(p, figures(p, 10, 9, {"download_failed": 1}), inferences=1000, errors=0)
    trip = gates.check(p, healthy, stage_finished=False)
    assert trip is not None and (trip.gate, trip.action) == ("delivery", GateAction.PAUSE)


def test_a_delivery_hold_never_hides_the_devices_own_failure_count() -> None:
    # 4 devices failed on their own (> max_failures 3) beside 10 undelivered: the count rolls back
    # although the rate of own failures (4 of 10 that fetched) is within 0.5
    p = Policy(max_failure_rate=0.5, max_failures=3)
    f = figures(p, 20, 6, {"download_failed": 10, "load_failed": 4})
    trip = install_trip(p, f)
    assert trip is not None and (trip.gate, trip.action) == ("failures", GateAction.ROLL_BACK)


def delivery_hold(r: RolloutSnapshot, n: int, failures: dict[int, str]) -> list[DeviceSnapshot]:
    """``n`` devices through the first stage: ``failures`` by index (no retries left), the rest serve."""
    devices = first_stage(r, n)
    return [
        (dataclasses.replace(d, event_failure=failures[i]) if i in failures else serving(d))
        if d.stage == 0
        else d
        for i, d in enumerate(devices)
    ]


def test_resume_sends_the_release_again_to_the_devices_that_could_not_fetch_it() -> None:
    r = rollout(stages=(100.0,), soak_seconds=0, max_failure_rate=0.2, delivery_retries=0)
    failures = {0: "delivery_unavailable: HTTP 503", 1: "download_failed: HTTP 502", 2: "load_failed: bad op"}
    r, devices, plan = tick(r, delivery_hold(r, 10, failures), T0)
    assert r.state == RS.PAUSED and plan.decisions[-1].figures["gate"] == "delivery"
    failed = {d.device_id for d in devices if d.state == DS.FAILED}
    assert len(failed) == 3

    later = T0 + timedelta(minutes=5)
    again = redelivery(devices, later)
    assert [c.device_id for c in again.resent] == ["d000", "d001"] and again.released == []
    assert all(c.state == DS.RETRY_WAIT and c.retry_at == later and c.attempts == 0 for c in again.resent)
    assert again.resent[0].reason == f"{RESENT_ON_RESUME} (was failed: delivery_unavailable: HTTP 503)"
    devices = again.apply(devices)
    # the resume: the rollout runs, the engine's retry path sends them the release as attempt 1
    r, devices, plan = tick(dataclasses.replace(r, state=RS.RUNNING), devices, later)
    assert r.state == RS.RUNNING and plan.decisions == []
    assert [(c.device_id, c.state, c.attempts, c.reason) for c in plan.notify] == [
        ("d000", DS.NOTIFIED, 1, RESENT_ON_RESUME),
        ("d001", DS.NOTIFIED, 1, RESENT_ON_RESUME),
    ]
    by_id = {d.device_id: d for d in devices}
    assert by_id["d002"].state == DS.FAILED  # its own failure stays final
    assert by_id["d000"].seq == by_id["d000"].desired_seq == 2  # a fresh seq the agent accepts
    # the mirror is fixed: they fetch the release and serve it; the rollout completes
    fixed = [serving(d) if d.device_id in ("d000", "d001") else d for d in devices]
    r, devices, plan = tick(r, fixed, later + timedelta(seconds=1))
    assert r.state == RS.COMPLETED, plan.decisions
    assert plan.decisions[-1].figures["done"] == 9 and plan.decisions[-1].figures["failed"] == 1


def test_a_device_sent_the_release_again_gets_the_delivery_retries_anew() -> None:
    r = rollout(stages=(100.0,), soak_seconds=0, retry_backoff_seconds=10)
    (d,) = first_stage(r, 1)
    third = dataclasses.replace(d, attempts=3, event_failure="unavailable")
    r, devices, _ = tick(r, [third], T0)
    assert r.state == RS.PAUSED and devices[0].state == DS.FAILED
    devices = redelivery(devices, T0).apply(devices)
    r, devices, plan = tick(dataclasses.replace(r, state=RS.RUNNING), devices, T0)
    assert [c.attempts for c in plan.notify] == [1]
    # the outage is back: the device fails again and is retried twice more before it fails
    for attempt, wait in ((1, 10), (2, 20)):
        r, devices, plan = tick(r, [dataclasses.replace(devices[0], event_failure="unavailable")], T0)
        assert plan.changes[0].state == DS.RETRY_WAIT, attempt
        assert plan.changes[0].retry_at == T0 + timedelta(seconds=wait)
        r, devices, plan = tick(r, devices, T0 + timedelta(seconds=wait))
        assert [c.attempts for c in plan.notify] == [attempt + 1]
    r, devices, plan = tick(r, [dataclasses.replace(devices[0], event_failure="unavailable")], T0)
    assert devices[0].state == DS.FAILED and r.state == RS.PAUSED


def test_a_resume_leaves_failures_that_judged_the_model_and_rolled_back_classes_alone() -> None:
    own = ("load_failed: x", "timed_out: no success within 60s", "digest_mismatch", "reverted: boom", None)
    devices = [
        DeviceSnapshot(device_id=f"o{i}", state=DS.FAILED, reason=why, hardware_id="rpi4")
        for i, why in enumerate(own)
    ]
    devices += [
        DeviceSnapshot(device_id="t0", state=DS.TIMED_OUT, reason="timed_out: x", hardware_id="rpi4"),
        DeviceSnapshot(device_id="x0", state=DS.ROLLED_BACK, reason="rolled back", hardware_id="jetson"),
        DeviceSnapshot(device_id="x1", state=DS.FAILED, reason="delivery_unavailable", hardware_id="jetson"),
        DeviceSnapshot(
            device_id="x2", state=DS.HELD, reason="cohort 'jetson' rolled back", hardware_id="jetson"
        ),
        DeviceSnapshot(device_id="h0", state=DS.HELD, reason="cohort 'rpi4' paused: x", hardware_id="rpi4"),
    ]
    again = redelivery(devices, T0)
    assert again.resent == [] and again.released == []


def test_a_resume_releases_the_hardware_class_the_delivery_hold_paused() -> None:
    r = rollout(stages=(40.0, 100.0), delivery_retries=0, soak_seconds=0)
    devices = two_classes(r, 10, lambda d: "delivery_unavailable" if d.hardware_id == "rpi4" else None)
    r, devices, plan = tick(r, devices, T0)
    assert [x.action for x in plan.decisions if x.action.endswith("_cohort")] == ["pause_cohort"]
    held = {d.device_id for d in devices if d.state == DS.HELD}
    failed = {d.device_id for d in devices if d.state == DS.FAILED}
    assert held and failed
    # the other class goes on to the last stage, which soaks; then the rollout waits for a human
    r, devices, plan = tick(r, [serving(d) if d.state == DS.NOTIFIED else d for d in devices], T0)
    assert r.state == RS.PAUSED and r.current_stage == 1
    assert plan.decisions[-1].figures["gate"] == "cohort_paused"
    # resume: the held class is released and its failed devices are sent the release again
    again = redelivery(devices, T0)
    assert {c.device_id for c in again.resent} == failed and {c.device_id for c in again.released} == held
    assert all(c.state == DS.PENDING for c in again.released)
    devices = again.apply(devices)
    r, devices, plan = tick(dataclasses.replace(r, state=RS.RUNNING, stage_ready_at=None), devices, T0)
    assert {c.device_id for c in plan.notify} == failed | held
    assert not any(x.action.endswith("_cohort") for x in plan.decisions)
    r, devices, plan = tick(r, [serving(d) if d.state == DS.NOTIFIED else d for d in devices], T0)
    assert r.state == RS.COMPLETED and all(d.state == DS.DONE for d in devices), plan.decisions


def test_a_resume_leaves_a_class_held_by_a_gate_that_judged_the_model() -> None:
    """A class whose own installs failed (the failure-rate gate paused it) keeps its hold and its
    delivery-failed devices: sent again, they would leave the gate's figures (in flight, not
    failed) and a model the gate stopped could go on to the class's held devices."""

    def policy() -> RolloutSnapshot:
        return rollout(
            stages=(50.0, 100.0), delivery_retries=0, soak_seconds=0, failure_action=GateAction.PAUSE,
            max_failure_rate=0.3,
        )  # fmt: skip

    everyone = two_classes(policy(), 40, lambda d: None)
    first = [d.device_id for d in everyone if d.stage == 0 and d.hardware_id == "rpi4"]
    assert len(first) == 10

    # 2 of the class's own failures in 5 that got the release (0.4 > 0.3), 5 more could not fetch
    own = {first[i]: ("load_failed" if i < 2 else "download_failed") for i in range(7)}
    _, devices, plan = tick(policy(), two_classes(policy(), 40, lambda d: own.get(d.device_id)), T0)
    held = [d for d in devices if d.state == DS.HELD]
    assert held and all(not gates.held_for_delivery(d.reason) for d in held)
    assert [x.figures["gate"] for x in plan.decisions if x.action == "pause_cohort"] == ["failure_rate"]
    again = redelivery(devices, T0)
    assert again.resent == [] and again.released == []

    # the same class with no failure of its own: the delivery gate held it, and a resume lifts that
    ok = {first[i]: "download_failed" for i in range(2, 7)}
    _, devices, _ = tick(policy(), two_classes(policy(), 40, lambda d: ok.get(d.device_id)), T0)
    held = [d for d in devices if d.state == DS.HELD]
    assert held and all(gates.held_for_delivery(d.reason) for d in held)
    again = redelivery(devices, T0)
    assert {c.device_id for c in again.resent} == set(ok)
    assert {c.device_id for c in again.released} == {d.device_id for d in held}
