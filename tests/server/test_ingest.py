"""Ingest: acknowledged after commit, redelivered after a crash, keepalive kept under load, and device
clocks recorded but never trusted."""

from __future__ import annotations

import collections
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

from device_agent import protocol
from edgefleet.broker import BrokerInfo, server_mqtt_settings
from fleet_server import ingest_worker
from fleet_server.counters import Counters
from fleet_server.ingest import Inbound, ingest_batch
from fleet_server.ingest_worker import Pipeline
from fleet_server.models import Device, ModelAggregate, TelemetryBatchRow
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine, new_session
from signing.keyring import KeyDir
from tests.mqtt_clients import device_address, device_client, server_address, server_client

from .conftest import FakeDevice, make_bundle, register, stats, upload, wait_for
from .test_mqtt import reported, telemetry
from .test_rollout_flow import directives, serve, status

pytestmark = pytest.mark.ingest_workers  # the ingest workers: crash, backlog and keepalive behaviour

SHA = "cd" * 32


def test_a_flush_is_acknowledged_only_after_its_commit_and_retried_on_a_transient_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(ServerSettings(data_dir=tmp_path))
    with new_session(engine) as session:
        session.add(Device(id="ack-1", hardware_id="rpi4"))
        session.commit()
    acks: list[int] = []
    calls: list[list[int]] = []
    real = ingest_worker.ingest_batch

    def flaky(engine_: object, batch: list[Inbound], counters: Counters) -> None:
        calls.append([m.mid for m in batch])
        assert acks == [], "acknowledged before the commit"
        if len(calls) == 1:
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        real(engine, batch, counters)

    monkeypatch.setattr(ingest_worker, "ingest_batch", flaky)
    counters = Counters()
    pipeline = Pipeline(engine, counters, lambda mid, _qos: acks.append(mid))
    topic = protocol.topic("ack-1", protocol.Channel.TELEMETRY)
    for mid in (1, 2, 3):
        pipeline.put(Inbound(topic, telemetry("ack-1", f"a{mid}", SHA, 2), time.time(), False, mid, 1))
    pipeline.start()
    wait_for(lambda: acks == [1, 2, 3], timeout=10)
    pipeline.stop()
    assert calls == [[1, 2, 3], [1, 2, 3]]  # the same flush again, after a backoff
    assert counters.telemetry_batches == 3
    with new_session(engine) as session:
        agg = session.get(ModelAggregate, ("ack-1", SHA))
        assert agg is not None and agg.inferences == 6
    engine.dispose()


def test_batches_delivered_to_a_worker_that_dies_before_committing_are_redelivered(
    make_server: Callable[..., ServerThread], fake_device: Callable[[str], FakeDevice]
) -> None:
    """Persistent session (stable client id): the broker holds what it delivered until the PUBACK,
    which is sent after the commit; the server restarts its dead worker, which gets them again."""
    server = make_server(mqtt_client_id=f"ef-crash-{uuid.uuid4().hex[:8]}", shared_subscriptions=False)
    assert server.context.bridge is not None
    worker = server.context.bridge.telemetry_workers[0]
    assert worker.pid is not None and worker.pid != os.getpid()  # ingest runs in its own process
    api = httpx.Client(base_url=server.url, timeout=10)
    register(api, "crash-1")
    dev = fake_device("crash-1")
    os.kill(worker.pid, signal.SIGSTOP)  # receives nothing, acknowledges nothing
    try:
        for i in range(5):
            dev.publish("telemetry", telemetry("crash-1", f"c{i}", SHA, 1))
        time.sleep(0.3)  # the broker has written them to the stopped worker's socket
    finally:
        os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: stats(api)["telemetry_batches"] == 5, timeout=20)
    assert stats(api)["duplicate_batches"] == 0
    with new_session(server.context.engine) as session:
        agg = session.get(ModelAggregate, ("crash-1", SHA))
        assert agg is not None and agg.inferences == 5
    api.close()


