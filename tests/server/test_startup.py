"""The server at start: it waits for a database that is not up yet (a deployment starts both
together) and for a broker that is not up yet, instead of exiting."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from edgefleet.broker import Broker, start_secure_broker
from edgefleet.ports import bound_socket
from fleet_server.runner import ServerThread
from fleet_server.store import until_reachable
from signing.keyring import KeyDir

from .conftest import server_settings, wait_for


class Forwarder:
    """A TCP forwarder that starts listening only when asked: the database "comes up" then. Its
    port is bound from the start (refused until then, and nobody else's in the meantime)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._sock = bound_socket()
        self.port = int(self._sock.getsockname()[1])
        self._open: list[socket.socket] = []

    def start(self) -> None:
        self._sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._sock.accept()
                upstream = socket.create_connection(self.upstream)
                self._open += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        for s in [*self._open, self._sock]:
            with contextlib.suppress(OSError):
                s.close()


def _start_in_background(settings: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["server"] = ServerThread(settings).start()
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.postgres
def test_the_server_waits_for_a_database_that_comes_up_late(
    pg_url: str, tmp_path: Path, keydir: KeyDir, broker_info: Any
) -> None:
    url = make_url(pg_url)
    forwarder = Forwarder((url.host or "127.0.0.1", url.port or 5432))
    late = url.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
    settings = server_settings(tmp_path, keydir, broker_info, database_url=late, startup_retry_seconds=60)
    thread, box = _start_in_background(settings)
    try:
        time.sleep(2.0)
        assert thread.is_alive() and not box, box  # still waiting, not given up
        forwarder.start()
        thread.join(60)
        assert "error" not in box, box.get("error")
        srv: ServerThread = box["server"]
        try:
            assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        finally:
            srv.stop()
    finally:
        forwarder.stop()


def test_a_database_that_stays_down_ends_the_wait_with_its_error() -> None:
    calls: list[float] = []

    def refused() -> None:
        calls.append(time.monotonic())
        raise OperationalError("connect", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        until_reachable(refused, 0.0)
    assert len(calls) == 1  # no budget: one attempt
    slept: list[float] = []
    with pytest.raises(OperationalError):
        until_reachable(refused, 1.2, sleep=lambda s: (slept.append(s), time.sleep(s)))
    assert len(calls) >= 3 and 1.0 <= sum(slept) <= 1.3
    refusing: list[int] = []

    def wrong_password() -> None:
        refusing.append(1)
        raise OperationalError("connect", {}, Exception('password authentication failed for user "x"'))

    with pytest.raises(OperationalError):
        until_reachable(wrong_password, 30.0)
    assert refusing == [1]  # reachable and refused: no retry


@pytest.fixture
def late_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = start_secure_broker(tmp_path / "broker")
    broker.stop()  # its files stay: the server's credentials, the ports it will come back on
    yield broker


def test_the_server_starts_before_its_broker_and_connects_when_it_comes_up(
    tmp_path: Path, keydir: KeyDir, late_broker: Broker
) -> None:
    info = late_broker.info
    settings = server_settings(tmp_path, keydir, info, ingest_workers=2)  # workers connect late too
    srv = ServerThread(settings).start()  # the broker is down: the API serves anyway
    try:
        assert srv.context.bridge is not None and not srv.context.bridge.subscribed.is_set()
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        again = start_secure_broker(
            late_broker.workdir,  # type: ignore[attr-defined]
            port=info.port,
            server_port=info.server_port,  # type: ignore[attr-defined]
            keys_dir=info.keys_dir,  # type: ignore[attr-defined]
        )
        try:
            wait_for(srv.context.bridge.subscribed.is_set, 30)
        finally:
            again.stop()
    finally:
        srv.stop()
