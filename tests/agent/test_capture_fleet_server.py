"""Capture uploads from a real agent to the real fleet server over HTTP: the agent samples its
inferences, signs each batch with its fleet-CA certificate, and the server checks the signature,
keeps the batch as sent and indexes every inference by model, cohort and stage; labels posted
later join those inferences. A resend is recognised; a wrong credential, a forged device, a wrong
hash, or a body that is not the URL's batch is refused with a 4xx and stores nothing.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from edgefleet.broker import BrokerInfo, device_mqtt_keys
from edgefleet.cli import app
from edgefleet.client import ApiClient
from edgefleet.provision import fleet_ca, write_device_identity
from fleet_server.models import CaptureBatch, CaptureItem
from fleet_server.runner import ServerThread
from signing.device_auth import DeviceIdentity, sign_request
from signing.keyring import KeyDir
from tests.server.conftest import fresh_pg, server_settings

from .field_device import FieldDevice, device_identity, start_device, write_agent_toml
from .harness import Bundle, LoopThread, make_bundle, unique_id, wait_for

RNG = np.random.default_rng(11)
REPO = Path(__file__).resolve().parents[2]
__all__ = ["fresh_pg"]  # the fixture, for the PostgreSQL runs


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None: the server's own SQLite; else an empty PostgreSQL database (dropped after the server)."""
    return str(request.getfixturevalue("fresh_pg")) if request.param == "postgresql" else None


@pytest.fixture
def fleet(
    database_url: str | None, tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo
) -> Iterator[ServerThread]:
    fleet_ca(keydir)  # provisioning made the fleet CA before the server started
    srv = ServerThread(server_settings(tmp_path, keydir, broker_info, database_url=database_url)).start()
    assert srv.wait_subscribed(10), "the server subscribed before any device speaks"
    yield srv
    srv.stop()


@pytest.fixture
def bundle(tmp_path: Path, keydir: KeyDir, fleet: ServerThread) -> Bundle:
    b = make_bundle(tmp_path / "b", keydir.key("release"), seed=3)
    with ApiClient(fleet.url) as api:
        api.push_bundle(b.dir)
    return b


def _device(keydir: KeyDir, tmp_path: Path, loop: LoopThread, fleet: ServerThread) -> FieldDevice:
    device_id = unique_id("cap")
    with ApiClient(fleet.url) as api:
        api.register_device(device_id, "rpi4")
    return start_device(
        keydir,
        tmp_path / device_id,
        loop,
        device_id=device_id,
        identity=False,
        capture_batch_age_s=0.2,
        **device_identity(keydir, device_id, tmp_path),
    )


def _items(fleet: ServerThread, device_id: str | None = None) -> list[CaptureItem]:
    with Session(fleet.context.engine) as session:
        q = select(CaptureItem).order_by(col(CaptureItem.inference_id))
        if device_id is not None:
            q = q.where(CaptureItem.device_id == device_id)
        return list(session.exec(q).all())


def _batches(fleet: ServerThread) -> list[CaptureBatch]:
    with Session(fleet.context.engine) as session:
        return list(session.exec(select(CaptureBatch)).all())


