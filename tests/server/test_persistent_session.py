"""A server replica with a stable MQTT client id loses no telemetry while it restarts."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fleet_server.runner import ServerThread

from .conftest import FakeDevice, register, wait_for
from .test_mqtt import telemetry

pytestmark = pytest.mark.ingest_workers  # the workers' persistent sessions

SHA = "ab" * 32


def batches(client: httpx.Client) -> int:
    return int(client.get("/api/v1/stats").json()["telemetry_batches"])


def test_telemetry_sent_while_the_server_restarts_arrives_after(
    make_server: Callable[..., ServerThread], fake_device: Callable[[str], FakeDevice]
) -> None:
    client_id = f"ef-server-test-{uuid.uuid4().hex[:8]}"
    first = make_server(mqtt_client_id=client_id, shared_subscriptions=False)
    with httpx.Client(base_url=first.url, timeout=10) as api:
        register(api, "persist-1")
    dev = fake_device("persist-1")
    dev.publish("telemetry", telemetry("persist-1", "before", SHA, 3))
    with httpx.Client(base_url=first.url, timeout=10) as api:
        wait_for(lambda: batches(api) == 1)
    settings: dict[str, Any] = {"mqtt_client_id": client_id, "shared_subscriptions": False}
    first.stop()
    # the server is down: the broker keeps its session and queues these QoS 1 batches
    for i in range(5):
        dev.publish("telemetry", telemetry("persist-1", f"while-down-{i}", SHA, 2))
    second = make_server(**settings)  # same data dir and database, same client id
    with httpx.Client(base_url=second.url, timeout=10) as api:
        # counters are per process: the restarted server counts the 5 queued batches
        wait_for(lambda: batches(api) == 5, timeout=15)
        per_model = api.get("/api/v1/telemetry").json()["items"]
    assert per_model, "telemetry aggregates are empty after the restart"
