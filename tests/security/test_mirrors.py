"""Static delivery through real nginx mirrors: failover, and stale mirrors TUF refuses.

The repository is published by the server's publisher into directories that Debian's nginx
serves; the real agent runs in TUF mode on the real (secure) broker with a mirror list, and
its directives name URLs where nothing listens, so every byte it installs came from a mirror.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from device_agent import protocol
from device_agent.agent import Agent
from edgefleet.nginx import Nginx
from edgefleet.ports import bound_socket
from fleet_server.mirror import BundleSource, DirectoryStorage, Publisher
from signing.keyring import KeyDir, init_keys
from signing.targets import TargetCustom
from signing.tuf_release import target_name
from signing.tuf_repo import TufRepository
from tests.agent.harness import (
    HW,
    Bundle,
    LoopThread,
    Observer,
    X,
    agent_config,
    make_bundle,
    model_ref,
    sign_directive,
    start_agent,
    unique_id,
    wait_for,
)
from tests.support.nginx import nginx

# the directive's own URLs: a port held (bound, never listening) for the whole run refuses them
_NOWHERE = bound_socket()
NOWHERE = f"http://127.0.0.1:{_NOWHERE.getsockname()[1]}"


@dataclass
class Published:
    keydir: KeyDir
    repo: TufRepository
    tmp: Path
    bundles: list[Bundle] = field(default_factory=list)

    def release(self, seed: int, version: str) -> Bundle:
        b = make_bundle(self.tmp / "bundles", self.keydir.key("release"), seed=seed, version=version)
        custom = TargetCustom(b.name, int(b.version), [HW])
        self.repo.add_target(
            target_name(b.name, b.version), b.model_path, custom, self.keydir.keys("release")
        )
        self.repo.publish(self.keydir.key("fleet"))
        self.bundles.append(b)
        return b

    def publish(self, name: str) -> Path:
        """A mirror tree of the repository as it is now (with every bundle released so far)."""
        out = self.tmp / name
        sources = [BundleSource(b.sha256, b.dir, b.file) for b in self.bundles]
        Publisher(DirectoryStorage(out), self.repo.path, lambda: sources).publish()
        return out


@pytest.fixture
def published(tmp_path: Path) -> Published:
    init_keys(tmp_path / "keys")
    keydir = KeyDir(tmp_path / "keys")
    repo = TufRepository.create(
        tmp_path / "tuf", keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet")
    )
    return Published(keydir, repo, tmp_path)


@pytest.fixture
def observer(broker_info: object) -> Iterator[Observer]:
    obs = Observer(broker_info)  # type: ignore[arg-type]
    yield obs
    obs.close()


def _agent(
    broker_info: object,
    p: Published,
    mirrors: list[str],
    data_dir: Path,
    device: str | None = None,
    **extra: object,
) -> Agent:
    config = agent_config(
        broker_info,  # type: ignore[arg-type]
        data_dir,
        p.keydir.trust_path,
        device or unique_id("mirror"),
        tuf_root_path=p.keydir.tuf_root_path,
        mirrors=mirrors,
        **{"delivery_retry_s": 5.0, **extra},
    )
    return Agent(config, p.keydir.trust_root())


def _direct(obs: Observer, p: Published, agent: Agent, b: Bundle, seq: int) -> None:
    ref = model_ref(
        b, model_url=f"{NOWHERE}/m/{b.sha256}", envelope_url=f"{NOWHERE}/e/{b.sha256}", release=int(b.version)
    )
    obs.publish(agent.device_id, sign_directive(p.keydir.key("fleet"), agent.device_id, seq, ref))


def _outcome(obs: Observer, agent: Agent, seq: int) -> protocol.Event:
    final = (
        protocol.DeploymentState.SERVING,
        protocol.DeploymentState.FAILED,
        protocol.DeploymentState.REJECTED,
    )

    def find() -> protocol.Event | None:
        return next((e for e in obs.events(agent.device_id) if e.seq == seq and e.state in final), None)

    event: protocol.Event = wait_for(find, 30, f"the outcome of seq {seq}")
    return event


def _asked(server: Nginx, path: str) -> int:
    return sum(f'"GET {path}' in line for line in server.requests())


def test_a_mirror_down_erring_or_serving_wrong_bytes_fails_over_to_the_next(
    published: Published,
    broker_info: object,
    observer: Observer,
    tmp_path: Path,
    refused_port: Callable[[], int],
) -> None:
    b1 = published.release(seed=1, version="1")
    good_tree = published.publish("good")
    tampered = published.publish("tampered")  # right metadata and envelope, a model with other bytes
    model_key = f"targets/models/tiny/{b1.sha256}.1"
    (tampered / model_key).unlink()  # (a hard link to the repository's file: replace, never edit)
    (tampered / model_key).write_bytes(b"\0" * b1.length)
    loop = LoopThread()
    with (
        nginx(None, fault=500) as broken,
        nginx(None, fault=404) as empty,
        nginx(tampered) as liar,
        nginx(good_tree) as good,
    ):
        down = f"http://127.0.0.1:{refused_port()}"
        mirrors = [down, broken.url, empty.url, liar.url, good.url]
        agent = _agent(broker_info, published, mirrors, tmp_path / "dev")
        try:
            start_agent(loop, agent)
            _direct(observer, published, agent, b1, seq=1)
            event = _outcome(observer, agent, 1)
            assert event.state == protocol.DeploymentState.SERVING, (event.reason, event.detail)
            assert agent.running_sha256 == b1.sha256 and agent.infer(X).model_sha256 == b1.sha256
        finally:
            loop.run(agent.stop())
            loop.close()
        for bad in (broken, empty):  # asked for the metadata, passed over; after the liar's model, again
            assert _asked(bad, "/metadata/") >= 1 and _asked(bad, "/bundles/") == 0
            assert _asked(bad, f"/{model_key}") == 1
        # the first mirror whose metadata verified served the envelope; its model was refused (hash)
        assert _asked(liar, f"/bundles/{b1.sha256}/envelope") == 1 and _asked(liar, f"/{model_key}") == 1
        assert _asked(good, f"/{model_key}") == 1  # then the model came from the good one, once
        assert _asked(good, "/metadata/") == 0  # TUF was satisfied before it


def test_a_stale_mirror_is_refused_and_the_next_one_installs_alone_it_is_refused_for_its_reason(
    published: Published, broker_info: object, observer: Observer, tmp_path: Path
) -> None:
    fleet = published.keydir.key("fleet")
    b1 = published.release(seed=1, version="1")
    old = published.publish("old")  # release 1 only, its timestamp still valid: a mirror left behind
    published.repo.refresh_timestamp(fleet, timedelta(seconds=-60))
    frozen = published.publish("frozen")  # a copy whose timestamp has expired: a freeze attempt
    published.repo.refresh_timestamp(fleet)
    b2 = published.release(seed=2, version="2")
    good_tree = published.publish("good")
    loop = LoopThread()
    device_dir = tmp_path / "device"
    with nginx(frozen) as freezer, nginx(old) as behind, nginx(good_tree) as good:
        # 1. stale mirrors first: TUF refuses each (expired; rolled back), the good one installs
        agent = _agent(broker_info, published, [freezer.url, behind.url, good.url], device_dir)
        device = agent.device_id
        try:
            start_agent(loop, agent)
            _direct(observer, published, agent, b2, seq=1)
            event = _outcome(observer, agent, 1)
            assert event.state == protocol.DeploymentState.SERVING, (event.reason, event.detail)
            assert agent.running_sha256 == b2.sha256
        finally:
            loop.run(agent.stop())
        assert (
            _asked(freezer, "/metadata/timestamp.json") >= 1
            and _asked(behind, "/metadata/timestamp.json") >= 1
        )
        assert _asked(freezer, "/bundles/") == 0 and _asked(behind, "/bundles/") == 0  # nothing past TUF

        # 2. the same device, now with only the mirror left behind: a rollback, refused
        agent = _agent(broker_info, published, [behind.url], device_dir, device=device)
        try:
            start_agent(loop, agent)
            _direct(observer, published, agent, b1, seq=2)
            event = _outcome(observer, agent, 2)
            assert (event.state, event.reason) == (protocol.DeploymentState.FAILED, "metadata_rollback"), (
                event
            )
            assert agent.running_sha256 == b2.sha256  # still serving what it had
        finally:
            loop.run(agent.stop())

        # 3. a new device with only the frozen mirror: refused as expired (freeze), not "unavailable"
        agent = _agent(broker_info, published, [freezer.url], tmp_path / "fresh")
        try:
            start_agent(loop, agent)
            _direct(observer, published, agent, b1, seq=1)
            event = _outcome(observer, agent, 1)
            assert (event.state, event.reason) == (protocol.DeploymentState.FAILED, "metadata_expired"), event
        finally:
            loop.run(agent.stop())
            loop.close()


def test_an_https_mirror_must_chain_to_the_configured_ca(
    published: Published, broker_info: object, observer: Observer, tmp_path: Path
) -> None:
    from edgefleet.provision import fleet_ca, issue_cert, write_cert_and_key

    b1 = published.release(seed=1, version="1")
    tree = published.publish("good")
    ours, stranger = fleet_ca(KeyDir(tmp_path / "ours")), fleet_ca(KeyDir(tmp_path / "stranger"))
    (tmp_path / "ca.pem").write_bytes(ours.cert_pem)
    tls = {}
    for name, ca in (("ours", ours), ("stranger", stranger)):
        cert, key = issue_cert(ca, "mirror", server=True, hostnames=["127.0.0.1"])
        write_cert_and_key(cert, key, tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        tls[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    loop = LoopThread()
    with nginx(tree, tls=tls["stranger"]) as impostor, nginx(tree, tls=tls["ours"]) as good:
        assert impostor.url.startswith("https://")
        agent = _agent(
            broker_info,
            published,
            [impostor.url, good.url],
            tmp_path / "dev",
            http_ca_file=tmp_path / "ca.pem",
        )
        try:
            start_agent(loop, agent)
            _direct(observer, published, agent, b1, seq=1)
            event = _outcome(observer, agent, 1)
            assert event.state == protocol.DeploymentState.SERVING, (event.reason, event.detail)
        finally:
            loop.run(agent.stop())
            loop.close()
        assert impostor.requests() == []  # the TLS handshake failed: not one request reached it
        assert _asked(good, f"/targets/models/tiny/{b1.sha256}.1") == 1


def test_mirrors_down_are_retried_then_unavailable_but_a_refusal_seen_meanwhile_is_the_verdict(
    published: Published,
    broker_info: object,
    observer: Observer,
    tmp_path: Path,
    refused_port: Callable[[], int],
) -> None:
    b1 = published.release(seed=1, version="1")
    published.repo.refresh_timestamp(published.keydir.key("fleet"), timedelta(seconds=-60))
    frozen = published.publish("frozen")
    down = [f"http://127.0.0.1:{refused_port()}", f"http://127.0.0.1:{refused_port()}"]
    loop = LoopThread()
    try:
        with nginx(frozen) as freezer:
            for mirrors, reason in (
                (down, "delivery_unavailable"),
                ([down[0], freezer.url], "metadata_expired"),
            ):
                agent = _agent(broker_info, published, mirrors, tmp_path / reason, delivery_retry_s=1.0)
                try:
                    start_agent(loop, agent)
                    _direct(observer, published, agent, b1, seq=1)
                    event = _outcome(observer, agent, 1)
                    assert (event.state, event.reason) == (protocol.DeploymentState.FAILED, reason), event
                finally:
                    loop.run(agent.stop())
            assert _asked(freezer, "/metadata/timestamp.json") >= 2  # asked again on each retry
    finally:
        loop.close()
