"""``/api/v1/experiments`` against a real server and broker, devices played over MQTT: assignment,
each arm's signed directives, per-arm figures from telemetry, the 409s, guardrail stops and stop."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from device_agent import protocol
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import FakeDevice, wait_for
from .test_mqtt import reported
from .test_rollout_flow import directives
from .test_rollout_ops import fleet_on_old_model


def experiment(client: httpx.Client, prefix: str, **over: Any) -> dict[str, Any]:
    body = {
        "name": f"{prefix}-exp",
        "selector": {"tags": {"site": prefix}},
        "arms": [
            {"name": "control", "model": "det:1", "weight": 1},
            {"name": "candidate", "model": "det:2", "weight": 1},
        ],
        "metric": "accuracy",
        "min_samples": 50,
        "policy": {"soak_seconds": 0, "min_inferences": 1},
        **over,
    }
    r = client.post("/api/v1/experiments", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def serve_arm(
    dev: FakeDevice,
    d: protocol.Directive,
    batch: str,
    inferences: int,
    errors: int = 0,
    labels: int = 0,
    correct: int = 0,
    outcomes: dict[str, list[float]] | None = None,
) -> None:
    """Act as an agent serving the directive's model: reported state, then one telemetry batch."""
    assert d.model is not None
    running = protocol.RunningModel(name=d.model.name, version=d.model.version, sha256=d.model.sha256)
    dev.publish(
        "reported",
        reported(
            dev.device_id,
            running=running,
            deployment_seq=d.seq,
            deployment_state="serving",
            served_ok={d.model.sha256: inferences - errors},
            ts=datetime.now(UTC),
        ),
        retain=True,
    )
    stats = protocol.ModelStats(
        inferences=inferences,
        errors={"non_finite": errors} if errors else {},
        labels=labels,
        labels_correct=correct,
        latency_buckets=[0] * 20 + [inferences] + [0] * 20,
        outcomes=outcomes or {},
    )
    now = datetime.now(UTC)
    dev.publish(
        "telemetry",
        protocol.encode_telemetry(
            protocol.TelemetryBatch(
                device_id=dev.device_id,
                batch_id=batch,
                window_start=now,
                window_end=now,
                models={d.model.sha256: stats},
            )
        ),
    )


def get(client: httpx.Client, eid: str) -> dict[str, Any]:
    return dict(client.get(f"/api/v1/experiments/{eid}").json())


