"""The release flow through the real fleet server: the release key signs TUF targets on the release
host, the server checks them against the root, publishes snapshot + timestamp with the fleet key and
serves the repository; a TUF-mode agent installs only what was released that way."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata, Targets, Timestamp

from device_agent import protocol
from device_agent.agent import Agent
from edgefleet.broker import BrokerInfo, server_mqtt_settings
from edgefleet.client import ApiClient, ApiError
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir, init_keys
from signing.targets import FLOORS_TARGET, TargetCustom
from signing.tuf_release import sign_target_added, target_name
from tests.agent.harness import LoopThread, Observer, X, agent_config, make_bundle, start_agent, wait_for


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
        auth_required=True,
        tuf_timestamp_expiry_seconds=4.0,
        tuf_refresh_interval=0.1,
    )
    srv = ServerThread(settings).start()
    assert srv.wait_subscribed(10), "the server subscribed before any device speaks"
    yield srv
    srv.stop()


def _rollout(api: ApiClient, model: str) -> str:
    r = api.create_rollout(model=model, selector={"hardware_id": "rpi4"}, stages=[100], min_inferences=1)
    return str(r["id"])


def test_release_through_the_server_reaches_a_tuf_device(
    server: ServerThread, keydir: KeyDir, tmp_path: Path, broker_info: BrokerInfo
) -> None:
    release = keydir.key("release")
    good = make_bundle(tmp_path / "b", release, seed=1, version="1")
    unreleased = make_bundle(tmp_path / "b", release, seed=2, version="2")
    observer, loop = Observer(broker_info), LoopThread()
    # the device derives the repository URL from its directive (no tuf_url configured)
    config = agent_config(
        broker_info, tmp_path / "dev", keydir.trust_path, "tuf-dev-1", tuf_root_path=keydir.tuf_root_path
    )
    agent = Agent(config, keydir.trust_root())
    try:
        with ApiClient(server.url, token=server.admin_token) as api:
            api.register_device("tuf-dev-1", "rpi4")
            start_agent(loop, agent)
            api.push_bundle(good.dir, release_keys=[release])
            rid = _rollout(api, "tiny:1")
            wait_for(lambda: agent.running_sha256 == good.sha256, 20, "the released model installed")
            agent.infer(X)
            wait_for(lambda: api.rollout(rid)["state"] == "completed", 20, "rollout completed")
            # DSSE-only upload (DSSE-only path): the server stores it, but it is not released through TUF
            api.push_bundle(unreleased.dir)
            rid2 = _rollout(api, "tiny:2")
            event = observer.wait_event("tuf-dev-1", protocol.DeploymentState.FAILED, timeout=20)
            assert event.reason == "target_not_found"
            assert agent.running_sha256 == good.sha256 and agent.infer(X).model_sha256 == good.sha256
            try:
                api.rollout_action(rid2, "abort")
            except ApiError as exc:  # the failed install may have rolled it back on the last tick
                assert exc.code == "rollout_finished", exc
            # the server answers the release key's floor; the device then refuses release 1 as well
            out = api.revoke_below("tiny", 2, [release])
            assert out["targets_version"] == 2  # v1: the push, v2: the floor
            with pytest.raises(ValueError, match="never go down"):
                api.revoke_below("tiny", 1, [release])
        store = agent.trust_store
        assert store is not None and store.state.repository_url == f"{server.url}/tuf"
    finally:
        loop.run(agent.stop())
        loop.close()
        observer.close()


def test_server_accepts_only_what_a_release_key_signed(
    server: ServerThread, keydir: KeyDir, tmp_path: Path
) -> None:
    b = make_bundle(tmp_path / "b", keydir.key("release"), seed=1, version="1")
    with ApiClient(server.url, token=server.admin_token) as api:
        # the online fleet key alone cannot release: 400 metadata_unsigned, nothing stored
        with pytest.raises(ApiError) as exc:
            api.push_bundle(b.dir, release_keys=[keydir.key("fleet")])
        assert (exc.value.status, exc.value.code) == (400, "metadata_unsigned")
        assert api.models() == []
        # a tampered bundle keeps the upload path's error code
        tampered = tmp_path / "tampered"
        tampered.mkdir()
        for f in b.dir.iterdir():
            data = f.read_bytes()
            (tampered / f.name).write_bytes(data[:-1] + b"\0" if f.suffix == ".onnx" else data)
        with pytest.raises(ApiError) as exc:
            api.push_bundle(tampered, release_keys=[keydir.key("release")])
        assert exc.value.code == "digest_mismatch"
        # targets metadata that describes other bytes than the bundle: refused
        other = make_bundle(tmp_path / "b", keydir.key("release"), seed=9, version="1")
        forged = sign_target_added(
            None, target_name("tiny", "1"), sha256=other.sha256, length=other.length,
            custom=TargetCustom("tiny", 1, ["rpi4"]),
            release_keys=[keydir.key("release")],
        )  # fmt: skip
        files = [
            ("envelope", ("bundle.dsse.json", (b.dir / "bundle.dsse.json").read_bytes(), "application/json")),
            ("files", ("model.onnx", b.model_path.read_bytes(), "application/octet-stream")),
            ("targets", ("targets.json", forged, "application/json")),
        ]
        r = httpx.post(
            f"{server.url}/api/v1/models",
            files=files,
            headers={"Authorization": f"Bearer {server.admin_token}"},
        )
        assert (r.status_code, r.json()["detail"]["code"]) == (400, "target_mismatch")
        # a replayed (older-version) targets file is refused too
        api.push_bundle(b.dir, release_keys=[keydir.key("release")])
        r = httpx.post(
            f"{server.url}/api/v1/tuf/targets",
            files=[("targets", ("targets.json", forged, "application/json"))],
            headers={"Authorization": f"Bearer {server.admin_token}"},
        )
        assert (r.status_code, r.json()["detail"]["code"]) == (400, "metadata_rollback")
        assert [m["version"] for m in api.models()] == ["1"]
    meta = httpx.get(f"{server.url}/tuf/metadata/targets.json").content
    listed = Metadata[Targets].from_bytes(meta).signed.targets
    assert set(listed) == {target_name("tiny", "1")} and FLOORS_TARGET not in listed
    # consistent snapshots: the target bytes are served under their hash
    sha = listed[target_name("tiny", "1")].hashes["sha256"]
    assert httpx.get(f"{server.url}/tuf/targets/models/tiny/{sha}.1").content == b.model_path.read_bytes()
    assert httpx.get(f"{server.url}/tuf/targets/../admin.token").status_code == 404
    assert httpx.get(f"{server.url}/tuf/metadata/..%2Fadmin.token").status_code == 404


def test_the_server_keeps_the_timestamp_fresh(server: ServerThread, keydir: KeyDir, tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b", keydir.key("release"), seed=1, version="1")
    with ApiClient(server.url, token=server.admin_token) as api:
        api.push_bundle(b.dir, release_keys=[keydir.key("release")])

    with httpx.Client() as http:  # one client for the polls, not a TLS context per poll

        def timestamp() -> Metadata[Timestamp]:
            return Metadata[Timestamp].from_bytes(
                http.get(f"{server.url}/tuf/metadata/timestamp.json").content
            )

        first = timestamp().signed
        later = wait_for(
            lambda: (t := timestamp().signed).version > first.version + 1 and t, 10, "re-signed timestamp"
        )
    assert later.expires > first.expires and later.expires > datetime.now(UTC)


def test_concurrent_releases_all_land_in_the_targets_metadata(
    server: ServerThread, keydir: KeyDir, tmp_path: Path
) -> None:
    """Four releases pushed at once each sign against the same targets version; the losers of
    each round re-read, re-sign and push again, so every release ends up listed exactly once."""
    release = keydir.key("release")
    bundles = [make_bundle(tmp_path / "b", release, seed=i, version=str(i)) for i in range(1, 5)]
    barrier = threading.Barrier(len(bundles))

    def push(bundle_dir: Path) -> dict[str, object]:
        with ApiClient(server.url, token=server.admin_token) as api:
            barrier.wait()
            return api.push_bundle(bundle_dir, release_keys=[release])

    with ThreadPoolExecutor(len(bundles)) as pool:
        pushed = list(pool.map(push, [b.dir for b in bundles]))
    assert sorted(str(m["version"]) for m in pushed) == ["1", "2", "3", "4"]
    with ApiClient(server.url, token=server.admin_token) as api:
        raw = api.tuf_targets()
    assert raw is not None
    targets = Metadata[Targets].from_bytes(raw).signed
    assert targets.version == len(bundles)
    assert {target_name("tiny", str(i)) for i in range(1, 5)} <= set(targets.targets)
