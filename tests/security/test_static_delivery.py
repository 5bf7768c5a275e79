"""The fleet server leaves the download path: a provisioned agent with a mirror installs a rollout
while the server is down.

Real everything: the production broker (TLS, per-device credentials, ACLs) as `broker config`
writes it, the fleet server publishing its TUF repository and bundles to its mirror directory,
Debian's nginx serving that directory, and the agent process running from the ``agent.toml``
`devices provision --mirror` wrote. The mirror comes up only after the server is stopped, so
every byte the device installs came from nginx while no fleet server ran.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from edgefleet.client import ApiClient
from edgefleet.ports import bound_socket
from tests.agent.harness import make_bundle, wait_for
from tests.security.production_site import production_site
from tests.support.nginx import need_nginx, nginx


@pytest.mark.slow
def test_devices_install_from_the_mirror_while_the_fleet_server_is_down(site_root: Path) -> None:
    need_nginx()
    root = site_root
    # held from now on (connections refused until nginx serves on it): no other process can take it
    mirror_socket = bound_socket()
    mirror_port = mirror_socket.getsockname()[1]
    mirror_url = f"http://127.0.0.1:{mirror_port}"
    with production_site(root, "mtls") as site:
        toml_path = site.provision("cam-1", "--mirror", mirror_url)
        assert f'mirrors = ["{mirror_url}"]' in toml_path.read_text()
        with open(toml_path, "a") as fh:  # keep retrying the mirror while this test brings it up
            fh.write("delivery_retry_s = 120\n")

        server = site.start_server()
        api = ApiClient(server.url)
        api.register_device("cam-1", "rpi4")
        agent = site.start_agent(toml_path)
        agent_log = site.agent_log(toml_path)
        wait_for(
            lambda: api.device("cam-1")["online"],
            30,
            "the agent online through the broker",
            proc=agent,
            output=lambda: agent_log.read_text()[-2000:],
        )
        bundle = make_bundle(root / "b", site.keydir.key("release"), seed=1)
        api.push_bundle(bundle.dir, release_keys=[site.keydir.key("release")])  # released through TUF
        published = site.settings.mirror_dir
        assert (published / "bundles" / bundle.sha256 / "model").is_file()  # published before it returned
        rid = api.create_rollout(
            model="tiny:1", selector={"hardware_id": "rpi4"}, stages=[100], min_inferences=1
        )["id"]

        def acting() -> bool:
            d = api.device("cam-1")
            return bool(d["desired_seq"] and d["deployment_seq"] == d["desired_seq"])

        wait_for(acting, 30, "the device acting on the directive (the mirror is not up yet)")
        api.close()
        site.stop_server()

        with nginx(published, sock=mirror_socket) as mirror:
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
            server = site.start_server()
            api = ApiClient(server.url)
            wait_for(lambda: api.rollout(rid)["state"] == "completed", 60, "the rollout completed")
            assert api.device("cam-1")["running_model"]["sha256"] == bundle.sha256
            api.close()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0, agent_log.read_text()[-2000:]