def test_arms_get_their_versions_figures_flow_and_rollouts_keep_off(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    old, new, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "ab", 6)
    exp = experiment(client, "ab", guardrails=[{"metric": "error_rate", "max_harm": 0.02}])
    eid = exp["id"]
    arms = {a["name"]: a for a in exp["arms"]}
    assert arms["control"]["devices"] == 3 and arms["candidate"]["devices"] == 3
    assert exp["decisions"][0]["action"] == "created"
    # each arm's devices get a signed directive for that arm's version
    want = {"control": old["sha256"], "candidate": new["sha256"]}
    got = wait_for(
        lambda: (
            {i: directives(d, keydir)[-1] for i, d in devs.items() if directives(d, keydir)}
            if all(directives(d, keydir) for d in devs.values())
            else None
        )
    )
    by_sha: dict[str, list[str]] = {}
    for device_id, d in got.items():
        assert d.model is not None
        by_sha.setdefault(d.model.sha256, []).append(device_id)
    assert sorted(len(v) for v in by_sha.values()) == [3, 3] and set(by_sha) == set(want.values())

    # a rollout over those devices is refused while the experiment holds them
    r = client.post("/api/v1/rollouts", json={"model": "det:2", "selector": {"tags": {"site": "ab"}}})
    assert r.status_code == 409 and r.json()["detail"]["code"] == "rollout_conflict"
    assert f"experiment:{eid}" in r.json()["detail"]["message"]
    # and so is a second experiment
    r = client.post(
        "/api/v1/experiments",
        json={
            "name": "again",
            "selector": {"tags": {"site": "ab"}},
            "arms": [
                {"name": "a", "model": "det:1", "weight": 1},
                {"name": "b", "model": "det:2", "weight": 1},
            ],
        },
    )
    assert r.status_code == 409 and r.json()["detail"]["code"] == "experiment_conflict"

    # the devices serve: the candidate is more accurate, with an error rate within the guardrail
    for device_id, d in got.items():
        control = d.model is not None and d.model.sha256 == old["sha256"]
        serve_arm(
            devs[device_id], d, f"{device_id}-1", 400, errors=2, labels=400, correct=320 if control else 392
        )
    status = wait_for(
        lambda: (
            (s := get(client, eid))
            and all(a["metrics"]["accuracy"]["samples"] == 1200 for a in s["arms"])
            # the arms' serving counts come from the devices' reported state, which the server
            # reads on another path than their telemetry: wait for both
            and all(a["serving"] == 3 for a in s["arms"] if a["name"] == "candidate")
            and s
        )
    )
    arms = {a["name"]: a for a in status["arms"]}
    assert (
        arms["control"]["metrics"]["accuracy"]["value"] == 0.8
        and arms["candidate"]["metrics"]["accuracy"]["value"] == 0.98
    )
    assert arms["candidate"]["serving"] == 3
    (acc,) = [e for e in arms["candidate"]["effects"] if e["metric"] == "accuracy"]
    assert acc["verdict"] == "better" and acc["lower"] > 0 and acc["estimate"] > 0.17
    # the leader records the winner (no auto-promote: the experiment keeps running until stopped)
    status = wait_for(
        lambda: (s := get(client, eid)) and any(d["action"] == "winner" for d in s["decisions"]) and s
    )
    assert status["winner"] == "candidate" and status["state"] == "running"

    # stop with promote: the winner goes to the whole selector
    r = client.post(f"/api/v1/experiments/{eid}/stop", json={"promote": True, "reason": "ship it"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["state"] == "completed" and done["promoted_rollout_id"]
    rollout = client.get(f"/api/v1/rollouts/{done['promoted_rollout_id']}").json()
    assert rollout["model"] == "det:2" and len(rollout["devices"]) == 6
    # stopping again is refused with a reason (a finished experiment cannot be promoted twice)
    r = client.post(f"/api/v1/experiments/{eid}/stop", json={"promote": True})
    assert r.status_code == 409 and r.json()["detail"]["code"] == "experiment_finished"


def test_a_guardrail_breach_sends_the_arm_back_to_the_control(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    old, new, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "gr", 4)
    exp = experiment(client, "gr", guardrails=[{"metric": "error_rate", "max_harm": 0.01}])
    eid = exp["id"]
    got = wait_for(
        lambda: (
            {i: directives(d, keydir)[-1] for i, d in devs.items()}
            if all(directives(d, keydir) for d in devs.values())
            else None
        )
    )
    for device_id, d in got.items():
        bad = d.model is not None and d.model.sha256 == new["sha256"]
        serve_arm(devs[device_id], d, f"{device_id}-1", 2000, errors=400 if bad else 4)
    status = wait_for(lambda: (s := get(client, eid)) and s["state"] != "running" and s, timeout=30)
    arms = {a["name"]: a for a in status["arms"]}
    cand = arms["candidate"]
    # the experiment's guardrail, or the arm rollout's own error-rate gate if it tripped first
    assert cand["state"] == "stopped" and cand["return_rollout_id"], cand
    assert "guardrail error_rate" in cand["reason"] or "error rate" in cand["reason"], cand
    assert status["state"] == "completed" and status["winner"] == "control"
    assert [d["action"] for d in status["decisions"]][1] in ("guardrail_stop", "rollout_stop")
    # the candidate's devices get a newer directive naming the control's version
    back = [i for i, d in got.items() if d.model is not None and d.model.sha256 == new["sha256"]]
    for device_id in back:

        def returned(i: str = device_id) -> protocol.Directive | None:
            ds = directives(devs[i], keydir)
            model = ds[-1].model if ds else None
            good = model is not None and model.sha256 == old["sha256"]
            return ds[-1] if good and ds[-1].rollout_id == cand["return_rollout_id"] else None

        latest = wait_for(returned, timeout=30)
        assert latest.seq > got[device_id].seq


def test_bad_requests_name_the_problem(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    fleet_on_old_model(client, keydir, tmp_path, fake_device, "bad", 1)
    arms = [{"name": "a", "model": "det:1", "weight": 1}, {"name": "b", "model": "det:2", "weight": 1}]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "x", "arms": arms[:1]}, 400, "invalid_request"),
        ({"name": "x", "arms": [arms[0], {**arms[1], "name": "a"}]}, 400, "invalid_request"),
        ({"name": "x", "arms": arms, "metric": "happiness"}, 400, "invalid_request"),
        ({"name": "x", "arms": [arms[0], {**arms[1], "model": "det:9"}]}, 404, "model_not_found"),
        ({"name": "x", "arms": arms, "selector": {"tags": {"site": "nowhere"}}}, 400, "no_matching_devices"),
        ({"name": "x", "arms": arms, "selector": {"tags": {"site": "bad"}}}, 400, "too_few_devices"),
    ]
    for body, code, reason in cases:
        r = client.post("/api/v1/experiments", json=body)
        assert r.status_code == code, (body, r.text)
        assert r.json()["detail"]["code"] == reason
    assert client.get("/api/v1/experiments").json()["items"] == []  # nothing of them was stored
    assert client.get("/api/v1/experiments/nope").status_code == 404


