"""Fixtures for the console tests: the fleet server's real server, broker and fake devices
(tests/server/conftest.py), API tokens of each role to sign in with, and all of it as one
``fleet``."""

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.console.helpers import ConsoleFleet, FakeDevice, tokens  # noqa: F401
from tests.server.conftest import (  # noqa: F401
    client,
    fake_device,
    make_server,
    migrated_sqlite,
    server,
)


@pytest.fixture
def fleet(
    server: ServerThread,  # noqa: F811
    client: httpx.Client,  # noqa: F811
    tokens: dict[str, str],  # noqa: F811
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],  # noqa: F811
) -> ConsoleFleet:
    return ConsoleFleet(server, client, tokens, keydir, tmp_path, fake_device)
