"""Raw paho clients for tests, authenticated the way the product's own clients are.

On the production broker (``edgefleet.broker.start_secure_broker``, the session default) a
device client presents its own identity (client id = device id, its certificate or password)
and may only speak under its own topics; a server client comes in on the server listener with
the server's certificate. On an open development broker both are plain connections.
"""

from __future__ import annotations

import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.broker import BrokerInfo, SecureBrokerInfo, device_security, server_security


def _protocol(broker: BrokerInfo) -> Any:
    return mqtt.MQTTv5 if broker.mqtt_version == 5 else mqtt.MQTTv311


def device_client(broker: BrokerInfo, device_id: str, client_id: str | None = None, **kw: Any) -> mqtt.Client:
    """Not connected yet: ``client.connect(*device_address(broker))``."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or device_id, protocol=_protocol(broker), **kw
    )
    device_security(broker, device_id).apply(c)
    return c


def server_client(broker: BrokerInfo, client_id: str | None = None, **kw: Any) -> mqtt.Client:
    """A client with the fleet server's identity (not connected: ``connect(*server_address(broker))``)."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-server-{uuid.uuid4().hex[:8]}",
        protocol=_protocol(broker),
        **kw,
    )
    server_security(broker).apply(c)
    return c


def device_address(broker: BrokerInfo) -> tuple[str, int]:
    return broker.host, broker.port


def server_address(broker: BrokerInfo) -> tuple[str, int]:
    return broker.host, broker.server_port if isinstance(broker, SecureBrokerInfo) else broker.port


def publish_as_server(broker: BrokerInfo, topic: str, payload: bytes, retain: bool = True) -> None:
    """One QoS 1 publish with the server's identity, acknowledged before this returns."""
    c = server_client(broker)
    c.connect(*server_address(broker))
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
