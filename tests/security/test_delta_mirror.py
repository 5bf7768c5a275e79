"""A delta over a mirror: the fleet server builds a delta when a rollout is created, publishes it
to its mirror, and a device with that mirror installs the new model from the delta alone.

Real everything: the fleet server (TUF on, publishing to its mirror directory), Debian's nginx
serving that directory, the production broker, and the real agent in TUF mode with the nginx as
its only mirror. The new model is another family than the one the device runs, so no release
built the delta: only the rollout did, after the upload's publish and before the rollout's device
was told to install.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from device_agent import protocol
from device_agent.agent import Agent
from edgefleet.broker import BrokerInfo, server_mqtt_settings
from edgefleet.client import ApiClient
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir, init_keys
from signing.manifest import sign_bundle
from tests.agent.harness import HW, LoopThread, X, agent_config, make_model, start_agent, unique_id, wait_for
from tests.support.nginx import nginx


@pytest.fixture
def keydir(tmp_path: Path) -> KeyDir:
    init_keys(tmp_path / "keys")
    return KeyDir(tmp_path / "keys")


@pytest.fixture
def server(tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo) -> Iterator[ServerThread]:
    settings = ServerSettings(
        data_dir=tmp_path / "server",
        keys_dir=keydir.path,
        **server_mqtt_settings(broker_info),
        tick_interval=0.1,
        auth_required=False,
    )
    srv = ServerThread(settings).start()
    # Listening before the device speaks: an event published while no ingest worker has subscribed
    # yet is dropped by the broker (a clean session), and a cold forkserver takes seconds on a busy
    # machine to start them.
    assert srv.wait_subscribed(30), "the server (and its ingest workers) subscribed"
    yield srv
    srv.stop()


def _bundle(root: Path, model: Path, keydir: KeyDir, name: str) -> tuple[Path, str, int]:
    """A released bundle of ``model`` as ``name:1``: its directory, model sha256 and length."""
    d = root / name
    d.mkdir(parents=True)
    shutil.copy(model, d / "model.onnx")
    fields = {"name": name, "version": "1", "release": 1, "target": "arm64-cpu", "hardware_ids": [HW]}
    f = sign_bundle(d, fields, ["model.onnx"], keydir.key("release")).model_file
    return d, f.sha256, f.length


def _few_weights_moved(src: Path, dest: Path) -> Path:
    """``src`` with a few of its weights retrained: most bytes as they were, so a delta is small."""
    model = onnx.load(str(src))
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[:, :8] += 0.05 * np.random.default_rng(7).standard_normal((w.shape[0], 8)).astype(w.dtype)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    onnx.save(model, str(dest))
    return dest


def test_a_delta_built_at_rollout_creation_is_published_and_installed_from_the_mirror(
    server: ServerThread, keydir: KeyDir, broker_info: BrokerInfo, tmp_path: Path
) -> None:
    v1_model = make_model(tmp_path / "v1.onnx", seed=3, width=2048)  # ~512 KB
    v2_model = _few_weights_moved(v1_model, tmp_path / "v2.onnx")
    v1_dir, v1_sha, _ = _bundle(tmp_path / "b", v1_model, keydir, "scorer")
    v2_dir, v2_sha, v2_length = _bundle(tmp_path / "b", v2_model, keydir, "scorer-ft")
    mirror_dir = server.context.settings.mirror_dir
    delta_key = protocol.delta_path(v1_sha, v2_sha)
    device = unique_id("dmirror")
    api = ApiClient(server.url)
    loop = LoopThread()
    agent: Agent | None = None
    try:
        api.register_device(device, HW, tags={"site": device})
        api.push_bundle(v1_dir, release_keys=[keydir.key("release")])
        with nginx(mirror_dir) as mirror:
            config = agent_config(
                broker_info,
                tmp_path / "dev",
                keydir.trust_path,
                device,
                tuf_root_path=keydir.tuf_root_path,
                mirrors=[mirror.url],
            )
            agent = start_agent(loop, Agent(config, keydir.trust_root()))
            first = api.create_rollout(
                model="scorer:1", selector={"tags": {"site": device}}, min_inferences=1, soak_seconds=0
            )["id"]
            wait_for(lambda: agent is not None and agent.running_sha256 == v1_sha, 30, "v1 from the mirror")
            agent.infer(X)
            wait_for(lambda: api.rollout(first)["state"] == "completed", 30, "the v1 rollout completed")
            assert (api.device(device).get("running_model") or {}).get("sha256") == v1_sha
            api.push_bundle(v2_dir, release_keys=[keydir.key("release")])
            assert (mirror_dir / "bundles" / v2_sha / "envelope").is_file()
            assert not (mirror_dir / "targets" / delta_key).exists()  # no release of its family runs
            rid = api.create_rollout(
                model="scorer-ft:1", selector={"tags": {"site": device}}, min_inferences=1
            )["id"]
            published = mirror_dir / "targets" / delta_key
            # built and published before the rollout existed: its device looks for it at once
            assert published.is_file(), "the delta built for the rollout is on the mirror when it returns"
            assert published.stat().st_size < v2_length // 10
            wait_for(lambda: agent is not None and agent.running_sha256 == v2_sha, 30, "v2 from the delta")
            asked = mirror.requests()
            for_v2 = [line for line in asked if v2_sha in line]
            assert any(f'/targets/{delta_key} HTTP/1.1" 200' in line for line in for_v2), asked
            # the envelope and the delta, never the full file (neither its target nor its bundle copy)
            assert all("/envelope " in line or "/targets/deltas/" in line for line in for_v2), for_v2
            delivery = wait_for(
                lambda: (d := api.rollout(rid)["delivery"])["installs"] >= 1 and d,
                30,
                "the rollout counts the install's bytes",
            )
            envelope = (mirror_dir / "bundles" / v2_sha / "envelope").stat().st_size
            assert delivery["bytes_fetched"] == envelope + published.stat().st_size, delivery
            assert delivery["bytes_fetched"] < v2_length // 10
    finally:
        if agent is not None:
            loop.run(agent.stop())
        loop.close()
        api.close()