def test_a_real_agent_uploads_to_the_fleet_server_and_labels_join_its_captures(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, fleet: ServerThread, bundle: Bundle
) -> None:
    dev = _device(keydir, tmp_path, loop_thread, fleet)
    try:
        policy = {"upload_url": f"{fleet.url}/api/v1/captures", "sample_rate": 1.0, "keep": "both"}
        dev.serve(bundle, capture=policy)
        results = [dev.agent.infer(RNG.standard_normal((1, 64)).astype(np.float32)) for _ in range(30)]
        ids = sorted(r.inference_id for r in results)
        wait_for(lambda: [i.inference_id for i in _items(fleet)] == ids, 30, "every capture indexed")
        wait_for(lambda: dev.agent.metrics.get("capture_items_uploaded") == 30, 10, "the device heard 201")
        by_id = {r.inference_id: r for r in results}
        for item in _items(fleet):
            assert (item.device_id, item.model_sha256, item.hardware_id) == (dev.id, bundle.sha256, "rpi4")
            assert item.predicted == str(int(np.argmax(by_id[item.inference_id].outputs[0][0])))
        for batch in _batches(fleet):  # kept byte for byte as the device signed them
            body = (fleet.context.settings.captures_dir / batch.path).read_bytes()
            assert hashlib.sha256(body).hexdigest() == batch.body_sha256
            assert json.loads(body)["device_id"] == dev.id
        assert "capture_batches_refused" not in dev.agent.metrics

        with httpx.Client(base_url=fleet.url, timeout=10) as client:
            labels = [{"inference_id": i, "label": 1, "source": "qa"} for i in ids[:10]]
            labels.append(
                {"inference_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f60718293", "label": 1, "source": "qa"}
            )
            out = client.post("/api/v1/labels", json={"labels": labels}).json()
        assert [r["matched"] for r in out["results"]] == [True] * 10 + [False]  # an unknown id: unmatched
        assert out["counts"]["accepted"] == 11

        # the dataset: captures joined with their labels, arrays as the device saw them
        ds = tmp_path / "ds.npz"
        args = ["data", "export", "--model", "tiny", "--since", "1h", "--labeled", "--out", str(ds)]
        run = CliRunner().invoke(app, [*args, "--server", fleet.url, "--json"])
        assert run.exit_code == 0, run.output
        assert json.loads(run.output)["rows"] == 10
        with np.load(ds) as data:  # no pickles needed
            assert data["inference_id"].tolist() == ids[:10]
            assert data["label"].tolist() == [1] * 10 and data["label_present"].all()
            assert set(data["label_source"].tolist()) == {"qa"} and set(data["device_id"].tolist()) == {
                dev.id
            }
            assert set(data["model"].tolist()) == {"tiny:1"} and set(data["hardware_id"].tolist()) == {"rpi4"}
            for i, iid in enumerate(data["inference_id"].tolist()):
                assert np.array_equal(data["output_0"][i], by_id[iid].outputs[0])
            assert data["input_input"].shape == (10, 1, 64) and data["ts"].dtype == np.dtype("datetime64[ms]")
        run = CliRunner().invoke(
            app, ["data", "export", "--model", "tiny", "--out", str(ds), "--server", fleet.url]
        )
        assert run.exit_code == 0, run.output
        with np.load(ds) as data:
            assert len(data["inference_id"]) == 30 and data["label_present"].sum() == 10
        missing = CliRunner().invoke(
            app, ["data", "export", "--model", "nope", "--out", str(ds), "--server", fleet.url]
        )
        assert missing.exit_code == 1 and "model_not_found" in missing.output
    finally:
        loop_thread.run(dev.agent.stop())


def _signed_batch(
    keydir: KeyDir, tmp_path: Path, device_id: str, sha: str, items: list[Any] | None = None
) -> tuple[DeviceIdentity, str, bytes]:
    d = tmp_path / "id" / device_id
    write_device_identity(fleet_ca(keydir), device_id, d)
    identity = DeviceIdentity.load(device_id, str(d / "device.crt"), str(d / "device.key"))
    batch_id = unique_id("batch").replace(".", "-")
    items = items or [
        {
            "inference_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f6071829" + str(i),
            "ts": "2026-12-01T10:00:00.000Z",
            "outputs": [{"dtype": "float32", "shape": [1, 2], "data": "AACAPwAAAAA="}],
        }
        for i in range(3)
    ]
    body = json.dumps({"device_id": device_id, "batch_id": batch_id, "model_sha256": sha, "items": items})
    return identity, batch_id, body.encode()


