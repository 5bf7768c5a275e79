"""A production site built the way an operator builds one, for the tests that run the real agent
process from what provisioning wrote: fresh keys, the Mosquitto `broker config` writes (TLS,
per-device credentials, ACLs) running, devices provisioned with `devices provision`, the fleet
server connecting with ``fleet-server.json``, and the agent started from its ``agent.toml``.

The set-up lives here once so that each test states only what it proves.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from typer.testing import CliRunner

from edgefleet.broker import mosquitto_binary, wait_for_port
from edgefleet.cli import app
from edgefleet.ports import free_port, launch, start_on_free_port
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir, init_keys

REPO = Path(__file__).resolve().parents[2]
NOPASS = "--insecure-no-passphrase"
runner = CliRunner()


def cli(*args: str) -> None:
    """Run an ``edgefleet`` command in this process; it must succeed."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@contextlib.contextmanager
def mosquitto_reachable_dir(prefix: str) -> Iterator[Path]:
    """A directory the ``mosquitto`` user can reach (it drops privileges to read its files)."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Site:
    """Keys and a running production broker in ``root``; the server and agents once started.

    ``close()`` stops whatever still runs: the agent processes, the server, the broker.
    """

    def __init__(self, root: Path, auth: str) -> None:
        self.root = root
        init_keys(root / "keys")
        self.keydir = KeyDir(root / "keys")
        self.port = self.server_port = 0  # the broker's, once it runs

        def configure() -> None:
            self.port, self.server_port = free_port(), free_port()
            while self.server_port == self.port:
                self.server_port = free_port()
            cli("broker", "config", "--out", str(root / "broker"), "--hostname", "127.0.0.1",
                "--bind", "127.0.0.1", "--port", str(self.port), "--server-port", str(self.server_port),
                "--auth", auth, "--keys", str(root / "keys"), NOPASS)  # fmt: skip

        self.settings = ServerSettings(
            data_dir=root / "server",
            keys_dir=self.keydir.path,
            mqtt_credentials=root / "broker" / "fleet-server.json",  # host, port and files: from the file
            tick_interval=0.1,
            auth_required=False,
        )
        self.server: ServerThread | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        # last: once the broker runs, the caller's ``close()`` is what stops it

        def start_broker() -> tuple[subprocess.Popen[bytes], IO[bytes]]:
            # ports picked now can be taken before Mosquitto binds them: then a new configuration
            configure()
            return launch(
                [str(mosquitto_binary()), "-c", str(root / "broker" / "mosquitto.conf")],
                root / "mosquitto.log",
                [self.port, self.server_port],
            )

        self.broker, self._log = start_on_free_port(start_broker)

    def provision(self, device: str, *options: str) -> Path:
        """`devices provision` the device for this broker; the path of the ``agent.toml`` it wrote."""
        cli("devices", "provision", device, "--hw", "rpi4", "--broker-host", "127.0.0.1",
            "--broker-port", str(self.port), "--keys", str(self.root / "keys"),
            "--out", str(self.root / device), *options, NOPASS)  # fmt: skip
        return self.root / device / "agent.toml"

    def start_server(self) -> ServerThread:
        """The fleet server, in once it has subscribed on the broker's server listener."""
        server = ServerThread(self.settings).start()
        self.server = server
        assert server.wait_subscribed(15), "the server is in, on the server listener"
        return server

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def start_agent(self, toml_path: Path) -> subprocess.Popen[bytes]:
        """``python -m device_agent --config agent.toml`` with a light workload; its stderr goes to
        ``agent.log`` beside the TOML (:meth:`agent_log`)."""
        agent = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config", str(toml_path), "--workload-hz", "5"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(self.agent_log(toml_path), "wb"),  # noqa: SIM115 - the child holds it
        )
        self.agents.append(agent)
        return agent

    def agent_log(self, toml_path: Path) -> Path:
        return self.root / f"{toml_path.parent.name}-agent.log"

    def close(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        self.stop_server()
        self.broker.terminate()
        self.broker.wait(10)
        self._log.close()


@contextlib.contextmanager
def production_site(root: Path, auth: str = "mtls") -> Iterator[Site]:
    """A :class:`Site` for the ``with`` block, stopped at its end (also after a failure)."""
    site = Site(root, auth)
    try:
        wait_for_port("127.0.0.1", site.port)
        wait_for_port("127.0.0.1", site.server_port)
        yield site
    finally:
        site.close()
