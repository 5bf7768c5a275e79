"""Fixtures for the fleet server tests: a real server (uvicorn thread), real Mosquitto, signed bundles."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from edgefleet.broker import BrokerInfo, server_mqtt_settings
from fleet_server.mqtt_client import release
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine
from fleet_server.tls_context import default_verify_context
from signing.keyring import KeyDir
from signing.keys import KeyPair
from signing.manifest import ENVELOPE_NAME, sign_bundle
from tests.mqtt_clients import device_address, device_client, server_address, server_client
from tests.support.waiting import wait_for

HW = "rpi4"
_client_ids = itertools.count()


def make_bundle(
    root: Path,
    key: KeyPair,
    name: str = "det",
    version: str = "1",
    content: bytes = b"model-bytes-" * 100,
    hardware_ids: tuple[str, ...] = (HW,),
    release: int = 1,
) -> Path:
    bundle = root / f"{name}-{version}-{key.keyid[:6]}"
    bundle.mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(content)
    fields = {
        "name": name,
        "version": version,
        "release": release,
        "target": "arm64-cpu",
        "hardware_ids": list(hardware_ids),
    }
    sign_bundle(bundle, fields, ["model.onnx"], key)
    return bundle


def upload(client: httpx.Client, bundle: Path, override: dict[str, bytes] | None = None) -> httpx.Response:
    files: list[tuple[str, tuple[str, bytes, str]]] = [
        ("envelope", (ENVELOPE_NAME, (bundle / ENVELOPE_NAME).read_bytes(), "application/json"))
    ]
    for p in sorted(bundle.iterdir()):
        if p.name != ENVELOPE_NAME:
            data = (override or {}).get(p.name, p.read_bytes())
            files.append(("files", (p.name, data, "application/octet-stream")))
    return client.post("/api/v1/models", files=files)


def register(client: httpx.Client, device_id: str, hardware_id: str = HW, **tags: str) -> dict[str, Any]:
    r = client.post(
        "/api/v1/devices", json={"device_id": device_id, "hardware_id": hardware_id, "tags": tags}
    )
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def server_settings(tmp_path: Path, keydir: KeyDir, broker: BrokerInfo, **over: Any) -> ServerSettings:
    """A test server's settings: the production broker, fast ticks, the streams in the server
    process unless ``ingest_workers`` is given (the ``ingest_workers`` marker is read by
    ``make_server``, not here)."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "server-data",
        "keys_dir": keydir.path,
        **server_mqtt_settings(broker),  # the server listener and fleet-server.json on the production broker
        "tick_interval": 0.1,
        # These tests exercise rollouts and ingest; admin auth (on by default) has its own
        # tests in test_auth.py, and the demo, CLI loop and scenarios run with it on.
        "auth_required": False,
        # The server process takes telemetry and events itself (the product's one-process mode):
        # three forked ingest workers per server cost each test ~0.4 s of wall time and a TLS
        # session apiece. The worker processes are tested where they are the point (modules
        # marked ``ingest_workers``) and run in every scenario, demo and CLI loop, whose servers
        # are ``edgefleet server`` processes on the defaults.
        "ingest_workers": 0,
    }
    values.update(over)
    return ServerSettings(**values)


