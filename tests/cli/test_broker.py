"""The throwaway broker launcher: Mosquitto from a generated config, and the embedded fallback."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.broker import mosquitto_binary, start_embedded, start_mosquitto


def _retained(host: str, port: int, version: int, topic: str) -> list[bytes]:
    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311)
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.connect(host, port)
    c.loop_start()
    c.subscribe(topic, 1)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()
    return got


def _publish_retained(host: str, port: int, version: int, topic: str, payload: bytes) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311)
    c.connect(host, port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_persistent_mosquitto_keeps_retained_messages_across_a_restart(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = start_mosquitto(workdir=tmp_path / "b", persistence=True)
    host, port = broker.info.host, broker.info.port
    _publish_retained(host, port, 5, "ef/v1/x/desired", b"kept")
    time.sleep(1.2)  # autosave_interval 1
    broker.stop()
    again = start_mosquitto(port=port, workdir=tmp_path / "b", persistence=True)
    try:
        assert _retained(host, port, 5, "ef/v1/x/desired") == [b"kept"]
    finally:
        again.stop()


def test_embedded_broker_speaks_mqtt_3_1_1() -> None:
    broker = start_embedded()
    try:
        assert (broker.info.mqtt_version, broker.info.shared_subscriptions) == (4, False)
        _publish_retained(broker.info.host, broker.info.port, 4, "a/b", b"hi")
        assert _retained(broker.info.host, broker.info.port, 4, "a/b") == [b"hi"]
    finally:
        broker.stop()
