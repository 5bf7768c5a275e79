"""The MQTT bridge against a real Mosquitto: signed directives out, device messages in."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

from device_agent import protocol
from fleet_server.runner import ServerThread
from signing.dsse import verify_envelope
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, stats, upload, wait_for

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def reported(device_id: str, **over: object) -> bytes:
    return protocol.encode(
        protocol.Reported(device_id=device_id, agent_version="0.1.0", hardware_id="rpi4", **over)  # type: ignore[arg-type]
    )


def telemetry(
    device_id: str, batch_id: str, sha: str, inferences: int, errors: int = 0, ts: datetime = NOW
) -> bytes:
    stats = protocol.ModelStats(inferences=inferences, errors={"non_finite": errors} if errors else {})
    batch = protocol.TelemetryBatch(
        device_id=device_id, batch_id=batch_id, window_start=ts, window_end=ts, models={sha: stats}
    )
    return protocol.encode_telemetry(batch)


def test_rollout_publishes_a_signed_retained_directive(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    model = upload(client, make_bundle(tmp_path, keydir.key("release"))).json()
    register(client, "dir-1")
    r = client.post("/api/v1/rollouts", json={"model": "det:1", "stages": [100], "soak_seconds": 0})
    assert r.status_code == 201
    wait_for(lambda: client.get("/api/v1/devices/dir-1").json()["desired_seq"] == 1)
    # a device subscribing afterwards still gets it: retained
    dev = fake_device("dir-1")
    dev.subscribe_desired()
    topic, raw, retained = wait_for(lambda: dev.received and dev.received[0])
    assert topic == "ef/v1/dir-1/desired" and retained
    payload = verify_envelope(raw, protocol.DIRECTIVE_PAYLOAD_TYPE, keydir.trust_root().fleet_keys)
    directive = protocol.decode_directive(payload)
    assert directive.device_id == "dir-1" and directive.seq == 1
    assert directive.rollout_id == r.json()["id"] and directive.expires_at > directive.issued_at
    assert directive.model is not None and directive.model.sha256 == model["sha256"]
    assert directive.model.length == model["length"]
    assert directive.model.model_url == f"{server.url}/api/v1/artifacts/{model['sha256']}"
    assert directive.model.envelope_url == directive.model.model_url + "/envelope"
    # the URLs work for the device
    got = client.get(directive.model.model_url, headers={"X-Edgefleet-Device": "dir-1"})
    assert got.status_code == 200 and len(got.content) == model["length"]
    status = client.get(f"/api/v1/rollouts/{r.json()['id']}").json()
    assert status["devices"] == {"dir-1": "notified"}


def test_device_messages_are_stored(
    server: ServerThread, client: httpx.Client, fake_device: Callable[[str], FakeDevice]
) -> None:
    register(client, "ing-1")
    dev = fake_device("ing-1")
    sha = "c" * 64
    dev.publish("status", protocol.encode(protocol.Status(device_id="ing-1", state="online")), retain=True)
    running = protocol.RunningModel(name="det", version="1", sha256=sha)
    dev.publish(
        "reported",
        reported("ing-1", running=running, deployment_seq=3, deployment_state="serving", served_ok={sha: 7}),
        retain=True,
    )
    dev.publish(
        "events",
        protocol.encode(protocol.Event(device_id="ing-1", seq=3, state=protocol.DeploymentState.SERVING)),
    )
    dev.publish("telemetry", telemetry("ing-1", "b1", sha, 10, 1))
    # each topic may be stored by another ingest worker: wait for every one the test reads
    wait_for(
        lambda: (
            (s := stats(client))["telemetry_batches"] >= 1
            and s["reported"] >= 1
            and s["events"] >= 1
            and s["status"] >= 1
        )
    )
    d = client.get("/api/v1/devices/ing-1").json()
    assert d["online"] is True and d["last_seen"] is not None
    assert d["running_model"] == {"name": "det", "version": "1", "sha256": sha}
    assert (d["deployment_state"], d["deployment_seq"], d["agent_version"]) == ("serving", 3, "0.1.0")
    s = stats(client)
    assert s["events"] == 1 and s["status"] >= 1 and s["malformed_messages"] == 0
    from sqlmodel import select

    from fleet_server.models import EventRow, ModelAggregate
    from fleet_server.store import new_session

    with new_session(server.context.engine) as session:
        agg = session.get(ModelAggregate, ("ing-1", sha))
        assert agg is not None and (agg.served_ok, agg.inferences, agg.errors) == (7, 10, 1)
        events = session.exec(select(EventRow).where(EventRow.device_id == "ing-1")).all()
        assert [(e.seq, e.state) for e in events] == [(3, "serving")]


def test_malformed_payloads_are_counted_and_ingest_goes_on(
    server: ServerThread, client: httpx.Client, fake_device: Callable[[str], FakeDevice]
) -> None:
    register(client, "bad-1")
    dev = fake_device("bad-1")
    garbage = {
        "reported": b"{not json",
        "events": json.dumps({"device_id": "bad-1", "seq": "x", "state": "nope"}).encode(),
        "telemetry": b"definitely not zlib",
        "status": json.dumps({"device_id": "someone-else", "state": "online"}).encode(),
    }
    for channel, payload in garbage.items():
        dev.publish(channel, payload)
    dev.publish("telemetry", zlib.compress(b"[1, 2, 3]"))  # zlib, but not a batch
    wait_for(lambda: stats(client)["malformed_messages"] >= 5)
    # still working: valid messages on every channel are processed afterwards
    dev.publish("reported", reported("bad-1", deployment_seq=2))
    dev.publish(
        "events",
        protocol.encode(protocol.Event(device_id="bad-1", seq=2, state=protocol.DeploymentState.DOWNLOADING)),
    )
    dev.publish("telemetry", telemetry("bad-1", "ok-1", "d" * 64, 3))
    wait_for(lambda: stats(client)["telemetry_batches"] == 1 and stats(client)["events"] == 1)
    assert client.get("/api/v1/devices/bad-1").json()["deployment_seq"] == 2
    assert stats(client)["malformed_messages"] == 5


def test_unregistered_device_is_counted_and_dropped(
    server: ServerThread, client: httpx.Client, fake_device: Callable[[str], FakeDevice]
) -> None:
    dev = fake_device("stranger-1")
    dev.publish("reported", reported("stranger-1"))
    dev.publish("telemetry", telemetry("stranger-1", "b1", "e" * 64, 3))
    wait_for(lambda: stats(client)["unregistered_messages"] >= 2)
    assert client.get("/api/v1/devices/stranger-1").status_code == 404
    assert stats(client)["telemetry_batches"] == 0


def test_duplicate_telemetry_batch_counts_once(
    server: ServerThread, client: httpx.Client, fake_device: Callable[[str], FakeDevice]
) -> None:
    register(client, "dup-1")
    dev = fake_device("dup-1")
    sha = "f" * 64
    for _ in range(3):
        dev.publish("telemetry", telemetry("dup-1", "same-batch", sha, 4))
    dev.publish("telemetry", telemetry("dup-1", "next-batch", sha, 1))
    wait_for(lambda: stats(client)["telemetry_batches"] + stats(client)["duplicate_batches"] >= 4)
    s = stats(client)
    assert (s["telemetry_batches"], s["duplicate_batches"]) == (2, 2)
    from fleet_server.models import ModelAggregate
    from fleet_server.store import new_session

    with new_session(server.context.engine) as session:
        agg = session.get(ModelAggregate, ("dup-1", sha))
        assert agg is not None and agg.inferences == 5
