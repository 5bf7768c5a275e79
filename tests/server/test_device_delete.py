"""``DELETE /api/v1/devices/{id}``: refused while an active rollout holds the device, else it is forgotten."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import FakeDevice, register, wait_for
from .test_rollout_flow import directives, status
from .test_rollout_ops import create, fleet_on_old_model


def test_delete_unknown_device_is_404(client: httpx.Client) -> None:
    r = client.delete("/api/v1/devices/nobody")
    assert r.status_code == 404 and r.json()["detail"]["code"] == "device_not_found"


def test_delete_then_register_again(client: httpx.Client) -> None:
    register(client, "gone-1", site="x")
    r = client.delete("/api/v1/devices/gone-1")
    assert r.status_code == 200 and r.json()["device_id"] == "gone-1" and r.json()["tags"] == {"site": "x"}
    assert client.get("/api/v1/devices/gone-1").status_code == 404
    assert "gone-1" not in [d["device_id"] for d in client.get("/api/v1/devices").json()["items"]]
    # the id is free again, with other attributes (a deleted device is no conflict)
    assert register(client, "gone-1", "jetson")["hardware_id"] == "jetson"


def test_device_in_active_rollout_is_kept_until_the_rollout_ends(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path, fake_device: Callable[[str], FakeDevice]
) -> None:
    refused_while_active_then_deleted(client, keydir, tmp_path, fake_device, "dd")


def test_delete_on_postgresql(
    pg_url: str,
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    """PostgreSQL enforces the rollout rows' foreign key to the device: the delete must remove them."""
    server = make_server(database_url=pg_url)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        refused_while_active_then_deleted(client, keydir, tmp_path, fake_device, "pgdd")


def refused_while_active_then_deleted(
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    prefix: str,
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, prefix, 2)
    rid = create(client, prefix, stages=[100], min_inferences=1)
    wait_for(lambda: all(directives(d, keydir) for d in devs.values()))
    r = client.delete(f"/api/v1/devices/{prefix}-0")
    assert r.status_code == 409 and r.json()["detail"]["code"] == "device_in_rollout"
    assert rid in r.json()["detail"]["message"]
    assert client.get(f"/api/v1/devices/{prefix}-0").status_code == 200  # refused: nothing lost
    assert client.post(f"/api/v1/rollouts/{rid}/abort").status_code == 200
    wait_for(lambda: status(client, rid)["state"] == "aborted")
    assert client.delete(f"/api/v1/devices/{prefix}-0").status_code == 200
    after = status(client, rid)  # the finished rollout still reads, without the deleted device
    assert set(after["devices"]) == {f"{prefix}-1"} and after["state"] == "aborted"
    assert [d["action"] for d in after["decisions"]][-1] == "abort"
