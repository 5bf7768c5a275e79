"""Operator actions, shadow/probation directives, joiners, conflicts and telemetry views, over real MQTT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from device_agent import protocol
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_mqtt import NOW, reported
from .test_rollout_flow import directed, directives, serve, status


def fleet_on_old_model(
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    prefix: str,
    n: int,
    served: int = 9,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, FakeDevice]]:
    """``n`` devices tagged site=<prefix> running det:1 (``served`` inferences each), and det:2
    uploaded to roll out."""
    old = upload(client, make_bundle(tmp_path, keydir.key("release"), version="1", content=b"o" * 99)).json()
    new = upload(client, make_bundle(tmp_path, keydir.key("release"), version="2", content=b"n" * 99)).json()
    devs = {}
    for i in range(n):
        register(client, f"{prefix}-{i}", site=prefix)
        dev = devs[f"{prefix}-{i}"] = fake_device(f"{prefix}-{i}")
        running = protocol.RunningModel(name="det", version="1", sha256=old["sha256"])
        dev.publish(
            "reported",
            reported(dev.device_id, running=running, served_ok={old["sha256"]: served}),
            retain=True,
        )
        dev.subscribe_desired()
    wait_for(lambda: all(client.get(f"/api/v1/devices/{i}").json()["running_model"] for i in devs))
    return old, new, devs


def create(client: httpx.Client, prefix: str, **over: Any) -> str:
    body = {"model": "det:2", "selector": {"tags": {"site": prefix}}, "soak_seconds": 0, **over}
    r = client.post("/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_manual_approval_gate_and_idempotent_audited_approve(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "ap", 2)
    rid = create(client, "ap", stages=[50, 100], require_approval=True, min_inferences=1)
    (first,) = wait_for(lambda: [d for d in devs.values() if directives(d, keydir)])
    serve(first, directives(first, keydir)[-1], inferences=3)
    wait_for(lambda: status(client, rid)["state"] == "awaiting_approval")
    assert status(client, rid)["stages"][0]["state"] == "awaiting_approval"
    # the lifecycle has no resume from awaiting_approval: the refusal says what is allowed
    r = client.post(f"/api/v1/rollouts/{rid}/resume")
    assert r.status_code == 409 and r.json()["detail"]["code"] == "action_not_allowed"
    assert "approve" in r.json()["detail"]["message"]
    (other,) = [d for d in devs.values() if d is not first]
    assert directives(other, keydir) == []  # nobody else before a human approves
    for _ in range(2):
        r = client.post(f"/api/v1/rollouts/{rid}/approve")
        assert r.status_code == 200 and r.json()["state"] == "running"
    wait_for(lambda: directives(other, keydir))
    serve(other, directives(other, keydir)[-1], inferences=3)
    final = wait_for(lambda: (s := status(client, rid))["state"] == "completed" and s)
    assert [d["action"] for d in final["decisions"]].count("approve") == 1
    assert client.post(f"/api/v1/rollouts/{rid}/approve").json()["detail"]["code"] == "rollout_finished"


def test_approving_a_running_rollout_that_holds_nobody_is_a_no_op(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    """A late second click lands after the engine started the next stage: it must not approve that
    stage in advance (which would skip its manual gate and silence its pausing gates)."""
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "ra", 2)
    rid = create(client, "ra", stages=[50, 100], require_approval=True, min_inferences=1)
    wait_for(lambda: [d for d in devs.values() if directives(d, keydir)])
    assert status(client, rid)["state"] == "running"
    r = client.post(f"/api/v1/rollouts/{rid}/approve")
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert "approve" not in [d["action"] for d in status(client, rid)["decisions"]]
    (first,) = [d for d in devs.values() if directives(d, keydir)]
    serve(first, directives(first, keydir)[-1], inferences=3)
    wait_for(lambda: status(client, rid)["state"] == "awaiting_approval")  # the gate still waits


def test_operator_rollback_of_a_completed_rollout_to_the_last_good_release(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    old, new, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "rb", 2)
    rid = create(client, "rb", stages=[100], min_inferences=1)
    for dev in devs.values():
        serve(dev, wait_for(lambda dev=dev: directives(dev, keydir))[-1], inferences=2)  # type: ignore[misc]
    wait_for(lambda: status(client, rid)["state"] == "completed")
    assert client.post(f"/api/v1/rollouts/{rid}/rollback").json()["rollback_requested"] is True
    assert client.post(f"/api/v1/rollouts/{rid}/rollback").status_code == 200  # idempotent
    final = wait_for(lambda: (s := status(client, rid))["state"] == "rolled_back" and s)
    assert set(final["devices"].values()) == {"rolled_back"} and final["rollback_requested"] is False
    assert [d["action"] for d in final["decisions"]].count("rollback_requested") == 1
    for dev in devs.values():
        sent = wait_for(lambda dev=dev: len(got := directives(dev, keydir)) == 2 and got)  # type: ignore[misc]
        assert sent[0].model is not None and sent[0].model.sha256 == new["sha256"]
        assert (
            sent[1].seq > sent[0].seq and sent[1].model is not None and sent[1].model.sha256 == old["sha256"]
        )


def test_probation_in_directive_and_reverted_device_fails_the_new_model(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    old, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "pr", 1)
    rid = create(client, "pr", stages=[100], probation={"seconds": 30, "min_inferences": 20})
    dev = devs["pr-0"]
    (d,) = wait_for(lambda: directives(dev, keydir))
    assert d.probation is not None and d.probation.seconds == 30 and d.probation.min_inferences == 20
    assert d.shadow is None
    event = protocol.Event(
        device_id=dev.device_id, seq=d.seq, state=protocol.DeploymentState.REVERTED, reason="latency"
    )
    dev.publish("events", protocol.encode(event))
    final = wait_for(lambda: (s := status(client, rid))["state"] == "rolled_back" and s)
    decision = final["decisions"][-1]
    assert decision["figures"]["gate"] == "failure_rate"
    assert decision["figures"]["failure_classes"] == {"reverted": 1}
    assert "reverted: latency" in final["device_reasons"]["pr-0"]
    assert old["sha256"]


def test_shadow_first_then_promoted_on_agreement(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    old, new, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "sh", 1)
    rid = create(
        client, "sh", stages=[100], min_shadow_agreement=0.9, min_shadow_samples=20, shadow_sample_rate=0.5
    )
    dev = devs["sh-0"]
    (d,) = wait_for(lambda: directives(dev, keydir))
    assert d.shadow is not None and d.shadow.sha256 == new["sha256"] and d.shadow_sample_rate == 0.5
    assert d.model is not None and d.model.sha256 == old["sha256"]  # keeps serving its model
    assert status(client, rid)["devices"] == {"sh-0": "shadowing"}
    batch = protocol.TelemetryBatch(
        device_id=dev.device_id,
        batch_id="sh-1",
        window_start=NOW,
        window_end=NOW,
        models={old["sha256"]: protocol.ModelStats(inferences=40)},
        shadow={new["sha256"]: protocol.ShadowStats(samples=20, top1_agree=19)},
    )
    dev.publish("telemetry", protocol.encode_telemetry(batch))
    both = wait_for(lambda: (got := directives(dev, keydir)) and len(got) == 2 and got)
    assert both[1].model is not None and both[1].model.sha256 == new["sha256"] and both[1].shadow is None
    serve(dev, both[1], inferences=30)
    final = wait_for(lambda: (s := status(client, rid))["state"] == "completed" and s)
    assert "promote" in [x["action"] for x in final["decisions"]]
    rows = client.get(f"/api/v1/rollouts/{rid}/telemetry").json()["items"]
    shadow_row = next(r for r in rows if r["sha256"] == new["sha256"])
    assert shadow_row["shadow_samples"] == 20 and shadow_row["stage"] == 0


def test_devices_joining_the_selector_are_included_and_conflicts_follow_the_rule(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    fleet_on_old_model(client, keydir, tmp_path, fake_device, "jn", 2)
    rid = create(client, "jn", stages=[100], device_timeout_seconds=600)
    # overlap: refused by default, or the busy devices are left out with conflict=skip
    register(client, "jn-free", site="jn2")
    r = client.post("/api/v1/rollouts", json={"model": "det:2", "selector": {"hardware_id": "rpi4"}})
    assert r.status_code == 409 and r.json()["detail"]["code"] == "rollout_conflict"
    r = client.post(
        "/api/v1/rollouts", json={"model": "det:2", "selector": {"hardware_id": "rpi4"}, "conflict": "skip"}
    )
    assert r.status_code == 201 and "jn-0" not in r.json()["devices"] and "jn-free" in r.json()["devices"]
    client.post(f"/api/v1/rollouts/{r.json()['id']}/abort")
    # a device registering later with matching tags joins the running rollout
    register(client, "jn-late", site="jn")
    late = fake_device("jn-late")
    late.subscribe_desired()
    wait_for(lambda: "jn-late" in status(client, rid)["devices"])
    wait_for(lambda: directives(late, keydir))
    assert "joined" in [d["action"] for d in status(client, rid)["decisions"]]
    # retagging a registered device into the selector works the same way
    r = client.put("/api/v1/devices/jn-free/tags", json={"tags": {"site": "jn"}})
    assert r.status_code == 200 and r.json()["tags"] == {"site": "jn"}
    wait_for(lambda: "jn-free" in status(client, rid)["devices"])
    assert client.put("/api/v1/devices/nope/tags", json={"tags": {}}).status_code == 404
    assert client.put("/api/v1/devices/jn-free/tags", json={"tags": {"": "x"}}).status_code == 400


def test_telemetry_aggregates_per_model_and_device_class(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    old, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "tm", 2)
    buckets = [0] * 41
    buckets[10] = 10
    for i, dev in enumerate(devs.values()):
        stats = protocol.ModelStats(inferences=10, errors={"non_finite": i}, latency_buckets=buckets)
        batch = protocol.TelemetryBatch(
            device_id=dev.device_id,
            batch_id="t",
            window_start=NOW,
            window_end=NOW,
            models={old["sha256"]: stats},
        )
        dev.publish("telemetry", protocol.encode_telemetry(batch))
    rows = wait_for(
        lambda: (
            (got := client.get("/api/v1/telemetry", params={"model": "det:1"}).json()["items"])
            and got[0]["inferences"] == 20
            and got
        )
    )
    (row,) = rows
    assert (row["model"], row["hardware_id"], row["devices"], row["errors"]) == ("det:1", "rpi4", 2, 1)
    assert row["latency_p95_us"] == protocol.LATENCY_BOUNDS_US[10]
    assert client.get("/api/v1/telemetry", params={"model": "nope:1"}).status_code == 404


def test_bad_rollout_requests_get_clear_errors(client: httpx.Client, keydir: KeyDir, tmp_path: Path) -> None:
    upload(client, make_bundle(tmp_path, keydir.key("release")))
    register(client, "bad-0")
    base = {"model": "det:1"}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"selector": {"agent_version": "not a spec"}}, "agent_version"),
        ({"stage_unit": "count", "stages": [1.5, 3]}, "whole numbers"),
        ({"stages": [10, 150]}, "(0, 100]"),
        ({"failure_action": "explode"}, "failure_action"),
        ({"retry_limits": {"timed_out": -1}}, "retry_limits"),
        ({"rate_per_minute": 0}, "rate_per_minute"),
        ({"unknown_field": 1}, "unknown_field"),
        # policy keys: a misspelt gate, a probation limit, the flat probation of older clients, a
        # retry limit for a failure class no device reports: each named, nothing created
        ({"max_eror_rate": 0.1}, "max_eror_rate"),
        ({"probation": {"seconds": 30, "max_eror_rate": 0.1}}, "probation.max_eror_rate"),
        ({"probation_seconds": 30}, "probation_seconds"),
        ({"retry_limits": {"download_faild": 2}}, "download_faild"),
    ]
    for extra, needle in bad:
        r = client.post("/api/v1/rollouts", json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["detail"]["code"] == "invalid_request" and needle in r.json()["detail"]["message"], (
            r.text
        )
    assert client.get("/api/v1/rollouts").json()["items"] == []  # nothing half-created
    assert client.post("/api/v1/rollouts/nope/approve").json()["detail"]["code"] == "rollout_not_found"


def test_openapi_schema_types_every_route_and_documents_errors(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert "ErrorOut" in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            ok = next(c for c in responses if c.startswith("2"))
            assert responses[ok].get("content") or path == "/healthz", (method, path)
            if path.startswith("/api/v1"):
                assert "400" in responses, (method, path)
                err = responses["400"]["content"]["application/json"]["schema"]["$ref"]
                assert err.endswith("/ErrorOut"), (method, path)
            if "{" in path and path.startswith("/api/v1/rollouts"):
                assert "404" in responses, (method, path)
    for action in ("pause", "resume", "abort", "approve", "rollback"):
        assert f"/api/v1/rollouts/{{rollout_id}}/{action}" in spec["paths"]


def test_server_restart_mid_rollout_resumes_exactly(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    srv = make_server()
    client = httpx.Client(base_url=srv.url, timeout=10)
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "rs", 4)
    rid = create(client, "rs", stages=[50, 100], min_inferences=1)
    first = directed(devs.values(), keydir, 2)  # stage 1 of [50, 100] over 4 devices
    srv.stop()  # SQLite: one process at a time; the next one picks up the same file
    srv2 = make_server()
    client2 = httpx.Client(base_url=srv2.url, timeout=10)
    assert client2.get("/api/v1/server").json()["leader"] is True
    for dev in first:
        serve(dev, directives(dev, keydir)[-1], inferences=2)
    rest = directed(devs.values(), keydir, 2, exclude=first)
    for dev in rest:
        serve(dev, directives(dev, keydir)[-1], inferences=2)
    wait_for(lambda: status(client2, rid)["state"] == "completed")
    assert all(len(directives(d, keydir)) == 1 for d in devs.values())
    client.close()
    client2.close()
