"""Provisioning yields everything a device needs: `broker config` writes a production Mosquitto,
`devices provision` a directory whose ``agent.toml`` the real agent process runs with as
written, against the real fleet server that connects with ``fleet-server.json``. Both auth
modes; a model rolled out through the server is installed and served.
"""

from __future__ import annotations

import signal
import tomllib
from pathlib import Path

import pytest

from device_agent.config import load_config
from edgefleet.client import ApiClient
from tests.agent.harness import make_bundle, wait_for
from tests.security.production_site import production_site


@pytest.mark.parametrize("auth", ["mtls", "password"])
def test_a_provisioned_agent_runs_from_its_toml_against_the_production_broker(
    site_root: Path, auth: str
) -> None:
    root = site_root
    with production_site(root, auth) as site:
        options = ["--password-file", str(root / "broker" / "passwd")] if auth == "password" else []
        toml_path = site.provision("cam-1", *options)
        if auth == "password":
            site.broker.send_signal(signal.SIGHUP)  # the broker rereads its password file

        # what the device got: TLS, its own credentials, no secret in the TOML
        raw = toml_path.read_text()
        table = tomllib.loads(raw)["agent"]
        assert table["mqtt_tls"] is True and table["mqtt_port"] == site.port
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

        server = site.start_server()
        api = ApiClient(server.url)
        api.register_device("cam-1", "rpi4")
        agent = site.start_agent(toml_path)
        wait_for(lambda: api.device("cam-1")["online"], 30, "the agent online through the broker")
        bundle = make_bundle(root / "b", site.keydir.key("release"), seed=1)
        api.push_bundle(bundle.dir, release_keys=[site.keydir.key("release")])  # released through TUF
        rid = api.create_rollout(
            model="tiny:1", selector={"hardware_id": "rpi4"}, stages=[100], min_inferences=1
        )["id"]
        wait_for(lambda: api.rollout(rid)["state"] == "completed", 60, "the rollout completed")
        device = api.device("cam-1")
        assert device["running_model"]["sha256"] == bundle.sha256
        api.close()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0, site.agent_log(toml_path).read_text()[-2000:]
