from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.broker import BrokerInfo

from .harness import ArtifactServer, LoopThread, Observer


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
