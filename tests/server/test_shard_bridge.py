"""The server on two real broker shards (production configuration: TLS, client certificates, ACL):
ingest from both, each directive on its device's shard only, and a shard that dies and returns."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from device_agent import protocol
from edgefleet.broker import SecureBrokerInfo, mosquitto_binary, start_secure_shards
from fleet_server.directives import sign_directive
from fleet_server.runner import ServerThread
from fleet_server.shards import assign
from signing.keyring import KeyDir
from tests.mqtt_clients import server_address, server_client

from .conftest import FakeDevice, register, server_settings, stats, wait_for

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
NAMES = ["shard-0", "shard-1"]


def _one_per_shard() -> dict[str, str]:
    """A device id on each shard (shard -> id)."""
    found: dict[str, str] = {}
    for i in itertools.count():
        found.setdefault(assign(f"shd-{i}", NAMES), f"shd-{i}")
        if len(found) == len(NAMES):
            return found
    raise AssertionError("unreachable")


def _another_on(shard: str, taken: set[str]) -> str:
    return next(d for i in itertools.count() if (d := f"shd-{i}") not in taken and assign(d, NAMES) == shard)


def _signed(keydir: KeyDir, device_id: str, seq: int) -> bytes:
    now = datetime.now(UTC)
    directive = protocol.Directive(
        device_id=device_id, seq=seq, issued_at=now, expires_at=now + timedelta(hours=1), model=None
    )
    return sign_directive(directive, keydir.key("fleet"))


def _retained_desired(info: SecureBrokerInfo, device_id: str) -> list[bytes]:
    """What the broker holds retained on the device's desired topic (read as the server account)."""
    got: list[bytes] = []
    c = server_client(info)
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.connect(*server_address(info))
    c.loop_start()
    try:
        wait_for(c.is_connected, 5)
        c.subscribe(f"ef/v1/{device_id}/desired", 1)
        # a retained message comes right after the SUBACK; a second round trip proves none is coming
        c.publish("ef/v1/probe/desired", b"", qos=1, retain=False).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
    return [p for p in got if p]


@pytest.mark.slow  # ~15 s: a server with its ingest workers, and a shard's reconnect backoff
def test_one_server_on_two_shards(tmp_path: Path, keydir: KeyDir) -> None:
    devices = _one_per_shard()
    devices = {name: devices[name] for name in NAMES}
    with start_secure_shards(2, tmp_path / "brokers") as group:
        infos = group.infos
        settings = server_settings(
            tmp_path, keydir, infos["shard-0"], mqtt_shards=group.shards_file, ingest_workers=2
        )
        srv = ServerThread(settings).start()
        fakes: list[FakeDevice] = []
        try:
            bridge = srv.context.bridge
            assert bridge is not None and list(bridge.links) == NAMES
            wait_for(bridge.subscribed.is_set, 15, "subscribed on both shards (and the ingest workers)")
            with httpx.Client(base_url=srv.url, timeout=10) as api:
                for shard, device in devices.items():
                    assert register(api, device)["broker_shard"] == shard
                    fake = FakeDevice(infos[shard], device)
                    fakes.append(fake)
                    fake.subscribe_desired()
                    # the snapshot (main client) and the stream ($share, ingest workers) of each shard
                    status = protocol.Status(device_id=device, state="online")
                    fake.publish("status", protocol.encode(status), retain=True)
                    event = protocol.Event(device_id=device, seq=1, state=protocol.DeploymentState.IDLE)
                    fake.publish("events", protocol.encode(event))
                wait_for(lambda: stats(api)["events"] >= 2 and stats(api)["status"] >= 2, 15)
                assert all(api.get(f"/api/v1/devices/{d}").json()["online"] for d in devices.values())

                # each directive on its device's shard, and only there
                for device in devices.values():
                    bridge.publish_desired(device, f"for {device}".encode())
                for shard, fake in zip(NAMES, fakes, strict=True):
                    wait_for(lambda f=fake: any(p == f"for {f.device_id}".encode() for _, p, _ in f.received))
                    other = infos[NAMES[1 - NAMES.index(shard)]]
                    assert _retained_desired(other, fake.device_id) == []
                    assert _retained_desired(infos[shard], fake.device_id) == [
                        f"for {fake.device_id}".encode()
                    ]

                # shard-1 holds the signed directive of a device that is not connected now
                absent = _another_on("shard-1", set(devices.values()))
                register(api, absent)
                kept = _signed(keydir, absent, 1)
                bridge.publish_desired(absent, kept)
                wait_for(lambda: _retained_desired(infos["shard-1"], absent) == [kept])

                # shard-1 dies and loses its store: the API stays ready and says which shard is away
                group.kill("shard-1")
                (group.workdir / "shard-1" / "broker" / "data" / "mosquitto.db").unlink(missing_ok=True)
                wait_for(
                    lambda: (
                        api.get("/api/v1/server").json()["mqtt_shards"] == {NAMES[0]: True, NAMES[1]: False}
                    )
                )
                ready = api.get("/readyz")
                assert ready.status_code == 200 and "shard-1" in ready.json()["checks"]["broker"]["detail"]
                # shard-0 carries on; shard-1's directive waits in the server until its broker is back
                bridge.publish_desired(devices["shard-0"], b"second")
                while_down = _signed(keydir, devices["shard-1"], 2)
                bridge.publish_desired(devices["shard-1"], while_down)
                wait_for(lambda: any(p == b"second" for _, p, _ in fakes[0].received))
                restored = stats(api)["directives_restored"]

                group.restart("shard-1")
                wait_for(bridge.subscribed.is_set, 30, "back on shard-1")
                # what was sent while it was away arrives; what it lost is put back, with no device asking
                wait_for(lambda: _retained_desired(infos["shard-1"], devices["shard-1"]) == [while_down], 15)
                wait_for(lambda: _retained_desired(infos["shard-1"], absent) == [kept], 15)
                assert stats(api)["directives_restored"] == restored + 1
                assert srv.context.counters.snapshot().get("directives_unroutable", 0) == 0
        finally:
            for fake in fakes:
                fake.close()
            srv.stop()
