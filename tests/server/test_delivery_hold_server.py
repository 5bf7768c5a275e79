"""A device that cannot fetch the release, through a real server and broker: retried by default,
then the rollout holds (gate ``delivery``) instead of rolling back, and a human approves; or, once
the delivery path is fixed, resumes, and the devices that could not fetch it are sent it again."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, insert
from sqlmodel import select

from device_agent import protocol
from fleet_server.engine import RESENT_ON_RESUME, assignment_order, decide
from fleet_server.gates import DELIVERY_HOLD
from fleet_server.models import Device, Model, Rollout, RolloutDecision, RolloutDevice, utcnow
from fleet_server.rollouts import find_rollout, operator_action
from fleet_server.runner import ServerThread
from fleet_server.store import new_session
from fleet_server.ticker import rollout_snapshot, snapshot
from signing.keyring import KeyDir
from simulator.runner import ScenarioRun, StepFailed
from simulator.scenario import parse_scenario

from .conftest import FakeDevice, wait_for
from .test_rollout_flow import directives, serve, status
from .test_rollout_ops import create, fleet_on_old_model


def test_through_the_server_a_device_that_cannot_fetch_is_retried_then_holds_the_rollout(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    _, new, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "dh", 2)
    base = {"model": "det:2", "selector": {"tags": {"site": "dh"}}}
    for bad in ({"delivery_actoin": "pause"}, {"delivery_action": "explode"}, {"delivery_retries": 99}):
        r = client.post("/api/v1/rollouts", json={**base, **bad})
        assert r.status_code == 400 and next(iter(bad)) in r.json()["detail"]["message"], r.text
    rid = create(client, "dh", stages=[100], retry_backoff_seconds=0.2)
    assert status(client, rid)["policy"]["delivery_action"] == "pause"
    assert status(client, rid)["policy"]["delivery_retries"] == 2
    down, up = devs["dh-0"], devs["dh-1"]
    serve(up, wait_for(lambda: directives(up, keydir))[-1], inferences=3)
    for attempt in (1, 2, 3):  # the first directive and the two retries the policy gives by default
        d = wait_for(lambda n=attempt: len(got := directives(down, keydir)) == n and got)[-1]  # type: ignore[misc]
        assert d.model is not None and d.model.sha256 == new["sha256"]
        event = protocol.Event(
            device_id=down.device_id,
            seq=d.seq,
            state=protocol.DeploymentState.FAILED,
            reason="delivery_unavailable",
            detail="GET https://mirror/targets/m.onnx: HTTP 503",
        )
        down.publish("events", protocol.encode(event))
    paused = wait_for(lambda: (s := status(client, rid))["state"] == "paused" and s)
    assert paused["devices"] == {"dh-0": "failed", "dh-1": "done"}
    decision = paused["decisions"][-1]
    assert decision["action"] == "pause" and decision["figures"]["gate"] == "delivery"
    assert decision["figures"]["delivery_failed"] == 1
    assert decision["reason"].startswith(
        "1 of 2 devices could not fetch the release (delivery_unavailable 1)"
    )
    assert len(directives(up, keydir)) == 1  # the serving device was not sent back
    # a human who has fixed (or accepted) the delivery path approves the stage
    assert client.post(f"/api/v1/rollouts/{rid}/approve").status_code == 200
    wait_for(lambda: status(client, rid)["state"] == "completed")
    assert len(directives(down, keydir)) == 3 and len(directives(up, keydir)) == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None: the server's own SQLite; else an empty PostgreSQL database of the test's own."""
    return str(request.getfixturevalue("fresh_pg")) if request.param == "postgresql" else None


def fail(dev: FakeDevice, d: protocol.Directive, reason: str) -> None:
    """Act as an agent that could not bring the directive's model into service, for ``reason``."""
    event = protocol.Event(
        device_id=dev.device_id, seq=d.seq, state=protocol.DeploymentState.FAILED, reason=reason
    )
    dev.publish("events", protocol.encode(event))


