from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent.agent import Agent
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import ArtifactServer, Bundle, LoopThread, Observer, agent_config, make_bundle, start_agent


@pytest.fixture
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    yield server
    server.close()


@pytest.fixture
def observer(broker_info: BrokerInfo) -> Iterator[Observer]:
    obs = Observer(broker_info)
    yield obs
    obs.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def bundles_dir(tmp_path: Path) -> Path:
    return tmp_path / "bundles"


@pytest.fixture
def two_bundles(tmp_path: Path, keydir: KeyDir, artifacts: ArtifactServer) -> tuple[Bundle, Bundle]:
    """Two release-signed models served by ``artifacts``: ``tiny`` v1 (seed 1) and v2 (seed 2)."""
    release = keydir.key("release")
    a = make_bundle(tmp_path / "b", release, seed=1)
    b = make_bundle(tmp_path / "b", release, seed=2, version="2")
    artifacts.add(a)
    artifacts.add(b)
    return a, b


@pytest.fixture
def running_agent(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread
) -> Iterator[Callable[..., Agent]]:
    """``running_agent(device_id, **config)``: an Agent on ``loop_thread``, connected to the
    broker, data in ``tmp_path / device_id``; every one started is stopped at teardown."""
    started: list[Agent] = []

    def start(device_id: str, **config: object) -> Agent:
        cfg = agent_config(broker_info, tmp_path / device_id, keydir.trust_path, device_id, **config)
        agent = start_agent(loop_thread, Agent(cfg, keydir.trust_root()))
        started.append(agent)
        return agent

    yield start
    for agent in started:
        loop_thread.run(agent.stop())