def test_uploads_that_do_not_prove_their_device_and_bytes_are_refused_and_store_nothing(
    keydir: KeyDir, tmp_path: Path, fleet: ServerThread, bundle: Bundle
) -> None:
    with ApiClient(fleet.url) as api:
        for d in ("dev-a", "dev-b"):
            api.register_device(d, "rpi4")
    identity, batch_id, body = _signed_batch(keydir, tmp_path, "dev-a", bundle.sha256)
    path = f"/api/v1/captures/dev-a/{batch_id}"
    good = sign_request(identity, "PUT", path, body)
    other_identity, _, _ = _signed_batch(keydir, tmp_path, "dev-b", bundle.sha256)
    foreign = tmp_path / "foreign"  # a CA the fleet never trusted, issuing "dev-a"
    foreign_keys = KeyDir(foreign)
    write_device_identity(fleet_ca(foreign_keys), "dev-a", foreign / "dev")
    impostor = DeviceIdentity.load("dev-a", str(foreign / "dev/device.crt"), str(foreign / "dev/device.key"))

    cases: list[tuple[str, dict[str, str], bytes, int, str]] = [
        ("no signature", {}, body, 401, "device_unauthenticated"),
        ("another CA", sign_request(impostor, "PUT", path, body), body, 403, "device_credentials_invalid"),
        ("another device", sign_request(other_identity, "PUT", path, body), body, 403, "wrong_device"),
        ("wrong hash", good, body.replace(b"2026-12-01", b"2026-12-02"), 400, "digest_mismatch"),
        (
            "tampered signature",
            {
                **good,
                "X-Edgefleet-Signature": sign_request(identity, "PUT", path, b"x")["X-Edgefleet-Signature"],
            },
            body,
            403,
            "bad_signature",
        ),
        (
            "signed for another path",
            sign_request(identity, "PUT", path + "x", body),
            body,
            403,
            "bad_signature",
        ),
    ]
    with httpx.Client(base_url=fleet.url, timeout=10) as client:
        for name, headers, sent, status, code in cases:
            r = client.put(path, content=sent, headers={**headers, "Content-Type": "application/json"})
            assert (r.status_code, r.json()["detail"]["code"]) == (status, code), (name, r.text)
        assert _batches(fleet) == [] and _items(fleet) == []

        # a batch another device's URL names, however well signed
        _, bid_b, body_b = _signed_batch(keydir, tmp_path, "dev-b", bundle.sha256)
        wrong_url = f"/api/v1/captures/dev-a/{bid_b}"
        r = client.put(wrong_url, content=body_b, headers=sign_request(identity, "PUT", wrong_url, body_b))
        assert (r.status_code, r.json()["detail"]["code"]) == (403, "wrong_device")
        # an unknown model, an unregistered device, a body that is not a batch
        _, bid, unknown = _signed_batch(keydir, tmp_path, "dev-a", "0" * 64)
        p = f"/api/v1/captures/dev-a/{bid}"
        r = client.put(p, content=unknown, headers=sign_request(identity, "PUT", p, unknown))
        assert (r.status_code, r.json()["detail"]["code"]) == (422, "unknown_model")
        stranger, bid, sbody = _signed_batch(keydir, tmp_path, "dev-z", bundle.sha256)
        p = f"/api/v1/captures/dev-z/{bid}"
        r = client.put(p, content=sbody, headers=sign_request(stranger, "PUT", p, sbody))
        assert (r.status_code, r.json()["detail"]["code"]) == (403, "device_not_registered")
        for junk in (b"[1]", b"{", b"[" * 10_000 + b"]" * 10_000):
            r = client.put(path, content=junk, headers=sign_request(identity, "PUT", path, junk))
            assert (r.status_code, r.json()["detail"]["code"]) == (400, "invalid_request"), junk[:5]
        huge = b" " * (2 << 20)
        r = client.put(path, content=huge, headers=sign_request(identity, "PUT", path, huge))
        assert (r.status_code, r.json()["detail"]["code"]) == (413, "body_too_large")
        assert _batches(fleet) == [] and _items(fleet) == []

        # the real thing, twice (the device never heard the first answer), then another body
        r = client.put(path, content=body, headers=good)
        assert r.status_code == 201 and r.json()["items"] == 3, r.text
        r = client.put(path, content=body, headers=good)
        assert r.status_code == 200 and r.json()["created"] is False
        other = body.replace(b"2026-12-01", b"2026-12-03")
        r = client.put(path, content=other, headers=sign_request(identity, "PUT", path, other))
        assert (r.status_code, r.json()["detail"]["code"]) == (409, "batch_conflict")
    assert len(_batches(fleet)) == 1 and len(_items(fleet)) == 3
    assert [i.predicted for i in _items(fleet)] == ["0", "0", "0"]  # [1.0, 0.0]: class 0
    files = list(fleet.context.settings.captures_dir.rglob("*.json"))
    assert len(files) == 1 and files[0].read_bytes() == body


