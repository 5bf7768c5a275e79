"""The server child process serves on a socket its parent bound: the port is never free between
being chosen and served on, nor while the server restarts on it."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from device_agent.config import BrokerInfo
from edgefleet.sim_harness import ServerPort, ServerProcess
from signing.keyring import KeyDir

from .conftest import server_settings


def _bindable(port: int) -> bool:
    """Whether another socket could take ``port``, as uvicorn or Mosquitto would (SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_child_serves_on_the_inherited_socket_and_the_port_stays_held(
    tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo
) -> None:
    # no ingest worker processes: this test is about the port, not the streams
    settings = server_settings(tmp_path, keydir, broker_info, ingest_workers=0)
    port = ServerPort()
    first = second = None
    try:
        assert not _bindable(port.port) and _refused(port.port)  # held, not yet served
        first = ServerProcess(settings, port, tmp_path / "server.log").spawn()
        first.wait_imported()
        assert not _bindable(port.port) and _refused(port.port)  # the child's imports are done
        first.start()
        assert httpx.get(f"{first.url}/healthz", timeout=5).status_code == 200
        # a restart on the same port: the successor imports while the first one serves
        second = ServerProcess(settings, port, tmp_path / "server.log").spawn()
        second.wait_imported()
        assert httpx.get(f"{first.url}/healthz", timeout=5).status_code == 200
        first.stop()
        # down: still nobody else's port; a request sent now waits for the next server
        assert not _bindable(port.port)
        waiting = socket.create_connection(("127.0.0.1", port.port), timeout=30)
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second.start()
        assert waiting.recv(64).startswith(b"HTTP/1.1 200")
        waiting.close()
        assert httpx.get(f"{second.url}/healthz", timeout=5).status_code == 200
        second.stop()
        assert not _bindable(port.port)
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        port.close()
    assert _bindable(port.port)  # given back once closed
