"""Fixtures for the console tests: the fleet server's real server, broker and fake devices
(tests/server/conftest.py), and API tokens of each role to sign in with."""

from tests.console.helpers import tokens  # noqa: F401
from tests.server.conftest import client, fake_device, make_server, migrated_sqlite, server  # noqa: F401
