"""The server keeps devices honest: the decision (``fleet_server.reconcile``), then the real server
on the real broker with paho devices (republish on drift, rate-limited; a deleted retained
directive restored; drift counted in stats and per device)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from device_agent import protocol
from edgefleet.broker import BrokerInfo
from edgefleet.cli import app
from fleet_server import reconcile
from fleet_server.reconcile import Directive, Drift, Policy, Reported
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.mqtt_clients import publish_as_server

from .conftest import FakeDevice, make_bundle, register, stats, upload, wait_for
from .test_mqtt import reported
from .test_rollout_flow import directives

NOW = datetime(2026, 3, 1, tzinfo=UTC)
SHA_A, SHA_B = "a" * 64, "b" * 64
POLICY = Policy(grace=10.0, interval=30.0)


def directive(seq: int = 5, sha: str | None = SHA_A, seen_at: float = 0.0, **kw: object) -> Directive:
    values: dict[str, object] = {
        "seq": seq, "model_sha256": sha, "shadow": False, "expires_at": NOW + timedelta(days=1),
        "not_before": None, "seen_at": seen_at,
    }  # fmt: skip
    values.update(kw)
    return Directive(**values)  # type: ignore[arg-type]


def rep(seq: int, state: str = "serving", sha: str | None = SHA_A, rejected: int | None = None) -> Reported:
    return Reported(seq=seq, state=state, running_sha256=sha, rejected_seq=rejected)


def decide(
    desired: int, d: Directive | None, r: Reported, last: float | None = None, now: float = 100.0
) -> reconcile.Verdict:
    return reconcile.decide(desired, d, r, last, now, NOW, POLICY)


# ---------------------------------------------------------------- the decision


def test_in_sync_devices_are_left_alone() -> None:
    assert decide(5, directive(), rep(5)).drift is Drift.NONE
    assert decide(0, None, rep(0, "idle", None)).drift is Drift.NONE  # never directed
    # failed at the desired seq: the rollout engine's business, not drift
    assert decide(5, directive(), rep(5, "failed", SHA_B)).drift is Drift.NONE
    # a shadow directive keeps the served model: another sha is expected
    assert decide(5, directive(shadow=True), rep(5, "shadowing", SHA_B)).drift is Drift.NONE
    # "keep what you run"
    assert decide(5, directive(sha=None), rep(5, "serving", SHA_B)).drift is Drift.NONE


def test_a_device_behind_gets_its_directive_after_the_grace_and_then_rate_limited() -> None:
    d = directive(seen_at=95.0)
    assert decide(5, d, rep(3), now=100.0) == reconcile.Verdict(
        Drift.BEHIND, retry_at=105.0, why="within grace or rate limit"
    )
    v = decide(5, d, rep(3), now=106.0)
    assert (v.drift, v.republish) == (Drift.BEHIND, True)
    later = decide(5, d, rep(3), last=106.0, now=120.0)
    assert (later.republish, later.retry_at) == (False, 136.0)
    assert decide(5, d, rep(3), last=106.0, now=136.5).republish


def test_the_wrong_model_at_the_desired_seq_is_drift() -> None:
    v = decide(5, directive(), rep(5, "serving", SHA_B))
    assert (v.drift, v.republish) == (Drift.MODEL, True)
    assert decide(5, directive(), rep(5, "idle", None)).drift is Drift.MODEL


def test_what_cannot_be_fixed_by_republishing_is_counted_not_sent() -> None:
    ahead = decide(5, directive(), rep(7))
    assert (ahead.drift, ahead.republish, ahead.retry_at) == (Drift.AHEAD, False, None)
    unknown = decide(6, directive(seq=5), rep(3))  # the database published 6; this replica holds 5
    assert (unknown.drift, unknown.republish) == (Drift.BEHIND, False)
    assert not decide(5, None, rep(3)).republish
    refused = decide(5, directive(), rep(3, rejected=5))  # the device refused seq 5 itself
    assert (refused.drift, refused.republish) == (Drift.BEHIND, False)
    expired = decide(5, directive(expires_at=NOW - timedelta(seconds=1)), rep(3))
    assert (expired.republish, expired.retry_at) == (False, None)


def test_a_maintenance_window_is_waited_for() -> None:
    window = directive(not_before=NOW + timedelta(seconds=60))
    v = decide(5, window, rep(3))
    assert (v.republish, v.retry_at) == (False, 100.0 + 60 + POLICY.grace)


def test_a_deleted_directive_is_restored_at_once_but_rate_limited() -> None:
    held = directive(seen_at=99.0)
    v = reconcile.restore(held, None, 100.0, NOW, POLICY)
    assert (v.drift, v.republish) == (Drift.MISSING, True)
    again = reconcile.restore(held, 100.0, 101.0, NOW, POLICY)
    assert (again.republish, again.retry_at) == (False, 130.0)
    assert reconcile.restore(None, None, 100.0, NOW, POLICY).drift is Drift.NONE  # nothing held


# ---------------------------------------------------------------- the server, on the real broker


def _directed_device(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    device_id: str,
    interval: float = 1.5,
) -> tuple[ServerThread, httpx.Client, FakeDevice, protocol.Directive]:
    server = make_server(reconcile_grace_seconds=0.5, reconcile_interval_seconds=interval)
    client = httpx.Client(base_url=server.url, timeout=10)
    upload(client, make_bundle(tmp_path, keydir.key("release")))
    register(client, device_id)
    dev = fake_device(device_id)
    dev.subscribe_desired()
    client.post("/api/v1/rollouts", json={"model": "det:1", "stages": [100], "min_inferences": 1})
    got = wait_for(lambda: directives(dev, keydir), 10)
    wait_for(lambda: server.context.ticker is not None and server.context.ticker.is_leader, 10)
    return server, client, dev, got[-1]


def test_a_device_reporting_an_older_seq_gets_its_directive_again(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    # the rate limit is a window of wall time: 4 s leaves the burst below room on a loaded machine
    _, client, dev, d = _directed_device(make_server, keydir, tmp_path, fake_device, "drift-1", 4.0)
    assert d.seq == 1
    received = len(directives(dev, keydir))
    # a device that lost its state (wiped, replaced) and did not pick the directive up: it reports seq 0
    time.sleep(0.6)  # past the grace
    dev.publish("reported", reported("drift-1", deployment_seq=0, deployment_state="idle"), retain=True)
    wait_for(lambda: len(directives(dev, keydir)) > received, 10)
    again = directives(dev, keydir)[-1]
    assert (again.seq, again.model) == (d.seq, d.model)  # the same directive: same seq, same model
    s = stats(client)
    assert s["directives_republished"] == 1 and s["drift_detected"] == 1
    # rate-limited: a burst of reports gets no burst of directives
    count = len(directives(dev, keydir))
    for _ in range(5):
        dev.publish("reported", reported("drift-1", deployment_seq=0, deployment_state="idle"), retain=True)
    time.sleep(0.5)
    assert len(directives(dev, keydir)) == count
    # ... but a device still behind after the interval gets it once more (the timer looks again)
    wait_for(lambda: len(directives(dev, keydir)) == count + 1, 10)
    drift = client.get("/api/v1/drift").json()["items"]
    assert [(r["device_id"], r["drift"], r["episodes"], r["republished"]) for r in drift] == [
        ("drift-1", "seq_behind", 1, 2)
    ]
    shown = CliRunner().invoke(
        app, ["devices", "drift", "--server", str(client.base_url), "--drifting", "--json"]
    )
    assert shown.exit_code == 0 and [r["device_id"] for r in json.loads(shown.output)] == ["drift-1"]
    # it catches up: in sync again, no more directives
    running = protocol.RunningModel(name="det", version="1", sha256=d.model.sha256 if d.model else "")
    caught_up = reported("drift-1", running=running, deployment_seq=1, deployment_state="serving")
    dev.publish("reported", caught_up, retain=True)
    wait_for(lambda: client.get("/api/v1/drift?drifting=true").json()["items"] == [], 10)
    settled = len(directives(dev, keydir))
    time.sleep(2.0)
    assert len(directives(dev, keydir)) == settled
    assert stats(client)["drift_detected"] == 1


def test_the_wrong_model_at_the_desired_seq_gets_the_directive_again(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, client, dev, d = _directed_device(make_server, keydir, tmp_path, fake_device, "drift-2")
    received = len(directives(dev, keydir))
    time.sleep(0.6)
    other = protocol.RunningModel(name="old", version="0", sha256="f" * 64)
    wrong = reported("drift-2", running=other, deployment_seq=d.seq, deployment_state="serving")
    dev.publish("reported", wrong, retain=True)
    wait_for(lambda: len(directives(dev, keydir)) > received, 10)
    assert client.get("/api/v1/drift").json()["items"][0]["drift"] == "model_mismatch"


def test_a_deleted_retained_directive_is_restored(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    broker_info: BrokerInfo,
) -> None:
    server, client, dev, _ = _directed_device(make_server, keydir, tmp_path, fake_device, "drift-3")
    bridge = server.context.bridge
    assert bridge is not None
    held = bridge.reconciler.directive("drift-3")
    assert held is not None
    # someone with write access to desired (an operator's script, another tool) clears it
    publish_as_server(broker_info, "ef/v1/drift-3/desired", b"")
    wait_for(lambda: stats(client)["directives_restored"] == 1, 10)
    # the broker holds it again: a device (re)subscribing now gets the very same directive
    dev.received.clear()
    dev.client.unsubscribe("ef/v1/drift-3/desired")
    dev.subscribe_desired()
    wait_for(lambda: [raw for _, raw, retained in dev.received if retained], 10)
    assert [raw for _, raw, retained in dev.received if retained] == [held]
    assert client.get("/api/v1/drift?drifting=true").json()["items"] == []  # the restore settled it
    row = client.get("/api/v1/drift").json()["items"][0]
    assert (row["device_id"], row["restored"], row["episodes"]) == ("drift-3", 1, 1)


def test_only_the_leader_republishes(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    server, client, dev, _ = _directed_device(make_server, keydir, tmp_path, fake_device, "drift-4")
    bridge = server.context.bridge
    assert bridge is not None
    bridge.reconciler.is_leader = lambda: False  # as on a replica that does not drive the engine
    received = len(directives(dev, keydir))
    time.sleep(0.6)
    dev.publish("reported", reported("drift-4", deployment_seq=0, deployment_state="idle"), retain=True)
    wait_for(lambda: stats(client)["drift_detected"] == 1, 10)  # it sees the drift ...
    time.sleep(1.0)
    assert len(directives(dev, keydir)) == received  # ... and leaves the republishing to the leader
    assert stats(client)["directives_republished"] == 0


@pytest.mark.parametrize(
    "payload", [b"not json", b'{"payload": "!!"}', b"[" * 100_000], ids=["text", "bad-base64", "deep"]
)
def test_garbage_on_a_desired_topic_is_never_restored(
    payload: bytes,
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    broker_info: BrokerInfo,
) -> None:
    """What the server holds comes from its own publishes or the fleet key's signature."""
    server, _, _, _ = _directed_device(make_server, keydir, tmp_path, fake_device, "drift-5")
    bridge = server.context.bridge
    assert bridge is not None
    held = bridge.reconciler.directive("drift-5")
    publish_as_server(broker_info, "ef/v1/drift-5/desired", payload)
    time.sleep(0.5)
    assert bridge.reconciler.directive("drift-5") == held
    assert bridge.connected  # paho's network thread survived it