def held_by_the_mirror(
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    **over: Any,
) -> tuple[str, dict[str, FakeDevice]]:
    """Five devices: rd-0 and rd-1 cannot fetch the release (no retries), rd-2 fails on its own
    (``load_failed``), rd-3 and rd-4 serve it; 1 own failure of 3 is within 0.5, 3 of 5 are not:
    the rollout holds (gate ``delivery``)."""
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "rd", 5)
    rid = create(client, "rd", delivery_retries=0, max_failure_rate=0.5, min_inferences=1, **over)
    sent = {k: wait_for(lambda dev=dev: directives(dev, keydir))[-1] for k, dev in devs.items()}  # type: ignore[misc]
    fail(devs["rd-0"], sent["rd-0"], "delivery_unavailable")
    fail(devs["rd-1"], sent["rd-1"], "download_failed")
    fail(devs["rd-2"], sent["rd-2"], "load_failed")
    serve(devs["rd-3"], sent["rd-3"], inferences=3)
    serve(devs["rd-4"], sent["rd-4"], inferences=3)
    paused = wait_for(lambda: (s := status(client, rid))["state"] == "paused" and s)
    assert paused["decisions"][-1]["figures"]["gate"] == "delivery", paused["decisions"][-1]
    assert [paused["devices"][f"rd-{i}"] for i in range(3)] == ["failed"] * 3
    return rid, devs