def test_items_without_a_usable_id_are_skipped_not_the_batch(
    keydir: KeyDir, tmp_path: Path, fleet: ServerThread, bundle: Bundle
) -> None:
    with ApiClient(fleet.url) as api:
        api.register_device("dev-c", "rpi4")
    items: list[Any] = [
        {"inference_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f60718290", "ts": "2026-12-01T10:00:00Z"},
        {"inference_id": "nope", "ts": "2026-12-01T10:00:00Z"},
        {"inference_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f60718291", "ts": "not a time"},
        "junk",
    ]
    identity, batch_id, body = _signed_batch(keydir, tmp_path, "dev-c", bundle.sha256, items)
    path = f"/api/v1/captures/dev-c/{batch_id}"
    with httpx.Client(base_url=fleet.url, timeout=10) as client:
        r = client.put(path, content=body, headers=sign_request(identity, "PUT", path, body))
    assert r.status_code == 201 and (r.json()["items"], r.json()["skipped"]) == (1, 3)
    assert [i.predicted for i in _items(fleet)] == [None]  # no outputs kept: nothing to score


def test_captures_and_their_labels_are_attributed_to_the_rollout_stage(
    keydir: KeyDir, tmp_path: Path, fleet: ServerThread, bundle: Bundle
) -> None:
    with ApiClient(fleet.url) as api:
        for d in ("st-1", "st-2"):
            api.register_device(d, "rpi4")
        rollout = api.create_rollout(model="tiny:1", stages=[50, 100])

        def assigned() -> dict[str, int | None]:
            rows = api.pages(f"/api/v1/rollouts/{rollout['id']}/devices")
            return {r["device_id"]: r["stage"] for r in rows}

        wait_for(lambda: 0 in assigned().values(), 20, "the first stage assigned")
        stages = assigned()
    ids: dict[str, list[str]] = {}
    with httpx.Client(base_url=fleet.url, timeout=10) as client:
        for n, device in enumerate(("st-1", "st-2")):
            items: list[dict[str, Any]] = [
                {
                    "inference_id": f"0193a5f0-7c1e-7a3b-9c2d-4e5f607182{n}{i}",
                    "ts": "2026-12-01T10:00:00Z",
                    "outputs": [{"dtype": "float32", "shape": [1, 2], "data": "AACAPwAAAAA="}],  # top-1: 0
                }
                for i in range(4)
            ]
            ids[device] = [str(x["inference_id"]) for x in items]
            identity, batch_id, body = _signed_batch(keydir, tmp_path, device, bundle.sha256, items)
            path = f"/api/v1/captures/{device}/{batch_id}"
            r = client.put(path, content=body, headers=sign_request(identity, "PUT", path, body))
            assert r.status_code == 201, r.text
            assert r.json()["stage"] == stages[device] and r.json()["hardware_id"] == "rpi4"
        labels = [{"inference_id": i, "label": 0, "source": "qa"} for i in ids["st-1"] + ids["st-2"][:2]]
        labels.append({"inference_id": ids["st-2"][2], "label": 1, "source": "qa"})  # a wrong prediction
        assert client.post("/api/v1/labels", json={"labels": labels}).json()["counts"]["matched"] == 7
        metrics = client.get("/api/v1/models/tiny/1/metrics").json()
    assert metrics["rollout_id"] == rollout["id"]
    got = {(g["hardware_id"], g["stage"]): g["server_labels"] for g in metrics["groups"]}
    first = next(d for d, s in stages.items() if s == 0)
    other = next(d for d in stages if d != first)
    assert set(got) == {("rpi4", 0), ("rpi4", stages[other])}
    want_first = (4, 4) if first == "st-1" else (3, 2)
    want_other = (3, 2) if first == "st-1" else (4, 4)
    assert (got[("rpi4", 0)]["labels"], got[("rpi4", 0)]["correct"]) == want_first
    assert (got[("rpi4", stages[other])]["labels"], got[("rpi4", stages[other])]["correct"]) == want_other
    assert (metrics["total"]["server_labels"]["labels"], metrics["total"]["server_labels"]["correct"]) == (
        7,
        6,
    )
    with Session(fleet.context.engine) as session:
        rows = session.exec(select(CaptureItem)).all()
    assert {(r.device_id, r.stage, r.rollout_id) for r in rows} == {
        (d, s, rollout["id"] if s is not None else None) for d, s in stages.items()
    }


