"""Events are not held up by a telemetry backlog: they reach the server through a broker queue of
their own.

Mosquitto queues a client's deliveries in one FIFO whatever the subscription, so events taken by
a client that also takes telemetry wait behind every telemetry batch queued for it; the engine,
which moves devices on from their events, then saw working devices minutes late and timed them
out. Here the telemetry consumers are stopped outright (SIGSTOP) with a backlog queued for them at
the broker: an event published after it must be stored at once, and the lag of each stream shows.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlmodel import col, select

from device_agent import protocol
from edgefleet.broker import BrokerInfo
from fleet_server.models import EventRow
from fleet_server.mqtt_client import release
from fleet_server.mqtt_identity import events_client_id, server_client_id, worker_client_id
from fleet_server.runner import ServerThread
from fleet_server.store import new_session
from tests.mqtt_clients import server_address, server_client

from .conftest import FakeDevice, register, stats, wait_for
from .test_mqtt import telemetry

pytestmark = pytest.mark.ingest_workers  # telemetry and events in workers of their own

SHA = "cd" * 32
BACKLOG = 300


def event(device_id: str, seq: int, state: protocol.DeploymentState) -> bytes:
    return protocol.encode(protocol.Event(device_id=device_id, seq=seq, state=state))


def stream_lag(api: httpx.Client, stream: str) -> float:
    found = re.search(
        rf'^edgefleet_ingest_stream_lag_seconds\{{stream="{stream}"\}} (\S+)$', api.get("/metrics").text, re.M
    )
    assert found, f"no edgefleet_ingest_stream_lag_seconds for {stream} in /metrics"
    return float(found.group(1))


def test_an_event_is_stored_at_once_behind_a_telemetry_backlog(
    make_server: Callable[..., ServerThread], fake_device: Callable[[str], FakeDevice]
) -> None:
    srv = make_server()  # the defaults: shared subscriptions, two ingest workers for telemetry
    bridge = srv.context.bridge
    assert bridge is not None
    with httpx.Client(base_url=srv.url, timeout=10) as api:
        register(api, "streams-1")
        dev = fake_device("streams-1")
        dev.publish("telemetry", telemetry("streams-1", "t0", SHA, 1))
        dev.publish("events", event("streams-1", 1, protocol.DeploymentState.DOWNLOADING))
        wait_for(lambda: (s := stats(api))["telemetry_batches"] == 1 and s["events"] == 1, timeout=15)
        # every consumer of telemetry stops: what the fleet sends queues at the broker for them
        stopped = [w.pid for w in bridge.workers if protocol.Channel.TELEMETRY in w.channels]
        assert stopped and all(stopped)
        for pid in stopped:
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(1, BACKLOG + 1):
                dev.publish("telemetry", telemetry("streams-1", f"t{i}", SHA, 1))
            sent = time.monotonic()
            dev.publish("events", event("streams-1", 1, protocol.DeploymentState.SERVING))
            wait_for(lambda: stats(api)["events"] == 2, timeout=10)
            took = time.monotonic() - sent
            assert stats(api)["telemetry_batches"] == 1  # the backlog is still there, untouched
            with new_session(srv.context.engine) as session:
                stored = session.exec(
                    select(EventRow.state)
                    .where(col(EventRow.device_id) == "streams-1")
                    .order_by(col(EventRow.id))
                ).all()
            assert list(stored) == ["downloading", "serving"]
            assert took < 5.0, f"the event took {took:.1f}s behind the telemetry backlog"
            # each stream's lag is its own: telemetry's grows while it is stopped, the events' does not
            wait_for(lambda: stream_lag(api, "telemetry") >= 3.0, timeout=20)
            s = stats(api)
            assert float(s["ingest_telemetry_lag_seconds"]) >= 3.0
            assert float(s["ingest_events_lag_seconds"]) < 2.0 and stream_lag(api, "events") < 2.0
        finally:
            for pid in stopped:
                assert pid is not None
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: stats(api)["telemetry_batches"] == BACKLOG + 1, timeout=30)
        wait_for(lambda: stream_lag(api, "telemetry") < 2.0, timeout=30)


def session(broker: BrokerInfo, client_id: str, expiry: int, subscribe: str | None = None) -> None:
    """Connect as ``client_id`` (MQTT 5), with a session kept ``expiry`` seconds (0: ended), and leave."""
    c = server_client(broker, client_id)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    subscribed = threading.Event()
    c.on_connect = lambda *_: c.subscribe(subscribe, qos=1) if subscribe else subscribed.set()
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect(*server_address(broker), clean_start=expiry == 0, properties=props)
    c.loop_start()
    try:
        assert subscribed.wait(10), f"{client_id}: no CONNACK/SUBACK"
    finally:
        c.disconnect()
        c.loop_stop()
        release(c)


def test_a_persistent_session_of_the_first_telemetry_worker_no_longer_takes_the_events(
    make_server: Callable[..., ServerThread],
    fake_device: Callable[[str], FakeDevice],
    broker_info: BrokerInfo,
) -> None:
    """A replica with a stable client id had its first ingest worker take the events as well: its
    persistent session still holds that subscription. Kept, the broker would go on sending that
    worker the events too (every event twice with plain subscriptions, half of them behind the
    telemetry with ``$share``); the worker unsubscribes what it no longer takes."""
    if broker_info.mqtt_version != 5:
        pytest.skip("the session is made with MQTT 5")
    configured = f"ef-streams-{uuid.uuid4().hex[:8]}"
    main = server_client_id(configured)
    ids = [main, worker_client_id(main, 0), events_client_id(main)]
    session(broker_info, ids[1], 300, protocol.wildcard(protocol.Channel.EVENTS))
    try:
        srv = make_server(mqtt_client_id=configured, shared_subscriptions=False)
        with httpx.Client(base_url=srv.url, timeout=10) as api:
            register(api, "streams-2")
            dev = fake_device("streams-2")
            for seq in range(1, 6):
                dev.publish("events", event("streams-2", seq, protocol.DeploymentState.DOWNLOADING))
            dev.publish(
                "telemetry", telemetry("streams-2", "t0", SHA, 1)
            )  # ingest0 would store it after them
            wait_for(lambda: (s := stats(api))["events"] >= 5 and s["telemetry_batches"] == 1, timeout=15)
            time.sleep(0.5)
            assert stats(api)["events"] == 5  # each once
        srv.stop()
    finally:
        for client_id in ids:  # end the sessions: the broker outlives the test
            session(broker_info, client_id, 0)