def test_resume_after_a_delivery_hold_sends_the_release_again_and_the_rollout_completes(
    database_url: str | None,  # before make_server: the database is dropped after the server stopped
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    server = make_server(database_url=database_url)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        rid, devs = held_by_the_mirror(client, keydir, tmp_path, fake_device)
        # the operator fixed the mirror and resumes
        r = client.post(f"/api/v1/rollouts/{rid}/resume")
        assert r.status_code == 200 and r.json()["state"] == "running"
        resume = r.json()["decisions"][-1]
        assert resume["action"] == "resume"
        assert resume["reason"] == (
            "operator: resume; 2 devices that could not fetch the release are sent it again"
        )
        assert resume["figures"]["redelivered"] == 2 and resume["figures"]["from"] == "paused"
        again = {
            k: wait_for(lambda dev=devs[k]: len(got := directives(dev, keydir)) == 2 and got)[-1]  # type: ignore[misc]
            for k in ("rd-0", "rd-1")
        }
        first = {k: directives(devs[k], keydir)[0] for k in again}
        for k, d in again.items():  # a fresh seq of the same model: the agent accepts it
            assert d.seq > first[k].seq and d.model == first[k].model
        s = wait_for(lambda: (s := status(client, rid))["devices"]["rd-0"] == "notified" and s)
        assert s["devices"]["rd-1"] == "notified" and s["devices"]["rd-2"] == "failed"
        assert s["device_reasons"]["rd-2"].startswith("load_failed")
        assert len(directives(devs["rd-2"], keydir)) == 1  # its own failure: not sent again
        assert len(directives(devs["rd-3"], keydir)) == 1
        # a second resume of the running rollout changes nothing
        r = client.post(f"/api/v1/rollouts/{rid}/resume")
        assert r.status_code == 200 and r.json()["decisions"][-1] == resume
        # the mirror works now: both fetch and serve it, and the rollout completes
        for k, d in again.items():
            serve(devs[k], d, inferences=3)
        final = wait_for(lambda: (s := status(client, rid))["state"] == "completed" and s)
        assert final["devices"] == {
            "rd-0": "done",
            "rd-1": "done",
            "rd-2": "failed",
            "rd-3": "done",
            "rd-4": "done",
        }
        assert [d["action"] for d in final["decisions"]].count("resume") == 1
        assert len(directives(devs["rd-0"], keydir)) == 2 and len(directives(devs["rd-2"], keydir)) == 1


def test_approve_after_a_delivery_hold_sends_nothing_again(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    rid, devs = held_by_the_mirror(client, keydir, tmp_path, fake_device)
    r = client.post(f"/api/v1/rollouts/{rid}/approve")
    assert r.status_code == 200 and r.json()["decisions"][-1]["action"] == "approve"
    final = wait_for(lambda: (s := status(client, rid))["state"] == "completed" and s)
    assert [final["devices"][f"rd-{i}"] for i in range(3)] == ["failed"] * 3
    assert all(len(directives(dev, keydir)) == 1 for dev in devs.values())


RowsByDevice = dict[str, tuple[str, str, str]]


def paused_after_a_hold(store: Engine, rollback_requested: bool = False) -> RowsByDevice:
    """Rollout ``r`` paused in its second stage: devices of three classes in every state a resume
    reads (failed for delivery or for the model, held by the delivery gate or a roll back, done,
    timed out, rolled back). Returns device -> (hardware id, state, reason)."""
    now = utcnow()
    rows = {  # device: (hardware id, state, reason)
        "p0": ("rpi4", "failed", "delivery_unavailable: GET /m: HTTP 503"),
        "p1": ("rpi4", "failed", "load_failed: unsupported op"),
        "p2": (
            "rpi4",
            "held",
            f"cohort 'rpi4' paused: 1 of 2 devices could not fetch the release: {DELIVERY_HOLD}",
        ),
        "j0": ("jetson", "done", "serving the rollout model"),
        "j1": ("jetson", "failed", "download_incomplete: 10 of 99 bytes"),
        "j2": ("jetson", "timed_out", "timed_out: no success within 600s"),
        "k0": ("kiosk", "rolled_back", "rolled back with 'kiosk'"),
        "k1": ("kiosk", "failed", "delivery_unavailable"),
        "k2": ("kiosk", "held", "cohort 'kiosk' rolled back: ..."),
    }
    with store.begin() as c:
        c.execute(insert(Model.__table__), [{  # type: ignore[attr-defined]
            "id": 1, "name": "m", "version": "1", "release": 1, "target": "arm64-cpu",
            "hardware_ids": ["rpi4", "jetson", "kiosk"], "sha256": "a" * 64, "length": 1, "manifest": {},
            "storage_path": "/x", "created_at": now}])  # fmt: skip
        c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
            "id": d, "hardware_id": hw, "tags": {}, "registered_at": now, "desired_seq": 3}
            for d, (hw, _, _) in rows.items()])  # fmt: skip
        c.execute(insert(Rollout.__table__), [{  # type: ignore[attr-defined]
            "id": "r", "model_id": 1, "model_ref": "m:1", "model_sha256": "a" * 64, "selector": {},
            "stages": [50, 100], "soak_seconds": 0, "device_timeout_seconds": 3600, "max_error_rate": 0.05,
            "min_inferences": 1, "max_failure_rate": 0.5, "state": "paused", "current_stage": 1,
            "stage_ready_at": now, "stage_unit": "percent", "policy": {}, "approved_through": -1,
            "rollback_requested": rollback_requested, "created_at": now, "updated_at": now}])  # fmt: skip
        c.execute(insert(RolloutDevice.__table__), [{  # type: ignore[attr-defined]
            "rollout_id": "r", "device_id": d, "order_key": assignment_order("r", d),
            "stage": None if s == "held" else 0, "state": s, "seq": None if s == "held" else 3,
            "notified_at": None if s == "held" else now, "attempts": 0 if s == "held" else 3,
            "reason": why, "updated_at": now} for d, (_, s, why) in rows.items()])  # fmt: skip
    return rows


def test_resume_writes_the_devices_sent_again_and_the_released_class_the_engine_then_notifies(
    store: Engine,
) -> None:
    """The resume's rows on SQLite and PostgreSQL, read back by the ticker's snapshot: the devices
    that could not fetch wait for an immediate retry as attempt 1, the paused class's held devices
    are pending again, and the engine's next tick sends the release to all of them."""
    rows = paused_after_a_hold(store)
    with new_session(store) as session:
        rollout = operator_action(session, find_rollout(session, "r", for_update=True), "resume")
        session.commit()
    with new_session(store) as session:
        rollout = session.get_one(Rollout, "r")
        assert rollout.state == "running" and rollout.stage_ready_at is None
        (decision,) = session.exec(select(RolloutDecision).where(RolloutDecision.rollout_id == "r")).all()
        assert decision.reason == (
            "operator: resume; 2 devices that could not fetch the release are sent it again;"
            " 1 held device released (a paused hardware class)"
        )
        assert decision.figures == {"from": "paused", "stage": 1, "redelivered": 2, "released": 1}
        stored = {rd.device_id: rd for rd in session.exec(select(RolloutDevice)).all()}
        assert {d: rd.state for d, rd in stored.items()} == {
            **{d: s for d, (_, s, _) in rows.items()},
            "p0": "retry_wait",
            "j1": "retry_wait",
            "p2": "pending",
        }
        assert stored["p0"].attempts == 0 and stored["p0"].retry_at is not None
        assert stored["p0"].reason == f"{RESENT_ON_RESUME} (was failed: {rows['p0'][2]})"
        assert stored["p1"].attempts == 3 and stored["p1"].reason == rows["p1"][2]
        devices, _ = snapshot(session, rollout)
        plan = decide(rollout_snapshot(rollout), devices, utcnow())
    assert [(c.device_id, c.state, c.attempts) for c in plan.notify if c.reason == RESENT_ON_RESUME] == [
        (d, "notified", 1) for d in sorted(["p0", "j1"], key=lambda d: assignment_order("r", d))
    ]
    assert {c.device_id for c in plan.notify} == {"p0", "j1", "p2"} and plan.roll_back == []


