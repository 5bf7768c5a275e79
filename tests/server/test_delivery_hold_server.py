"""A device that cannot fetch the release, through a real server and broker: retried by default,
then the rollout holds (gate ``delivery``) instead of rolling back, and a human approves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from device_agent import protocol
from signing.keyring import KeyDir

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
