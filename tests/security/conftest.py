"""Fixtures for the attack suite: a served TUF repository and a device pinned to its root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.agent import Agent
from signing.keyring import KeyDir, init_keys
from signing.tuf_repo import TufRepository
from tests.agent.harness import ArtifactServer, LoopThread, Observer, agent_config, start_agent, unique_id
from tests.security.agent_harness import Fleet
from tests.security.delivery_harness import Delivery
from tests.security.production_site import mosquitto_reachable_dir
from tests.support.loopback_http import file_server, serve_directory


@pytest.fixture
def site_root() -> Iterator[Path]:
    """A directory for a production site (:mod:`tests.security.production_site`)."""
    with mosquitto_reachable_dir("ef-site-") as d:
        yield d


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory and the URL a real HTTP server serves it at."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_directory(root) as url:
        yield root, url


@pytest.fixture
def delivery(tmp_path: Path, http_root: tuple[Path, str]) -> Delivery:
    root_dir, url = http_root
    init_keys(tmp_path / "keys")
    keydir = KeyDir(tmp_path / "keys")
    repo = TufRepository.create(root_dir, keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet"))
    return Delivery(keydir, repo, url, tmp_path, keydir.tuf_root(), tmp_path / "device-cache")


@pytest.fixture
def fleet(tmp_path: Path, broker_info: Any) -> Iterator[Fleet]:
    """A TUF-mode agent on a real broker, serving release 1 of ``tiny``, its repository over real HTTP."""
    init_keys(tmp_path / "keys")
    keydir = KeyDir(tmp_path / "keys")
    www = tmp_path / "www"
    www.mkdir()
    repo = TufRepository.create(www, keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet"))
    served = file_server(www)
    url = served.url
    artifacts = ArtifactServer()
    observer = Observer(broker_info)
    loop = LoopThread()
    device = unique_id("sec")
    config = agent_config(
        broker_info,
        tmp_path / "device",
        keydir.trust_path,
        device,
        tuf_root_path=keydir.tuf_root_path,
        tuf_url=url,
    )
    agent = Agent(config, keydir.trust_root())
    f = Fleet(keydir, repo, url, artifacts, observer, loop, agent, tmp_path, serving=None)  # type: ignore[arg-type]
    try:
        start_agent(loop, agent)
        first = f.bundle(seed=1, version="1")
        f.release(first)
        f.installs(first, f.direct(first))
        yield f
    finally:
        loop.run(agent.stop())
        if f.agent is not agent:  # a test that restarted the device: stop the agent it left running
            loop.run(f.agent.stop())
        loop.close()
        observer.close()
        artifacts.close()
        served.close()
