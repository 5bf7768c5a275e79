"""Rollouts end to end over real MQTT, with paho clients playing the devices."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from device_agent import protocol
from fleet_server.runner import ServerThread
from signing.dsse import verify_envelope
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_mqtt import NOW, reported, telemetry


def directives(dev: FakeDevice, keydir: KeyDir) -> list[protocol.Directive]:
    fleet_keys = keydir.trust_root().fleet_keys
    return [
        protocol.decode_directive(verify_envelope(raw, protocol.DIRECTIVE_PAYLOAD_TYPE, fleet_keys))
        for _, raw, _ in list(dev.received)
        if raw
    ]


def directed(
    devs: Iterable[FakeDevice],
    keydir: KeyDir,
    count: int,
    timeout: float = 10.0,
    exclude: Collection[FakeDevice] = (),
) -> list[FakeDevice]:
    """Wait until ``count`` of ``devs`` (not in ``exclude``) hold a directive; return exactly those.

    A stage's directives are published one after another and each device's paho thread receives
    its own: the first one in does not mean the whole stage is in (under load the others came tens
    of ms later), and a test that served only the devices seen so far left the stage unfinished.
    """
    pool = [d for d in devs if d not in exclude]

    def enough() -> list[FakeDevice] | None:
        got = [d for d in pool if directives(d, keydir)]
        return got if len(got) >= count else None

    got: list[FakeDevice] = wait_for(enough, timeout)
    assert len(got) == count, f"expected {count} devices directed, got {[d.device_id for d in got]}"
    return got


def serve(
    dev: FakeDevice, d: protocol.Directive, inferences: int, errors: int = 0, ts: datetime | None = None
) -> None:
    """Act as an agent that installed the directive's model and served with it.

    ``ts``: the device's clock for its messages (default: now in reported, the fixed NOW in telemetry).
    """
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
            ts=ts or datetime.now(UTC),
        ),
        retain=True,
    )
    batch = telemetry(dev.device_id, f"b{d.seq}", d.model.sha256, inferences, errors, ts or NOW)
    dev.publish("telemetry", batch)


def status(client: httpx.Client, rid: str) -> dict[str, Any]:
    return dict(client.get(f"/api/v1/rollouts/{rid}").json())


def test_staged_rollout_completes_on_mqtt_3_1_1_without_shared_subscriptions(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    server = make_server(mqtt_version=4, shared_subscriptions=False)
    client = httpx.Client(base_url=server.url, timeout=10)
    upload(client, make_bundle(tmp_path, keydir.key("release"), version="2"))
    devs = {}
    for i in range(4):
        register(client, f"ok-{i}")
        devs[f"ok-{i}"] = fake_device(f"ok-{i}")
        devs[f"ok-{i}"].subscribe_desired()
    rid = client.post(
        "/api/v1/rollouts",
        json={"model": "det:2", "stages": [25, 100], "soak_seconds": 0.3, "min_inferences": 5},
    ).json()["id"]
    served: set[str] = set()

    def step() -> bool:
        for dev in devs.values():
            got = directives(dev, keydir)
            if got and dev.device_id not in served:
                serve(dev, got[-1], inferences=5)
                served.add(dev.device_id)
        return status(client, rid)["state"] == "completed"

    wait_for(step, timeout=15, interval=0.1)
    final = status(client, rid)
    assert set(final["devices"].values()) == {"done"}
    assert [s["state"] for s in final["stages"]] == ["done", "done"]
    assert [(s["target_count"], s["assigned"], s["done"]) for s in final["stages"]] == [(1, 1, 1), (4, 4, 4)]
    actions = [d["action"] for d in final["decisions"]]
    assert actions[0] == "created" and actions[-1] == "completed"
    assert "next_stage" in actions and "stage_finished" in actions
    assert all(len(directives(d, keydir)) == 1 for d in devs.values())
    client.close()


def test_error_rate_gate_rolls_back_to_the_previous_model(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    old = upload(
        client, make_bundle(tmp_path, keydir.key("release"), version="1", content=b"old" * 50)
    ).json()
    new = upload(
        client, make_bundle(tmp_path, keydir.key("release"), version="2", content=b"new" * 50)
    ).json()
    devs = {}
    for i in range(4):
        register(client, f"rb-{i}")
        dev = devs[f"rb-{i}"] = fake_device(f"rb-{i}")
        running = protocol.RunningModel(name="det", version="1", sha256=old["sha256"])
        dev.publish(
            "reported", reported(dev.device_id, running=running, served_ok={old["sha256"]: 100}), retain=True
        )
        dev.subscribe_desired()
    wait_for(lambda: all(client.get(f"/api/v1/devices/{i}").json()["running_model"] for i in devs))
    rid = client.post(
        "/api/v1/rollouts",
        json={
            "model": "det:2",
            "stages": [50, 100],
            "soak_seconds": 30,
            "min_inferences": 20,
            "max_error_rate": 0.1,
        },
    ).json()["id"]
    notified = directed(devs.values(), keydir, 2)
    # the first device serves cleanly but below the minimum sample: no decision yet
    serve(notified[0], directives(notified[0], keydir)[-1], inferences=10)
    wait_for(lambda: status(client, rid)["devices"][notified[0].device_id] == "done")
    assert status(client, rid)["state"] == "running"
    # the second one errs: 10 errors out of 20 inferences in total -> roll back
    serve(notified[1], directives(notified[1], keydir)[-1], inferences=10, errors=10)
    final = wait_for(lambda: (s := status(client, rid))["state"] == "rolled_back" and s)
    decision = final["decisions"][-1]
    assert decision["action"] == "roll_back"
    assert (decision["figures"]["inferences"], decision["figures"]["errors"]) == (20, 10)
    assert sorted(d for d, st in final["devices"].items() if st == "rolled_back") == sorted(
        d.device_id for d in notified
    )
    for dev in notified:

        def two(dev: FakeDevice = dev) -> list[protocol.Directive] | None:
            got = directives(dev, keydir)
            return got if len(got) == 2 else None

        first, back = wait_for(two)
        assert first.model is not None and first.model.sha256 == new["sha256"]
        assert back.seq > first.seq and back.model is not None and back.model.sha256 == old["sha256"]
    for dev in devs.values():
        if dev not in notified:
            assert directives(dev, keydir) == []  # never received the new model
            assert final["devices"][dev.device_id] == "pending"