def test_keepalive_holds_while_a_burst_of_telemetry_is_ingested(
    make_server: Callable[..., ServerThread], broker_info: BrokerInfo
) -> None:
    """A 2 s keepalive: a network thread starved (or a PINGRESP stuck behind deliveries) for that
    long disconnects, and is counted in ``mqtt_disconnects``."""
    server = make_server(mqtt_keepalive=2)
    api = httpx.Client(base_url=server.url, timeout=10)
    devices = [f"burst-{i}" for i in range(10)]
    for d in devices:
        register(api, d)
    n = 3000
    payloads = [
        (
            protocol.topic(devices[k % 10], protocol.Channel.TELEMETRY),
            telemetry(devices[k % 10], f"k{k}", SHA, 1),
        )
        for k in range(n)
    ]
    pubs = {d: device_client(broker_info, d) for d in devices}  # each device speaks for itself
    for pub in pubs.values():
        pub.connect(*device_address(broker_info))
        pub.loop_start()
    inflight: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
    for topic, payload in payloads:
        inflight.append(pubs[protocol.parse_topic(topic)[0]].publish(topic, payload, qos=1))
        if len(inflight) >= 200:
            inflight.popleft().wait_for_publish(10)
    while inflight:
        inflight.popleft().wait_for_publish(10)
    for pub in pubs.values():
        pub.disconnect()
        pub.loop_stop()
    wait_for(lambda: stats(api)["telemetry_batches"] == n, timeout=60)
    time.sleep(2.5)  # idle afterwards: keepalive pings on both clients
    s = stats(api)
    assert s["mqtt_disconnects"] == 0 and s["duplicate_batches"] == 0
    assert server.context.bridge is not None and server.context.bridge.connected
    assert api.get("/api/v1/server").json()["mqtt_connected"] is True
    api.close()


