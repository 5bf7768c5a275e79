"""The server fixtures of tests/server (a real server thread, real Mosquitto, fake devices), shared."""

from tests.server.conftest import (  # noqa: F401
    client,
    fake_device,
    fresh_pg,
    make_server,
    migrated_sqlite,
    server,
)
