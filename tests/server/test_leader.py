"""Scale-out: two server processes on one PostgreSQL and one broker; the leader is killed mid-rollout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.broker import BrokerInfo, server_mqtt_settings
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_rollout_flow import directed, directives, serve, status

pytestmark = pytest.mark.slow


class Replica:
    """``edgefleet server`` as a real OS process (so it can be SIGKILLed like a crashed pod)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        # the replica serves on a socket bound here and handed over: nothing can take the port
        # while the replica imports
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            self.port = int(held.getsockname()[1])
            self.url = f"http://127.0.0.1:{self.port}"
            self.log = log.open("wb")
            code = f"from fleet_server.runner import main; main(fd={held.fileno()})"
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                pass_fds=(held.fileno(),),
            )
        # one client for every poll: a new one per request builds a new TLS context (~20 ms of CPU)
        self.http = httpx.Client(timeout=2)

    def info(self) -> dict[str, Any]:
        try:
            r = self.http.get(f"{self.url}/api/v1/server")
        except httpx.HTTPError:
            return {}
        return dict(r.json()) if r.status_code == 200 else {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.http.close()
        self.log.close()


@pytest.fixture
def replicas(
    pg_url: str, keydir: KeyDir, broker_info: BrokerInfo, tmp_path: Path
) -> Iterator[Callable[[], Replica]]:
    if not broker_info.shared_subscriptions:
        pytest.skip("the broker has no shared subscriptions")
    made: list[Replica] = []
    env = {
        **os.environ,
        "EDGEFLEET_DATABASE_URL": pg_url,
        "EDGEFLEET_DATA_DIR": str(tmp_path / "shared-data"),  # artifacts: shared storage across replicas
        "EDGEFLEET_KEYS_DIR": str(keydir.path),
        # the server listener and fleet-server.json on the production broker
        **{f"EDGEFLEET_{k.upper()}": str(v) for k, v in server_mqtt_settings(broker_info).items()},
        "EDGEFLEET_TICK_INTERVAL": "0.2",
        "EDGEFLEET_AUTH_REQUIRED": "false",
        "EDGEFLEET_PUBLIC_URL": "http://127.0.0.1:1",
    }

    def make() -> Replica:
        rep = Replica(env, tmp_path / f"replica-{len(made)}.log")
        made.append(rep)
        wait_for(lambda: rep.info().get("mqtt_connected"), timeout=30, interval=0.2)
        return rep

    yield make
    for rep in made:
        rep.stop()


def test_leader_killed_mid_rollout_another_replica_takes_over(
    replicas: Callable[[], Replica],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    a = replicas()
    wait_for(lambda: a.info().get("leader"), timeout=10)
    b = replicas()
    assert b.info()["leader"] is False and b.info()["database"] == "postgresql"
    assert a.info()["schema_revision"] == b.info()["schema_revision"] is not None
    client = httpx.Client(base_url=b.url, timeout=10)  # the API works on any replica
    upload(client, make_bundle(tmp_path, keydir.key("release"), name="ha", content=b"ha-model" * 40))
    devs = {}
    for i in range(4):
        register(client, f"ha-{i}", site="ha")
        devs[f"ha-{i}"] = fake_device(f"ha-{i}")
        devs[f"ha-{i}"].subscribe_desired()
    rid = client.post(
        "/api/v1/rollouts",
        json={"model": "ha:1", "selector": {"tags": {"site": "ha"}}, "stages": [50, 100], "soak_seconds": 0},
    ).json()["id"]
    first = directed(devs.values(), keydir, 2)

    a.kill()  # the leader dies with stage 1 in flight
    wait_for(lambda: b.info().get("leader"), timeout=15)
    for dev in first:
        serve(dev, directives(dev, keydir)[-1], inferences=3)
    second = directed(devs.values(), keydir, 2, timeout=20, exclude=first)
    for dev in second:
        serve(dev, directives(dev, keydir)[-1], inferences=3)
    wait_for(lambda: status(client, rid)["state"] == "completed", timeout=20)
    final = status(client, rid)
    assert set(final["devices"].values()) == {"done"}
    # exactly one directive per device: the new leader resumed, it did not start over
    assert all(len(directives(d, keydir)) == 1 for d in devs.values())
    # telemetry (a $share stream) reached the database through the surviving replica
    rows = client.get("/api/v1/telemetry", params={"model": "ha:1"}).json()["items"]
    assert sum(r["inferences"] for r in rows) == 12
    client.close()


def test_only_one_replica_leads(replicas: Callable[[], Replica]) -> None:
    reps = [replicas(), replicas()]
    wait_for(lambda: sum(bool(r.info().get("leader")) for r in reps) == 1, timeout=10)
    assert sum(bool(r.info().get("leader")) for r in reps) == 1
