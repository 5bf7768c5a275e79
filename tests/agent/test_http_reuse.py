"""An install's downloads reuse its connections, and the agent closes them once it is done.

A real TUF-mode agent (its link in memory) installs two releases from a real mirror
tree (published by the server's publisher) served over keep-alive HTTP/1.1 by a server
that counts the TCP connections it accepts and sees closed. Each install asks for the
release metadata (python-tuf, in a worker thread), the envelope and the model: a client
per request opened three connections per install. Kept between installs, a connection
the server had dropped sat in CLOSE_WAIT holding its local port (10,000 simulated
devices ran the machine out of ports to the mirror).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent import http_clients, protocol
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.http_clients import HttpClients
from device_agent.http_fetcher import HttpFetcher
from device_agent.memory_link import MemoryLink
from edgefleet.broker import free_port
from fleet_server.mirror import BundleSource, DirectoryStorage, Publisher
from signing.keyring import KeyDir
from signing.targets import TargetCustom
from signing.tuf_release import target_name
from signing.tuf_repo import TufRepository
from tests.support.loopback_http import LoopbackServer, QuietFiles

from .harness import HW, Bundle, LoopThread, X, make_bundle, model_ref, sign_directive, unique_id, wait_for

DS = protocol.DeploymentState
NOWHERE = f"http://127.0.0.1:{free_port()}"  # the directive's own URLs: every byte comes from the mirror


class Connections:
    """TCP connections a server accepted, and how many of them the client has closed."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.requests = 0
        self._lock = threading.Lock()

    def handler(self, root: Path) -> Any:
        counts = self

        class KeepAliveFiles(QuietFiles):
            protocol_version = "HTTP/1.1"  # a connection serves requests until the client closes it

            def setup(self) -> None:
                super().setup()
                with counts._lock:
                    counts.opened += 1

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                # As nginx does: an error answer keeps the connection (http.server's closes it,
                # and python-tuf asks for the next root, a 404, on every update).
                body = b"not found\n"
                self.send_response(code, message)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def parse_request(self) -> bool:
                ok = super().parse_request()
                with counts._lock:
                    counts.requests += 1
                return ok

            def finish(self) -> None:
                super().finish()
                with counts._lock:
                    counts.closed += 1

        return functools.partial(KeepAliveFiles, directory=str(root))


@pytest.fixture
def mirror(tmp_path: Path, keydir: KeyDir) -> Iterator[tuple[str, Connections, list[Bundle]]]:
    """Two releases of ``tiny`` in a published mirror tree, served with keep-alive."""
    repo = TufRepository.create(
        tmp_path / "tuf", keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet")
    )
    bundles = [
        make_bundle(tmp_path / "bundles", keydir.key("release"), seed=seed, version=str(seed))
        for seed in (1, 2)
    ]
    for b in bundles:
        custom = TargetCustom(b.name, int(b.version), [HW])
        repo.add_target(target_name(b.name, b.version), b.model_path, custom, keydir.keys("release"))
    repo.publish(keydir.key("fleet"))
    sources = [BundleSource(b.sha256, b.dir, b.file) for b in bundles]
    Publisher(DirectoryStorage(tmp_path / "mirror"), repo.path, lambda: sources).publish()
    counts = Connections()
    with LoopbackServer(counts.handler(tmp_path / "mirror")) as server:
        yield server.url, counts, bundles


@pytest.mark.parametrize("ending", ["stop", "abort"])
def test_an_install_shares_its_connections_and_closes_them_when_done(
    ending: str,
    keydir: KeyDir,
    tmp_path: Path,
    loop_thread: LoopThread,
    mirror: tuple[str, Connections, list[Bundle]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # However slow the machine, the connection outlives the gap between the two installs.
    monkeypatch.setattr(http_clients, "KEEPALIVE_EXPIRY_S", 60.0)
    url, counts, bundles = mirror
    dev = unique_id("reuse")
    config = AgentConfig(
        dev, HW, tmp_path / dev, keydir.trust_path, tuf_root_path=keydir.tuf_root_path, mirrors=[url]
    )
    link = MemoryLink(dev)
    agent = Agent(config, keydir.trust_root(), link=link)
    loop_thread.run(agent.start())
    try:
        for seq, b in enumerate(bundles, start=1):
            ref = model_ref(
                b, model_url=f"{NOWHERE}/m/{b.sha256}", envelope_url=f"{NOWHERE}/e/{b.sha256}", release=seq
            )
            link.deliver(sign_directive(keydir.key("fleet"), dev, seq, ref))
            wait_for(lambda b=b: agent.running_sha256 == b.sha256, 20, f"{b.version} serving")
            # the directive done, its connections are closed while the agent runs on
            wait_for(lambda: counts.closed == counts.opened, 5, f"install {seq}'s connections closed")
            assert agent._own_fetcher is not None and agent._own_fetcher.clients.open_clients == 0
        assert agent.infer(X).model_sha256 == bundles[1].sha256
    finally:
        loop_thread.run(agent.stop() if ending == "stop" else agent.abort())
    # Two installs: TUF metadata (root, timestamp, snapshot, targets), envelope and model each.
    assert counts.requests >= 8, counts.requests
    # Per install, one connection for python-tuf's blocking pool and one for the async pool.
    assert counts.opened == 4, (counts.opened, counts.requests)
    wait_for(lambda: counts.closed == counts.opened, 5, f"the agent's connections closed on {ending}")


def test_fetchers_given_one_pool_share_its_connection_and_only_its_owner_closes_it(
    mirror: tuple[str, Connections, list[Bundle]],
) -> None:
    """A pool passed to two fetchers: both devices' plain-HTTP requests go over one connection (each with
    its own device header); a fetcher's ``aclose`` leaves a pool it was given open."""
    url, counts, bundles = mirror
    clients = HttpClients()
    one, two = HttpFetcher("dev-1", clients=clients), HttpFetcher("dev-2", clients=clients)
    envelope = f"{url}/bundles/{bundles[0].sha256}/envelope"

    async def fetch() -> None:
        first = await one.envelope(envelope)
        assert await two.envelope(envelope) == first
        await one.aclose()  # not its pool: nothing closes
        assert await two.envelope(envelope) == first
        assert clients.open_clients == 1
        await clients.aclose()
        assert clients.open_clients == 0

    asyncio.run(fetch())
    assert (counts.opened, counts.requests) == (1, 3)
    wait_for(lambda: counts.closed == 1, 5, "the pool's connection closed")
