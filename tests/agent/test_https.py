"""The agent downloads over HTTPS: the server's certificate must chain to ``http_ca_file``, and the
device presents its client certificate. A real TLS server, certificates from the fleet CA tooling."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.memory_link import MemoryLink
from edgefleet.provision import FleetCA, fleet_ca, issue_cert, write_cert_and_key
from signing.keyring import KeyDir

from .harness import HW, ArtifactServer, Bundle, LoopThread, TufServer, X, sign_directive, unique_id, wait_for

DS = protocol.DeploymentState


def _server_tls(ca: FleetCA, tmp: Path, name: str, client_ca: Path | None = None) -> ssl.SSLContext:
    cert, key = issue_cert(ca, "artifacts", server=True, hostnames=["127.0.0.1", "localhost"])
    write_cert_and_key(cert, key, tmp / f"{name}.crt", tmp / f"{name}.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / f"{name}.crt", tmp / f"{name}.key")
    if client_ca is not None:  # mutual TLS: only devices of this fleet may download
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


@pytest.fixture
def pki(tmp_path: Path) -> tuple[FleetCA, FleetCA, Path]:
    """The fleet's CA (its cert written to ca.pem) and a stranger's CA."""
    fleet, stranger = fleet_ca(KeyDir(tmp_path / "fleet")), fleet_ca(KeyDir(tmp_path / "stranger"))
    (tmp_path / "ca.pem").write_bytes(fleet.cert_pem)
    return fleet, stranger, tmp_path / "ca.pem"


@pytest.fixture
def https_agent(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, pki: tuple[FleetCA, FleetCA, Path]
) -> Iterator[Callable[..., tuple[Agent, MemoryLink]]]:
    """An agent whose broker link is in memory and whose downloads are real HTTPS (the default fetcher)."""
    fleet = pki[0]
    started: list[Agent] = []

    def make(**config: object) -> tuple[Agent, MemoryLink]:
        dev = unique_id()
        cert, key = issue_cert(fleet, dev)
        write_cert_and_key(cert, key, tmp_path / f"{dev}.crt", tmp_path / f"{dev}.key")
        cfg = AgentConfig(
            dev,
            HW,
            tmp_path / dev,
            keydir.trust_path,
            mqtt_tls=True,  # the device's certificate is its broker identity too
            mqtt_cert_file=tmp_path / f"{dev}.crt",
            mqtt_key_file=tmp_path / f"{dev}.key",
            **config,  # type: ignore[arg-type]
        )
        link = MemoryLink(dev)
        agent = Agent(cfg, keydir.trust_root(), link=link)
        loop_thread.run(agent.start())
        started.append(agent)
        return agent, link

    yield make
    for agent in started:
        loop_thread.run(agent.stop())


def _events(link: MemoryLink) -> list[protocol.Event]:
    return [protocol.decode_event(m.payload) for m in link.published(protocol.Channel.EVENTS)]


def _wait(link: MemoryLink, state: protocol.DeploymentState, seq: int) -> protocol.Event:
    return wait_for(
        lambda: next((e for e in _events(link) if e.state == state and e.seq == seq), None),
        timeout=20,
        what=f"{state} for seq {seq}",
    )


def test_downloads_over_https_presenting_the_device_certificate(
    keydir: KeyDir,
    tmp_path: Path,
    pki: tuple[FleetCA, FleetCA, Path],
    two_bundles: tuple[Bundle, Bundle],
    https_agent: Callable[..., tuple[Agent, MemoryLink]],
) -> None:
    fleet, _, ca_pem = pki
    server = ArtifactServer(tls=_server_tls(fleet, tmp_path, "good", client_ca=ca_pem))
    try:
        a, _ = two_bundles
        server.add(a)
        agent, link = https_agent(http_ca_file=ca_pem)
        link.deliver(sign_directive(keydir.key("fleet"), agent.device_id, 1, server.model_ref(a)))
        _wait(link, DS.SERVING, 1)
        assert server.base.startswith("https://") and agent.infer(X).model_sha256 == a.sha256
        assert server.peers and set(server.peers) == {agent.device_id}  # mutual TLS: it showed its cert
    finally:
        server.close()


def test_refuses_a_server_whose_certificate_is_not_from_the_ca(
    keydir: KeyDir,
    tmp_path: Path,
    pki: tuple[FleetCA, FleetCA, Path],
    two_bundles: tuple[Bundle, Bundle],
    https_agent: Callable[..., tuple[Agent, MemoryLink]],
) -> None:
    _, stranger, ca_pem = pki
    impostor = ArtifactServer(tls=_server_tls(stranger, tmp_path, "impostor"))
    try:
        a, _ = two_bundles
        impostor.add(a)
        for config in ({"http_ca_file": ca_pem}, {}):  # the fleet CA, then the system's trust store
            agent, link = https_agent(delivery_retry_s=0.3, **config)
            link.deliver(sign_directive(keydir.key("fleet"), agent.device_id, 1, impostor.model_ref(a)))
            failed = _wait(link, DS.FAILED, 1)
            assert failed.reason == "download_failed", failed
            assert "CERTIFICATE_VERIFY_FAILED" in (failed.detail or ""), failed.detail
            assert agent.running_sha256 is None
        assert not impostor.requests  # not a single request got through the handshake
    finally:
        impostor.close()


def test_tuf_metadata_over_https(
    keydir: KeyDir,
    tmp_path: Path,
    pki: tuple[FleetCA, FleetCA, Path],
    two_bundles: tuple[Bundle, Bundle],
    https_agent: Callable[..., tuple[Agent, MemoryLink]],
) -> None:
    """TUF mode: the release metadata comes over the same verified TLS (python-tuf through our fetcher)."""
    fleet, stranger, ca_pem = pki
    a, _ = two_bundles
    artifacts = ArtifactServer(tls=_server_tls(fleet, tmp_path, "artifacts", client_ca=ca_pem))
    good = TufServer(tmp_path / "www", keydir, tls=_server_tls(fleet, tmp_path, "tuf", client_ca=ca_pem))
    impostor = TufServer(tmp_path / "www2", keydir, tls=_server_tls(stranger, tmp_path, "tuf2"))
    try:
        artifacts.add(a)
        for repo in (good, impostor):
            repo.release(a)
        tuf = {"tuf_root_path": keydir.tuf_root_path, "http_ca_file": ca_pem}
        agent, link = https_agent(tuf_url=good.url, **tuf)
        ref = artifacts.model_ref(a, release=1)
        link.deliver(sign_directive(keydir.key("fleet"), agent.device_id, 1, ref))
        _wait(link, DS.SERVING, 1)
        assert agent.trust_store is not None and agent.trust_store.state.repository_url == good.url
        agent, link = https_agent(tuf_url=impostor.url, delivery_retry_s=0.3, **tuf)
        link.deliver(sign_directive(keydir.key("fleet"), agent.device_id, 1, ref))
        failed = _wait(link, DS.FAILED, 1)
        assert failed.reason == "delivery_unavailable" and agent.running_sha256 is None, failed
    finally:
        for server in (artifacts, good, impostor):
            server.close()


def test_a_missing_ca_file_is_said_when_the_agent_is_built(keydir: KeyDir, tmp_path: Path) -> None:
    cfg = AgentConfig("dev-x", HW, tmp_path / "d", keydir.trust_path, http_ca_file=tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=r"nope\.pem: no such file"):
        Agent(cfg, keydir.trust_root(), link=MemoryLink("dev-x"))


def test_each_fetcher_builds_its_tls_context_once_and_none_for_plain_http(
    pki: tuple[FleetCA, FleetCA, Path], tmp_path: Path
) -> None:
    """A process with many device identities (the simulator, a gateway) keeps one context per
    fetcher: building one per download, as a cache of 8 shared by all did at 1,000 devices, was a
    third of the fleet's CPU. A plain-HTTP URL gets a context that trusts nothing (fails closed)."""
    from device_agent.http_fetcher import HttpFetcher, HttpsSettings

    fleet = pki[0]
    fetchers = []
    for n in range(12):  # more identities than any small shared cache holds
        cert, key = issue_cert(fleet, f"dev-{n}")
        write_cert_and_key(cert, key, tmp_path / f"dev-{n}.crt", tmp_path / f"dev-{n}.key")
        https = HttpsSettings(pki[2], tmp_path / f"dev-{n}.crt", tmp_path / f"dev-{n}.key")
        fetchers.append(HttpFetcher(f"dev-{n}", https))
    first = [f._verify("https://mirror.example/metadata/") for f in fetchers]
    again = [f._verify("https://mirror.example/artifacts/x") for f in fetchers]  # interleaved: A..L, A..L
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert len({id(c) for c in first}) == len(fetchers)  # each device presents its own certificate
    assert all(c.cert_store_stats()["x509_ca"] == 1 for c in first)  # the fleet CA only

    plain = fetchers[0]._verify("http://127.0.0.1:8080/metadata/")
    assert plain.cert_store_stats()["x509_ca"] == 0  # no trust anchors: any TLS use would fail
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname
    assert fetchers[0]._context is first[0]  # the HTTPS context was not replaced by the plain one
