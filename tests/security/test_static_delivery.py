"""The fleet server leaves the download path: a provisioned agent with a mirror installs a rollout
while the server is down.

Real everything: the production broker (TLS, per-device credentials, ACLs) as `broker config`
writes it, the fleet server publishing its TUF repository and bundles to its mirror directory,
Debian's nginx serving that directory, and the agent process running from the ``agent.toml``
`devices provision --mirror` wrote. The mirror comes up only after the server is stopped, so
every byte the device installs came from nginx while no fleet server ran.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.broker import free_port, mosquitto_binary, wait_for_port
from edgefleet.cli import app
from edgefleet.client import ApiClient
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir, init_keys
from tests.agent.harness import make_bundle, wait_for
from tests.support.nginx import need_nginx, nginx

REPO = Path(__file__).resolve().parents[2]
NOPASS = "--insecure-no-passphrase"
runner = CliRunner()


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory the ``mosquitto`` user can reach (it drops privileges to read its files)."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    need_nginx()
    d = Path(tempfile.mkdtemp(prefix="ef-static-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cli(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_devices_install_from_the_mirror_while_the_fleet_server_is_down(root: Path) -> None:
    init_keys(root / "keys")
    keydir = KeyDir(root / "keys")
    port, server_port, mirror_port = free_port(), free_port(), free_port()
    mirror_url = f"http://127.0.0.1:{mirror_port}"
    _cli("broker", "config", "--out", str(root / "broker"), "--hostname", "127.0.0.1", "--bind", "127.0.0.1",
         "--port", str(port), "--server-port", str(server_port), "--auth", "mtls",
         "--keys", str(root / "keys"), NOPASS)  # fmt: skip
    log = open(root / "mosquitto.log", "wb")  # noqa: SIM115 - closed below
    broker = subprocess.Popen(
        [str(mosquitto_binary()), "-c", str(root / "broker" / "mosquitto.conf")], stdout=log, stderr=log
    )
    agent: subprocess.Popen[bytes] | None = None
    server: ServerThread | None = None
    try:
        wait_for_port("127.0.0.1", port)
        _cli("devices", "provision", "cam-1", "--hw", "rpi4", "--broker-host", "127.0.0.1",
             "--broker-port", str(port), "--keys", str(root / "keys"), "--out", str(root / "cam-1"),
             "--mirror", mirror_url, NOPASS)  # fmt: skip
        toml_path = root / "cam-1" / "agent.toml"
        assert f'mirrors = ["{mirror_url}"]' in toml_path.read_text()
        with open(toml_path, "a") as fh:  # keep retrying the mirror while this test brings it up
            fh.write("delivery_retry_s = 120\n")

        settings = ServerSettings(
            data_dir=root / "server",
            keys_dir=keydir.path,
            mqtt_credentials=root / "broker" / "fleet-server.json",
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
        agent_log = root / "agent.log"
        wait_for(
            lambda: api.device("cam-1")["online"],
            30,
            "the agent online through the broker",
            proc=agent,
            output=lambda: agent_log.read_text()[-2000:],
        )
        bundle = make_bundle(root / "b", keydir.key("release"), seed=1)
        api.push_bundle(bundle.dir, release_keys=[keydir.key("release")])  # released through TUF
        published = settings.mirror_dir
        assert (published / "bundles" / bundle.sha256 / "model").is_file()  # published before it returned
        rid = api.create_rollout(
            model="tiny:1", selector={"hardware_id": "rpi4"}, stages=[100], min_inferences=1
        )["id"]

        def acting() -> bool:
            d = api.device("cam-1")
            return bool(d["desired_seq"] and d["deployment_seq"] == d["desired_seq"])

        wait_for(acting, 30, "the device acting on the directive (the mirror is not up yet)")
        api.close()
        server.stop()
        server = None

        with nginx(published, port=mirror_port) as mirror:
            state = root / "cam-1" / "data" / "state.json"
            wait_for(
                lambda: state.is_file() and bundle.sha256 in state.read_text(),
                90,
                "installed from the mirror",
            )
            # the fewest TUF allows: root probe, timestamp, snapshot, targets; envelope, model
            assert len(mirror.requests()) == 6, mirror.requests()
            asked = "\n".join(mirror.requests())
            assert f'/targets/models/tiny/{bundle.sha256}.1 HTTP/1.1" 200' in asked
            assert f'/bundles/{bundle.sha256}/envelope HTTP/1.1" 200' in asked

            # the server comes back and learns from the retained report that the rollout is done
            server = ServerThread(settings).start()
            api = ApiClient(server.url)
            wait_for(lambda: api.rollout(rid)["state"] == "completed", 60, "the rollout completed")
            assert api.device("cam-1")["running_model"]["sha256"] == bundle.sha256
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
