"""What users of hawkBit, Mender and AWS IoT Jobs complain about (DESIGN.md), shown absent, over MQTT.

docs/rollouts.md maps each complaint to the test that covers it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from device_agent import protocol
from signing.keyring import KeyDir

from .conftest import FakeDevice, register, wait_for
from .test_mqtt import reported
from .test_rollout_flow import directives, serve, status
from .test_rollout_ops import create, fleet_on_old_model


def test_hawkbit_3185_success_is_not_counted_before_the_device_serves_the_model(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    _, new, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "hb", 1)
    rid = create(client, "hb", stages=[100], probation={"seconds": 10})
    dev = devs["hb-0"]
    (d,) = wait_for(lambda: directives(dev, keydir))
    running = protocol.RunningModel(name="det", version="2", sha256=new["sha256"])
    # installed and swapped in, claims "serving", but has not answered one request with it
    dev.publish(
        "reported",
        reported(dev.device_id, running=running, deployment_seq=d.seq, deployment_state="serving"),
        retain=True,
    )
    wait_for(lambda: status(client, rid)["devices"]["hb-0"] == "installing")
    # answering requests but still on probation: not yet
    dev.publish(
        "reported",
        reported(
            dev.device_id,
            running=running,
            deployment_seq=d.seq,
            deployment_state="probation",
            served_ok={new["sha256"]: 5},
        ),
        retain=True,
    )
    time.sleep(0.5)  # several ticks (0.1 s): the state must stay
    assert status(client, rid)["devices"]["hb-0"] == "installing"
    assert status(client, rid)["state"] == "running"
    serve(dev, d, inferences=5)  # probation passed: serving with successful inferences
    wait_for(lambda: status(client, rid)["state"] == "completed")


def test_hawkbit_693_a_silent_device_times_out_instead_of_hanging(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "to", 2)
    rid = create(client, "to", stages=[100], device_timeout_seconds=0.5, max_failure_rate=0.5)
    first = devs["to-0"]
    serve(first, wait_for(lambda: directives(first, keydir))[-1], inferences=3)
    final = wait_for(lambda: (s := status(client, rid))["state"] == "completed" and s, timeout=10)
    assert final["devices"] == {"to-0": "done", "to-1": "timed_out"}
    assert "timed_out" in final["device_reasons"]["to-1"]


def test_retries_are_automatic_per_failure_class_with_backoff(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "rt", 1)
    rid = create(client, "rt", stages=[100], retry_limits={"download_failed": 1}, retry_backoff_seconds=0.2)
    dev = devs["rt-0"]
    (d,) = wait_for(lambda: directives(dev, keydir))
    failed = protocol.Event(
        device_id=dev.device_id, seq=d.seq, state=protocol.DeploymentState.FAILED, reason="download_failed"
    )
    dev.publish("events", protocol.encode(failed))
    again = wait_for(lambda: (got := directives(dev, keydir)) and len(got) == 2 and got)
    assert again[1].seq > d.seq and again[1].model == d.model  # re-sent by the server, nobody clicked
    serve(dev, again[1], inferences=3)
    final = wait_for(lambda: (s := status(client, rid))["state"] == "completed" and s)
    assert final["devices"] == {"rt-0": "done"}


def test_mender_a_device_joining_two_rollouts_goes_to_the_oldest(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    fleet_on_old_model(client, keydir, tmp_path, fake_device, "mo", 1)
    register(client, "mo-other", site="mo-b")
    older = create(client, "mo", stages=[100], device_timeout_seconds=600)
    newer = client.post(
        "/api/v1/rollouts",
        json={"model": "det:1", "selector": {"tags": {"zone": "z"}}, "device_timeout_seconds": 600},
    )
    assert newer.status_code == 400  # nobody has zone=z yet
    r = client.post(
        "/api/v1/rollouts",
        json={
            "model": "det:1",
            "selector": {"hardware_id": "rpi4"},
            "conflict": "skip",
            "device_timeout_seconds": 600,
        },
    )
    assert r.status_code == 201
    newer_id = r.json()["id"]
    register(client, "mo-late", site="mo")  # matches both selectors
    wait_for(lambda: "mo-late" in status(client, older)["devices"])
    assert "mo-late" not in status(client, newer_id)["devices"]