@pytest.fixture
def fresh_pg(pg_url: str) -> Iterator[str]:
    """An empty PostgreSQL database of its own for one test, dropped afterwards."""
    import psycopg

    admin = pg_url.rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    name = f"efmig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_url.rsplit("/", 1)[0] + f"/{name}"
    with contextlib.suppress(Exception), psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty store of each kind, at the newest revision (on PostgreSQL a database of the test's own)."""
    url = request.getfixturevalue("fresh_pg") if request.param == "postgresql" else None
    engine = make_engine(ServerSettings(database_url=url, data_dir=tmp_path))
    assert engine.dialect.name == request.param
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite database at the newest schema revision, migrated once per session.

    Migrating a new database takes ~0.12 s of CPU and dozens of fsynced commits (seconds of wall
    time on a busy disk); the servers of most tests start from a copy of this one instead, as a
    restarted server starts from its database at head. Migrating from nothing has its own tests
    (test_migrations.py), and every server started outside ``make_server`` still does it."""
    from fleet_server.store import make_engine

    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("schema"))
    make_engine(settings).dispose()  # the server's own engine and migration; closed: no WAL left
    return Path(settings.data_dir) / "fleet.db"


@pytest.fixture
def make_server(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    keydir: KeyDir,
    broker_info: BrokerInfo,
    fake_device: Callable[[str], FakeDevice],
    migrated_sqlite: Path,
) -> Iterator[Callable[..., ServerThread]]:
    """Servers of this test, stopped before ``fake_device`` clears the retained topics (a running
    server restores a deleted directive: ``fleet_server.reconciler``). A server on SQLite whose data
    directory holds no database yet starts from a copy of ``migrated_sqlite``. A test marked
    ``ingest_workers(n)`` gets servers with n telemetry workers and the events worker (the
    product's default is 2), others one-process servers (``server_settings``)."""
    started: list[ServerThread] = []
    marker = request.node.get_closest_marker("ingest_workers")
    workers = {"ingest_workers": marker.args[0] if marker.args else 2} if marker else {}

    def make(tls_cert: Path | None = None, tls_key: Path | None = None, **over: Any) -> ServerThread:
        over = {**workers, **over}
        # port 0: ServerThread binds the socket itself (no race for a port chosen here) and
        # defaults public_url to where it listens (https:// with tls_cert/tls_key)
        settings = server_settings(tmp_path, keydir, broker_info, **over)
        if settings.database_url is None:
            db = Path(settings.data_dir) / "fleet.db"
            if not db.exists():
                db.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(migrated_sqlite, db)
        srv = ServerThread(settings, tls_cert=tls_cert, tls_key=tls_key).start()
        started.append(srv)
        assert srv.wait_subscribed(10), "the server (and its ingest workers) subscribed"
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10, verify=default_verify_context()) as c:
        yield c


class FakeDevice:
    """A paho client speaking the wire protocol as a device would (no agent logic), with the
    device's own identity: on the production broker it may only speak under its own topics."""

    def __init__(self, broker: BrokerInfo, device_id: str) -> None:
        self.device_id = device_id
        self.broker = broker
        self.received: list[tuple[str, bytes, bool]] = []
        # the production broker makes the client id the device id (use_username_as_clientid)
        self.client = device_client(broker, device_id, client_id=f"test-{device_id}-{next(_client_ids)}")
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload), m.retain))
        self.client.connect(*device_address(broker))
        self.client.loop_start()
        wait_for(self.client.is_connected, 5)

    def subscribe_desired(self) -> None:
        self.client.subscribe(f"ef/v1/{self.device_id}/desired", qos=1)

    def publish(self, channel: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(
            f"ef/v1/{self.device_id}/{channel}", payload, qos=1, retain=retain
        ).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()  # first: wakes the network thread, so loop_stop returns at once
        self.client.loop_stop()
        release(self.client)  # the on_message closure keeps the client (and its socket pair) alive


@pytest.fixture
def fake_device(broker_info: BrokerInfo) -> Iterator[Callable[[str], FakeDevice]]:
    made: list[FakeDevice] = []

    def make(device_id: str) -> FakeDevice:
        d = FakeDevice(broker_info, device_id)
        made.append(d)
        return d

    yield make
    if not made:
        return
    # clear retained topics this test left behind (the broker lives for the session): a device may
    # clear its own reported and status, only the server account its desired
    cleaner = server_client(broker_info)
    cleaner.connect(*server_address(broker_info))
    cleaner.loop_start()
    for d in made:
        for ch in ("reported", "status"):
            d.client.publish(f"ef/v1/{d.device_id}/{ch}", b"", qos=1, retain=True).wait_for_publish(5)
        cleaner.publish(f"ef/v1/{d.device_id}/desired", b"", qos=1, retain=True).wait_for_publish(5)
        d.close()
    cleaner.disconnect()
    cleaner.loop_stop()
    release(cleaner)


def stats(client: httpx.Client) -> dict[str, int]:
    return dict(json.loads(client.get("/api/v1/stats").text))
