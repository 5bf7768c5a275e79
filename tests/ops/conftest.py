"""The server fixtures of tests/server (a real server thread, real Mosquitto, fake devices), shared."""

from tests.server.conftest import client, fake_device, fresh_pg, make_server, server  # noqa: F401
