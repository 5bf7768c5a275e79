"""HTTP API over a real uvicorn server: uploads, devices, artifacts with Range, rollouts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from signing.keys import generate_keypair
from tests.support.waiting import wait_for

from .conftest import make_bundle, register, upload

CONTENT = bytes(range(256)) * 40  # 10,240 bytes


def test_healthz_and_empty_lists(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/api/v1/devices").json() == {"items": [], "next": None}
    assert client.get("/api/v1/models").json() == {"items": [], "next": None}


def test_upload_ok_and_listed(client: httpx.Client, keydir: KeyDir, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, keydir.key("release"), content=CONTENT)
    r = upload(client, bundle)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["name"], body["version"], body["length"]) == ("det", "1", len(CONTENT))
    assert body["hardware_ids"] == ["rpi4"] and body["manifest"]["files"][0]["path"] == "model.onnx"
    assert client.get("/api/v1/models/det/1").json()["sha256"] == body["sha256"]
    assert [m["name"] for m in client.get("/api/v1/models").json()["items"]] == ["det"]
    # the same bundle again is idempotent; other content under the same name:version is a conflict
    assert upload(client, bundle).status_code == 200
    other = make_bundle(tmp_path / "other", keydir.key("release"), content=b"different")
    r = upload(client, other)
    assert r.status_code == 409 and r.json()["detail"]["code"] == "model_exists"


def test_tampered_file_refused(client: httpx.Client, keydir: KeyDir, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, keydir.key("release"), content=CONTENT)
    tampered = bytearray(CONTENT)
    tampered[100] ^= 1
    r = upload(client, bundle, override={"model.onnx": bytes(tampered)})
    assert r.status_code == 400
    assert r.json()["detail"]["code"] == "digest_mismatch"
    r = upload(client, bundle, override={"model.onnx": CONTENT + b"x"})
    assert r.status_code == 400 and r.json()["detail"]["code"] == "length_mismatch"
    assert client.get("/api/v1/models").json()["items"] == []


def test_unknown_key_refused(client: httpx.Client, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, generate_keypair(), content=CONTENT)
    r = upload(client, bundle)
    assert r.status_code == 400
    assert r.json()["detail"] == {"code": "unknown_key", "message": "no signature by a trusted key"}


def test_malformed_envelope_and_missing_parts_refused(client: httpx.Client) -> None:
    r = client.post(
        "/api/v1/models",
        files=[
            ("envelope", ("bundle.dsse.json", b"{not json", "application/json")),
            ("files", ("model.onnx", b"x")),
        ],
    )
    assert r.status_code == 400 and r.json()["detail"]["code"] == "malformed_envelope"
    r = client.post("/api/v1/models", files=[("files", ("model.onnx", b"x"))])
    assert r.status_code == 400 and r.json()["detail"]["code"] == "invalid_request"


def test_unexpected_and_missing_files_refused(client: httpx.Client, keydir: KeyDir, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, keydir.key("release"), content=CONTENT)
    env = (bundle / "bundle.dsse.json").read_bytes()
    r = client.post(
        "/api/v1/models",
        files=[("envelope", ("bundle.dsse.json", env)), ("files", ("evil.sh", b"rm -rf /"))],
    )
    assert r.status_code == 400 and r.json()["detail"]["code"] == "unexpected_file"


def test_device_registration(client: httpx.Client) -> None:
    r = client.post(
        "/api/v1/devices", json={"device_id": "dev-1", "hardware_id": "rpi4", "tags": {"site": "a"}}
    )
    assert r.status_code == 201
    body = r.json()
    assert body["device_id"] == "dev-1" and body["running_model"] is None and body["online"] is False
    assert body["desired_seq"] == 0 and body["deployment_seq"] == 0
    again = client.post(
        "/api/v1/devices", json={"device_id": "dev-1", "hardware_id": "rpi4", "tags": {"site": "a"}}
    )
    assert again.status_code == 200
    clash = client.post("/api/v1/devices", json={"device_id": "dev-1", "hardware_id": "jetson", "tags": {}})
    assert clash.status_code == 409 and clash.json()["detail"]["code"] == "device_exists"
    bad = client.post("/api/v1/devices", json={"device_id": "../x", "hardware_id": "rpi4"})
    assert bad.status_code == 400 and bad.json()["detail"]["code"] == "invalid_request"
    assert [d["device_id"] for d in client.get("/api/v1/devices").json()["items"]] == ["dev-1"]
    assert client.get("/api/v1/devices/dev-1").json()["tags"] == {"site": "a"}
    missing = client.get("/api/v1/devices/nope")
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "device_not_found"
    assert client.get("/api/v1/models/nope/1").status_code == 404
    assert client.get("/api/v1/rollouts/nope").status_code == 404


def test_artifact_download_with_range(client: httpx.Client, keydir: KeyDir, tmp_path: Path) -> None:
    sha = upload(client, make_bundle(tmp_path, keydir.key("release"), content=CONTENT)).json()["sha256"]
    register(client, "dev-1")
    url = f"/api/v1/artifacts/{sha}"
    dev = {"X-Edgefleet-Device": "dev-1"}
    full = client.get(url, headers=dev)
    assert full.status_code == 200 and full.content == CONTENT
    assert full.headers["accept-ranges"] == "bytes"
    part = client.get(url, headers={**dev, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == CONTENT[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(CONTENT)}"
    tail = client.get(url, headers={**dev, "Range": "bytes=10000-"})
    assert tail.status_code == 206 and tail.content == CONTENT[10000:]
    suffix = client.get(url, headers={**dev, "Range": "bytes=-16"})
    assert suffix.status_code == 206 and suffix.content == CONTENT[-16:]
    clipped = client.get(url, headers={**dev, "Range": f"bytes=10200-{len(CONTENT) + 50}"})
    assert clipped.status_code == 206 and clipped.content == CONTENT[10200:]
    for bad in (f"bytes={len(CONTENT)}-", "bytes=50-10", "bytes=abc", "bytes=0-1,5-6", "items=0-1"):
        r = client.get(url, headers={**dev, "Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == f"bytes */{len(CONTENT)}"
    env = client.get(f"{url}/envelope", headers=dev)
    assert env.status_code == 200 and json.loads(env.content)["payloadType"] == "application/vnd.in-toto+json"
    # artifacts are public reads: every byte is signed, so the device header is a label, not a key
    for headers in ({}, {"X-Edgefleet-Device": "stranger"}):
        assert client.get(url, headers=headers).content == CONTENT
        assert client.get(f"{url}/envelope", headers=headers).content == env.content
    assert client.get(f"/api/v1/artifacts/{'0' * 64}", headers=dev).status_code == 404


def test_rollout_create_validation_and_conflict(client: httpx.Client, keydir: KeyDir, tmp_path: Path) -> None:
    upload(client, make_bundle(tmp_path, keydir.key("release"), content=CONTENT))
    for i in range(4):
        register(client, f"dev-{i}", site="a" if i < 2 else "b")
    register(client, "other-hw", hardware_id="jetson", site="a")
    r = client.post("/api/v1/rollouts", json={"model": "det:9", "stages": [100]})
    assert r.status_code == 404 and r.json()["detail"]["code"] == "model_not_found"
    r = client.post("/api/v1/rollouts", json={"model": "det:1", "stages": [50, 10]})
    assert r.status_code == 400 and r.json()["detail"]["code"] == "invalid_request"
    r = client.post("/api/v1/rollouts", json={"model": "det:1", "selector": {"tags": {"site": "zzz"}}})
    assert r.status_code == 400 and r.json()["detail"]["code"] == "no_matching_devices"
    spec = {
        "model": "det:1",
        "selector": {"tags": {"site": "a"}},
        "stages": [50, 100],
        "soak_seconds": 60,
        "device_timeout_seconds": 600,
    }
    r = client.post("/api/v1/rollouts", json=spec)
    assert r.status_code == 201, r.text
    ro = r.json()
    assert ro["state"] == "running" and ro["model"] == "det:1"
    assert sorted(ro["devices"]) == ["dev-0", "dev-1"]  # the jetson is not a target of an rpi4 model
    assert [s["target_count"] for s in ro["stages"]] == [1, 2]

    # a poller's view: the same status and stage counts without the per-device maps
    def views() -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Both views read while the engine did not move a device between them (it ticks)."""
        light = client.get(f"/api/v1/rollouts/{ro['id']}", params={"devices": "false"}).json()
        full = client.get(f"/api/v1/rollouts/{ro['id']}").json()
        return (light, full) if light["stages"] == full["stages"] else None

    light, full = wait_for(views, 10, "two reads of the rollout between engine ticks")
    assert (
        light["devices"] == {}
        and light["device_reasons"] == {}
        and sorted(full["devices"]) == ["dev-0", "dev-1"]
    )
    assert light["state"] == full["state"] == "running"
    # overlapping selector while the first is active -> 409; disjoint is fine
    r = client.post("/api/v1/rollouts", json={**spec, "selector": {"hardware_id": "rpi4"}})
    assert r.status_code == 409 and r.json()["detail"]["code"] == "rollout_conflict"
    r = client.post("/api/v1/rollouts", json={**spec, "selector": {"tags": {"site": "b"}}})
    assert r.status_code == 201
    # pause / resume / abort are idempotent and recorded
    rid = ro["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/pause").json()["state"] == "paused"
    assert client.post(f"/api/v1/rollouts/{rid}/pause").json()["state"] == "paused"
    assert client.post(f"/api/v1/rollouts/{rid}/resume").json()["state"] == "running"
    assert client.post(f"/api/v1/rollouts/{rid}/abort").json()["state"] == "aborted"
    final = client.post(f"/api/v1/rollouts/{rid}/abort").json()
    assert final["state"] == "aborted"
    assert [d["action"] for d in final["decisions"]][:1] == ["created"]
    assert {"pause", "resume", "abort"} <= {d["action"] for d in final["decisions"]}
    r = client.post(f"/api/v1/rollouts/{rid}/resume")
    assert r.status_code == 409
    # once aborted, its devices are free for a new rollout
    assert client.post("/api/v1/rollouts", json=spec).status_code == 201
    assert len(client.get("/api/v1/rollouts").json()["items"]) == 3


def test_many_devices_download_at_once(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, tmp_path: Path
) -> None:
    """A wave of devices fetching the same artifact is served, not starved.

    A streamed download must not hold a database connection: 150 concurrent
    requests would otherwise exhaust the pool while the threads that would
    finish the streams wait for it.
    """
    sha = upload(client, make_bundle(tmp_path, keydir.key("release"), content=CONTENT)).json()["sha256"]
    register(client, "wave-1")

    async def wave() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=20, limits=limits) as ac:
            get = [
                ac.get(f"/api/v1/artifacts/{sha}", headers={"X-Edgefleet-Device": "wave-1"})
                for _ in range(150)
            ]
            return list(await asyncio.gather(*get))

    responses = asyncio.run(wave())
    assert [r.status_code for r in responses] == [200] * 150
    assert all(r.content == CONTENT for r in responses)
