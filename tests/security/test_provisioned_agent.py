"""Provisioning yields everything a device needs: `broker config` writes a production Mosquitto,
`devices provision` a directory whose ``agent.toml`` the real agent process runs with as
written, against the real fleet server that connects with ``fleet-server.json``. Both auth
modes; a model rolled out through the server is installed and served.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_agent.config import load_config
from edgefleet.broker import free_port, mosquitto_binary, wait_for_port
from edgefleet.cli import app
from edgefleet.client import ApiClient
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir, init_keys
from tests.agent.harness import make_bundle, wait_for

REPO = Path(__file__).resolve().parents[2]
NOPASS = "--insecure-no-passphrase"
runner = CliRunner()


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory the ``mosquitto`` user can reach (it drops privileges to read its files)."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    d = Path(tempfile.mkdtemp(prefix="ef-provisioned-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cli(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("auth", ["mtls", "password"])
def test_a_provisioned_agent_runs_from_its_toml_against_the_production_broker(root: Path, auth: str) -> None:
    init_keys(root / "keys")
    keydir = KeyDir(root / "keys")
    port, server_port = free_port(), free_port()
    _cli("broker", "config", "--out", str(root / "broker"), "--hostname", "127.0.0.1", "--bind", "127.0.0.1",
         "--port", str(port), "--server-port", str(server_port), "--auth", auth, "--keys", str(root / "keys"),
         NOPASS)  # fmt: skip
    log = open(root / "mosquitto.log", "wb")  # noqa: SIM115 - closed below
    broker = subprocess.Popen(
        [str(mosquitto_binary()), "-c", str(root / "broker" / "mosquitto.conf")], stdout=log, stderr=log
    )
    agent: subprocess.Popen[bytes] | None = None
    server: ServerThread | None = None
    try:
        wait_for_port("127.0.0.1", port)
        wait_for_port("127.0.0.1", server_port)
        provision = ["devices", "provision", "cam-1", "--hw", "rpi4", "--broker-host", "127.0.0.1",
                     "--broker-port", str(port), "--keys", str(root / "keys"), "--out", str(root / "cam-1"),
                     NOPASS]  # fmt: skip
        if auth == "password":
            provision += ["--password-file", str(root / "broker" / "passwd")]
        _cli(*provision)
        if auth == "password":
            broker.send_signal(signal.SIGHUP)  # the broker rereads its password file

        # what the device got: TLS, its own credentials, no secret in the TOML
        toml_path = root / "cam-1" / "agent.toml"
        raw = toml_path.read_text()
        table = tomllib.loads(raw)["agent"]
        assert table["mqtt_tls"] is True and table["mqtt_port"] == port
        config = load_config(toml_path)
        assert config.mqtt_ca_file == root / "cam-1" / "ca.crt" and config.data_dir == root / "cam-1" / "data"
        if auth == "mtls":
            assert config.mqtt_cert_file == root / "cam-1" / "device.crt" and config.mqtt_username is None
        else:
            assert config.mqtt_username == "cam-1" and config.mqtt_password_file is not None
            password = config.mqtt_password_file.read_text().strip()
            assert password and password not in raw
            assert config.mqtt_password_file.stat().st_mode & 0o777 == 0o600
        assert (root / "cam-1" / "bootstrap.json").is_file()  # still there

        settings = ServerSettings(
            data_dir=root / "server",
            keys_dir=keydir.path,
            mqtt_credentials=root / "broker" / "fleet-server.json",  # host, port and files: from the file
            tick_interval=0.1,
            auth_required=False,
        )
        server = ServerThread(settings).start()
        assert server.context.bridge is not None
        wait_for(server.context.bridge.subscribed.is_set, 15, "the server is in, on the server listener")
        api = ApiClient(server.url)
        api.register_device("cam-1", "rpi4")
        agent = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config", str(toml_path), "--workload-hz", "5"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(root / "agent.log", "wb"),  # noqa: SIM115 - the child holds it
        )
        wait_for(lambda: api.device("cam-1")["online"], 30, "the agent online through the broker")
        bundle = make_bundle(root / "b", keydir.key("release"), seed=1)
        api.push_bundle(bundle.dir, release_keys=[keydir.key("release")])  # released through TUF
        rid = api.create_rollout(
            model="tiny:1", selector={"hardware_id": "rpi4"}, stages=[100], min_inferences=1
        )["id"]
        wait_for(lambda: api.rollout(rid)["state"] == "completed", 60, "the rollout completed")
        device = api.device("cam-1")
        assert device["running_model"]["sha256"] == bundle.sha256
        api.close()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0, (root / "agent.log").read_text()[-2000:]
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        if server is not None:
            server.stop()
        broker.terminate()
        broker.wait(10)
        log.close()