def test_a_resume_while_a_roll_back_is_requested_sends_nothing_again(store: Engine) -> None:
    """The next tick rolls every device back: the resume moves the rollout on and touches no device."""
    rows = paused_after_a_hold(store, rollback_requested=True)
    with new_session(store) as session:
        operator_action(session, find_rollout(session, "r", for_update=True), "resume")
        session.commit()
    with new_session(store) as session:
        assert session.get_one(Rollout, "r").state == "running"
        (decision,) = session.exec(select(RolloutDecision).where(RolloutDecision.rollout_id == "r")).all()
        assert decision.reason == "operator: resume (a roll back is requested: nothing is sent again)"
        stored = {rd.device_id: (rd.state, rd.reason) for rd in session.exec(select(RolloutDevice)).all()}
    assert stored == {d: (s, why) for d, (_, s, why) in rows.items()}


def test_a_scenario_step_plays_the_operator_who_resumes_after_the_hold(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    """The simulator's ``operate`` step, run by the scenario runner against a real server: hold ->
    (the mirror fixed) -> resume sends the release again; a refused action fails the step."""
    rid, devs = held_by_the_mirror(client, keydir, tmp_path, fake_device)
    scenario = parse_scenario(
        {
            "name": "hold-resume",
            "fleet": {"devices": 1, "classes": [{"name": "rpi4"}]},
            "models": {"v2": {"version": "2"}},
            "steps": [
                {"action": "rollout", "id": "update", "model": "v2", "stages": [100]},
                {"action": "operate", "rollout": "update", "op": "resume"},
                {"action": "operate", "rollout": "update", "op": "resume"},
                {"action": "operate", "rollout": "update", "op": "resume", "states": ["paused"]},
            ],
            "expect": [{"check": "rollout_state", "rollout": "update", "states": ["completed"]}],
        }
    )
    token = (tmp_path / "server-data" / "admin.token").read_text().strip()  # the server's bootstrap token
    run = ScenarioRun(scenario, SimpleNamespace(server_url=server.url, admin_token=token), tmp_path)
    try:
        run.rollouts["update"] = rid  # as its rollout step would have recorded it
        deadline = time.monotonic() + 30
        run._run_step(scenario.steps[1], deadline)
        assert run.result.events[-1][1] == (
            "operator: resume rollout update -> running: operator: resume; 2 devices that could not fetch"
            " the release are sent it again"
        )
        wait_for(lambda: all(len(directives(devs[k], keydir)) == 2 for k in ("rd-0", "rd-1")))
        run._run_step(scenario.steps[2], deadline)  # a repeat: nothing more
        assert run.result.events[-1][1] == "operator: resume rollout update -> running"
        assert status(client, rid)["state"] == "running"
        run._run_step(scenario.steps[3], deadline)  # only if paused: it is running, so nothing
        assert run.result.events[-1][1] == (
            "operator: no resume of rollout update: it is running, not ['paused']"
        )
        client.post(f"/api/v1/rollouts/{rid}/abort")
        with pytest.raises(StepFailed, match="resume: server answered 409"):
            run._run_step(scenario.steps[1], deadline)
    finally:
        run._api.close()
