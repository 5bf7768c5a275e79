"""A device that cannot fetch the release, through a real server and broker: retried by default,
then the rollout holds (gate ``delivery``) instead of rolling back, and a human approves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_agent import protocol
from fleet_server.runner import ServerThread
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
    make_server: Callable[..., ServerThread],
    database_url: str | None,
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