def test_the_loop_a_rollout_with_capture_a_real_agent_process_labels_and_the_dataset(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path
) -> None:
    """Nothing in between is a stand-in: the server's rollout carries a capture policy in its signed
    directive over the real broker; ``python -m device_agent`` installs the model, serves its
    synthetic workload, captures it and uploads to the server's URL from the directive; labels
    posted to the server join those captures; the export holds them, attributed to stage 0."""
    dev = unique_id("loop")
    keys = device_mqtt_keys(broker_info, dev)
    settings = server_settings(tmp_path, keydir, broker_info, device_ca_file=keys["mqtt_ca_file"])
    srv = ServerThread(settings).start()
    assert srv.wait_subscribed(10), "the server subscribed before the device speaks"
    conf = write_agent_toml(tmp_path, keydir, broker_info, dev)
    cmd = [sys.executable, "-m", "device_agent", "--config", str(conf), "--workload-hz", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        b = make_bundle(tmp_path / "b", keydir.key("release"), seed=4)
        with ApiClient(srv.url) as api:
            api.push_bundle(b.dir)
            api.register_device(dev, "rpi4")
            rollout = api.create_rollout(
                model="tiny:1", stages=[100], soak_seconds=0, capture={"sample_rate": 1.0, "keep": "both"}
            )

            def captured() -> list[CaptureItem]:
                return [i for i in _items(srv, dev) if i.rollout_id == rollout["id"]]

            wait_for(lambda: len(captured()) >= 20, 60, "captures of the rollout model on the server")
            items = captured()
            assert {(i.model_sha256, i.hardware_id, i.stage) for i in items} == {(b.sha256, "rpi4", 0)}
            ids = sorted(i.inference_id for i in items)[:10]
            out = api.post_labels([{"inference_id": i, "label": 7, "source": "field"} for i in ids])
            assert out["counts"] == {"accepted": 10, "duplicate": 0, "invalid": 0, "matched": 10}
            page = api.page("/api/v1/captures", model="tiny:1", labeled=True, limit=100)
        assert [r["inference_id"] for r in page["items"]] == ids
        row = page["items"][0]
        assert (row["stage"], row["rollout_id"], row["labels"][0]["label"]) == (0, rollout["id"], 7)
        assert row["inputs"] is not None and row["outputs"] is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        srv.stop()