def test_device_clock_offset_is_recorded_and_never_used_for_time(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    ahead, behind = fake_device("skew-ahead"), fake_device("skew-behind")
    server = make_server()
    api = httpx.Client(base_url=server.url, timeout=10)
    register(api, "skew-ahead")
    register(api, "skew-behind")
    model = upload(api, make_bundle(tmp_path, keydir.key("release"), name="skew")).json()
    skew = {"skew-ahead": timedelta(hours=5), "skew-behind": -timedelta(days=2)}
    for dev in (ahead, behind):
        dev.subscribe_desired()
        ts = datetime.now(UTC) + skew[dev.device_id]
        dev.publish(
            "status", protocol.encode(protocol.Status(device_id=dev.device_id, state="online", ts=ts))
        )
    for dev in (ahead, behind):
        d = wait_for(lambda dev=dev: api.get(f"/api/v1/devices/{dev.device_id}").json()["clock_offset_at"])
        assert d
    out = {d: api.get(f"/api/v1/devices/{d}").json() for d in skew}
    for d, delta in skew.items():
        assert abs(out[d]["clock_offset_seconds"] - delta.total_seconds()) < 5
        last_seen = datetime.fromisoformat(out[d]["last_seen"])
        assert abs((last_seen - datetime.now(UTC)).total_seconds()) < 30  # the server's clock
    schema = api.get("/openapi.json").json()["components"]["schemas"]["DeviceOut"]["properties"]
    assert {"type": "number"} in schema["clock_offset_seconds"]["anyOf"]

    # A rollout with a short device timeout: skewed device timestamps on every message (reported,
    # events, telemetry windows) neither time a device out nor finish it early.
    rid = api.post(
        "/api/v1/rollouts",
        json={"model": "skew:1", "stages": [100], "soak_seconds": 1, "device_timeout_seconds": 20},
    ).json()["id"]
    for dev in (ahead, behind):
        d = wait_for(lambda dev=dev: directives(dev, keydir))[-1]
        assert d.model is not None
        ts = datetime.now(UTC) + skew[dev.device_id]
        event = protocol.Event(
            device_id=dev.device_id, seq=d.seq, state=protocol.DeploymentState.SERVING, ts=ts
        )
        dev.publish("events", protocol.encode(event))
        serve(dev, d, 5, ts=ts)
    wait_for(lambda: status(api, rid)["state"] == "completed", timeout=20)
    assert status(api, rid)["devices"] == {"skew-ahead": "done", "skew-behind": "done"}
    assert model["sha256"] == api.get("/api/v1/devices/skew-ahead").json()["running_model"]["sha256"]
    api.close()


def test_clock_offset_comes_from_live_messages_only(tmp_path: Path) -> None:
    """A retained snapshot (delivered on subscribing) may be days old, and a will message carries
    its connect time: neither gives an offset."""
    engine = make_engine(ServerSettings(data_dir=tmp_path))
    with new_session(engine) as session:
        session.add(Device(id="off-1", hardware_id="rpi4"))
        session.commit()
    counters = Counters()
    now = datetime.now(UTC)
    topic = protocol.topic("off-1", protocol.Channel.REPORTED)
    old = reported("off-1", ts=now - timedelta(days=3))
    ingest_batch(engine, [Inbound(topic, old, time.time(), retain=True)], counters)
    will = protocol.encode(protocol.Status(device_id="off-1", state="offline", ts=now - timedelta(days=3)))
    ingest_batch(
        engine, [Inbound(protocol.topic("off-1", protocol.Channel.STATUS), will, time.time())], counters
    )
    with new_session(engine) as session:
        device = session.get(Device, "off-1")
        assert device is not None and device.clock_offset_seconds is None and device.online is False
    live = reported("off-1", ts=now + timedelta(seconds=90))
    ingest_batch(engine, [Inbound(topic, live, now.timestamp())], counters)
    with new_session(engine) as session:
        device = session.get(Device, "off-1")
        assert device is not None and device.clock_offset_seconds == pytest.approx(90, abs=0.01)
        assert device.clock_offset_at is not None
        assert abs((device.clock_offset_at - now).total_seconds()) < 0.001
    engine.dispose()


def test_a_worker_whose_server_died_hands_its_share_of_the_stream_over_without_losses(
    tmp_path: Path, broker_info: BrokerInfo
) -> None:
    """A replica is killed (test_leader.py): its ingest workers see their pipe close and stop, still
    members of the ``$share`` group until they disconnect. What the broker gave them meanwhile was
    queued behind the store thread's stop and never stored, and, unacknowledged in a clean session,
    dropped with it: telemetry lost under load. They leave the group first now: every message is
    stored by the orphan or delivered to the surviving member, none lost."""
    if not broker_info.shared_subscriptions:
        pytest.skip("the broker has no shared subscriptions")
    settings = ServerSettings(data_dir=tmp_path, **server_mqtt_settings(broker_info))
    engine = make_engine(settings)
    devices = [f"orphan-{i}" for i in range(4)]
    with new_session(engine) as session:
        session.add_all(Device(id=d, hardware_id="rpi4") for d in devices)
        session.commit()
    worker = ingest_worker.IngestWorker(
        settings, f"ef-orphan-{uuid.uuid4().hex[:8]}", Counters(), lambda: None, (protocol.Channel.TELEMETRY,)
    )
    worker.start()
    survivor_got: set[str] = set()
    # the other member of the $share group: another replica, so the server's identity
    survivor = server_client(broker_info, f"fleet-server-survivor-{uuid.uuid4().hex[:8]}")
    survivor.on_message = lambda _c, _u, m: survivor_got.add(
        protocol.decode_telemetry(bytes(m.payload), protocol.parse_topic(m.topic)[0]).batch_id
    )
    survivor.connect(*server_address(broker_info))
    survivor.loop_start()
    pubs = {d: device_client(broker_info, d) for d in devices}  # each device speaks for itself
    for pub in pubs.values():
        pub.connect(*device_address(broker_info))
        pub.loop_start()
    try:
        wait_for(lambda: worker.subscribed, timeout=20)
        survivor.subscribe(protocol.shared_subscription(protocol.Channel.TELEMETRY), qos=1)
        published: list[str] = []

        def send(count: int) -> None:
            for _ in range(count):
                k = len(published)
                dev = devices[k % len(devices)]
                pubs[dev].publish(
                    protocol.topic(dev, protocol.Channel.TELEMETRY), telemetry(dev, f"o{k}", SHA, 1), qos=1
                ).wait_for_publish(5)
                published.append(f"o{k}")
                time.sleep(0.002)

        send(100)  # both members take their share
        assert survivor_got and worker.pid is not None
        # The server dies: the worker's pipe closes (no stop message); it must not be restarted here.
        worker._stopping = True
        assert worker._conn is not None
        socket.socket(fileno=os.dup(worker._conn.fileno())).shutdown(socket.SHUT_RDWR)
        send(200)  # while the orphan stops
        worker._proc.join(20)
        assert worker._proc.exitcode == 0  # the orphan stored what it took before it exited
        deadline = time.monotonic() + 5  # the survivor's last deliveries
        while len(survivor_got) < len(set(published) - stored_batch_ids(engine, devices)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for c in (*pubs.values(), survivor):
            c.disconnect()
            c.loop_stop()
    stored = stored_batch_ids(engine, devices)
    assert stored.isdisjoint(survivor_got)
    lost = set(published) - stored - survivor_got
    assert not lost, f"{len(lost)} of {len(published)} batches lost: {sorted(lost, key=lambda b: int(b[1:]))}"
    engine.dispose()


def stored_batch_ids(engine: Engine, devices: list[str]) -> set[str]:
    with new_session(engine) as session:
        rows = session.exec(
            select(TelemetryBatchRow.batch_id).where(col(TelemetryBatchRow.device_id).in_(devices))
        )
        return set(rows.all())


def test_a_server_stops_cleanly_after_its_workers_were_killed_with_the_process_group(
    make_server: Callable[..., ServerThread],
) -> None:
    """SIGTERM to the server's process group (a service manager, Ctrl-C in a script) ends the ingest
    workers first; the watcher releases their handles, and the server's own stop must not trip
    over a handle that is closed already."""
    server = make_server(shared_subscriptions=False)
    assert server.context.bridge is not None
    worker = server.context.bridge.telemetry_workers[0]
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGTERM)
    wait_for(lambda: ingest_worker._closed(worker._proc), timeout=10)  # the watcher saw it die
    worker.stop()  # raised "process object is closed" before
    worker.stop()  # and a second stop is harmless too