def test_cli_create_status_and_stop(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    from typer.testing import CliRunner

    from edgefleet.cli import app

    runner = CliRunner()

    def ef(*args: str, code: int = 0) -> Any:
        result = runner.invoke(app, [*args, "--server", server.url, "--json"])
        assert result.exit_code == code, result.output
        return json.loads(result.stdout) if code == 0 else result.output

    fleet_on_old_model(client, keydir, tmp_path, fake_device, "cli", 4)
    exp = ef(
        "experiments", "create", "--name", "cli", "--selector", "site=cli", "--arm", "control=det:1",
        "--arm", "candidate=det:2@1", "--guardrail", "latency_ms=5", "--guardrail", "error_rate",
        "--min-inferences", "1",
    )  # fmt: skip
    assert [a["devices"] for a in exp["arms"]] == [2, 2]
    assert exp["guardrails"] == [
        {"metric": "latency_ms", "max_harm": 5.0, "better": None},
        {"metric": "error_rate", "max_harm": 0.0, "better": None},
    ]
    status = ef("experiments", "status", exp["id"])
    assert status["id"] == exp["id"] and {e["metric"] for e in status["arms"][1]["effects"]} == {
        "accuracy",
        "latency_ms",
        "error_rate",
    }
    table = runner.invoke(app, ["experiments", "status", exp["id"], "--server", server.url])
    assert table.exit_code == 0 and "always-valid" in table.output and "candidate" in table.output
    # the control cannot be stopped on its own; an unknown experiment is a one-line error, exit 1
    assert "control_arm" in ef("experiments", "stop", exp["id"], "--arm", "control", code=1)
    stopped = ef("experiments", "stop", exp["id"], "--arm", "candidate", "--reason", "enough")
    cand = next(a for a in stopped["arms"] if a["name"] == "candidate")
    assert cand["state"] == "stopped" and cand["reason"] == "operator: enough" and cand["return_rollout_id"]
    assert "experiment_not_found" in ef("experiments", "status", "nope", code=1)
    assert ef("experiments", "create", "--name", "x", "--arm", "bad", code=2)
    final = ef("experiments", "stop", exp["id"])
    assert final["state"] in ("stopped", "completed")
    assert [e["id"] for e in ef("experiments", "list")] == [exp["id"]]


def test_a_viewer_reads_but_cannot_create_or_stop_and_changes_are_audited(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    fleet_on_old_model(client, keydir, tmp_path, fake_device, "rb", 2)
    r = client.post("/api/v1/tokens", json={"name": "watcher", "role": "viewer"})
    assert r.status_code == 201, r.text
    viewer = httpx.Client(
        base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {r.json()['token']}"}
    )
    body = {
        "name": "rbac",
        "selector": {"tags": {"site": "rb"}},
        "arms": [{"name": "a", "model": "det:1", "weight": 1}, {"name": "b", "model": "det:2", "weight": 1}],
    }
    assert viewer.post("/api/v1/experiments", json=body).status_code == 403
    exp = experiment(client, "rb")
    assert viewer.get(f"/api/v1/experiments/{exp['id']}").status_code == 200
    assert viewer.post(f"/api/v1/experiments/{exp['id']}/stop", json={}).status_code == 403
    # a device a running experiment holds cannot be deleted (nor while its arm's rollout runs)
    r = client.delete("/api/v1/devices/rb-0")
    assert r.status_code == 409 and r.json()["detail"]["code"] in (
        "device_in_experiment",
        "device_in_rollout",
    )
    assert (
        client.post(f"/api/v1/experiments/{exp['id']}/stop", json={"reason": "done"}).json()["state"]
        == "stopped"
    )
    viewer.close()
    audit = client.get("/api/v1/audit", params={"path": "/api/v1/experiments"}).json()["items"]
    seen = [(a["method"], a["path"], a["status"]) for a in audit]
    assert ("POST", "/api/v1/experiments", 403) in seen and ("POST", "/api/v1/experiments", 201) in seen
    assert ("POST", f"/api/v1/experiments/{exp['id']}/stop", 200) in seen
    # once it ended (and the arms' rollouts with it), the device can go
    wait_for(lambda: client.delete("/api/v1/devices/rb-1").status_code == 200, timeout=30)


def test_on_postgresql_outcomes_and_labels_reach_the_arms(
    make_server: Callable[..., ServerThread],
    fresh_pg: str,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    server = make_server(database_url=fresh_pg)
    client = httpx.Client(base_url=server.url, timeout=10)
    old, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "pg", 4)
    exp = experiment(client, "pg", metric="outcome:clicks", min_samples=10)
    got = wait_for(
        lambda: (
            {i: directives(d, keydir)[-1] for i, d in devs.items()}
            if all(directives(d, keydir) for d in devs.values())
            else None
        )
    )
    for device_id, d in got.items():
        control = d.model is not None and d.model.sha256 == old["sha256"]
        # 200 click counts each: mean 1.0 (control) or 1.5, spread 0.5 (sum of squares n (mean^2 + 0.25))
        mean = 1.0 if control else 1.5
        clicks = [200.0, 200 * mean, 200 * (mean * mean + 0.25)]
        serve_arm(
            devs[device_id], d, f"{device_id}-1", 200, labels=100, correct=90, outcomes={"clicks": clicks}
        )
        serve_arm(
            devs[device_id], d, f"{device_id}-1", 200, labels=100, correct=90, outcomes={"clicks": clicks}
        )

    def both() -> dict[str, Any] | None:
        s = get(client, exp["id"])
        ok = all(a["metrics"].get("outcome:clicks", {}).get("samples") == 400 for a in s["arms"])
        return s if ok else None

    status = wait_for(both, timeout=30)  # the same batch sent twice counted once
    arms = {a["name"]: a for a in status["arms"]}
    assert arms["control"]["metrics"]["outcome:clicks"]["value"] == 1.0
    assert arms["candidate"]["metrics"]["outcome:clicks"]["value"] == 1.5
    assert arms["candidate"]["metrics"]["accuracy"]["samples"] == 200
    (eff,) = [e for e in arms["candidate"]["effects"] if e["metric"] == "outcome:clicks"]
    assert eff["verdict"] == "better" and eff["lower"] > 0.3
    wait_for(lambda: get(client, exp["id"])["winner"] == "candidate")
    client.close()
