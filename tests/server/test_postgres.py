"""The same store on PostgreSQL: a representative path through upload, ingest and a rollout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fleet_server.models import ModelAggregate
from fleet_server.runner import ServerThread
from fleet_server.store import new_session
from signing.keyring import KeyDir
from signing.keys import generate_keypair

from .conftest import FakeDevice, make_bundle, register, stats, upload, wait_for
from .test_mqtt import telemetry
from .test_rollout_flow import directives, serve, status

pytestmark = pytest.mark.ingest_workers  # the workers storing into PostgreSQL


def test_postgres_store_end_to_end(
    pg_url: str,
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    server = make_server(database_url=pg_url)
    assert server.context.engine.dialect.name == "postgresql"
    client = httpx.Client(base_url=server.url, timeout=10)
    content = b"pg-model" * 64
    model = upload(client, make_bundle(tmp_path, keydir.key("release"), name="pgdet", content=content))
    assert model.status_code == 201, model.text
    assert upload(client, make_bundle(tmp_path / "x", generate_keypair(), name="pgdet")).status_code == 400
    sha = model.json()["sha256"]
    register(client, "pg-1", site="pg")
    assert (
        client.post(
            "/api/v1/devices", json={"device_id": "pg-1", "hardware_id": "rpi4", "tags": {"site": "pg"}}
        ).status_code
        == 200
    )
    part = client.get(
        f"/api/v1/artifacts/{sha}", headers={"X-Edgefleet-Device": "pg-1", "Range": "bytes=8-15"}
    )
    assert part.status_code == 206 and part.content == content[8:16]
    dev = fake_device("pg-1")
    dev.subscribe_desired()
    before = stats(client)
    for _ in range(2):
        dev.publish("telemetry", telemetry("pg-1", "pg-batch", "9" * 64, 2))
    wait_for(lambda: stats(client)["duplicate_batches"] == before["duplicate_batches"] + 1)
    rid = client.post(
        "/api/v1/rollouts",
        json={"model": "pgdet:1", "selector": {"tags": {"site": "pg"}}, "stages": [100], "soak_seconds": 0},
    ).json()["id"]
    d = wait_for(lambda: directives(dev, keydir))[-1]
    serve(dev, d, inferences=3)
    wait_for(lambda: status(client, rid)["state"] == "completed")
    assert status(client, rid)["devices"] == {"pg-1": "done"}
    device = client.get("/api/v1/devices/pg-1").json()
    assert device["desired_seq"] == 1 and device["running_model"]["sha256"] == sha
    with new_session(server.context.engine) as session:
        agg = session.get(ModelAggregate, ("pg-1", "9" * 64))
        assert agg is not None and agg.inferences == 2
        assert agg.updated_at.tzinfo is not None
    client.close()
