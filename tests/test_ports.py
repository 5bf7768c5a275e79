"""Starting an external server on a free port when another process can take that port first."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import edgefleet.ports as ports
from edgefleet.ports import PortTaken, address_in_use, launch, start_on_free_port


@pytest.fixture
def squatter() -> Iterator[int]:
    """A port another process holds and listens on, as another test worker's server would."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield int(sock.getsockname()[1])
    sock.close()


def http_server(tmp_path: Path, port: int) -> tuple[list[str], Path]:
    """A real program that takes its port on the command line and exits when it cannot bind it."""
    return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], tmp_path / "http.log"


def test_a_port_taken_before_the_server_binds_costs_a_restart_on_a_new_port(
    tmp_path: Path, squatter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([squatter])
    real = ports.free_port
    monkeypatch.setattr(ports, "free_port", lambda: next(picks, None) or real())
    tried: list[int] = []

    def start() -> tuple[object, int]:
        port = ports.free_port()
        tried.append(port)
        cmd, log = http_server(tmp_path, port)
        # the squatter answers at once; only a listener the started process holds is its own
        proc, out = launch(cmd, log, [port])
        out.close()
        return proc, port

    proc, port = start_on_free_port(start)
    try:
        assert tried[0] == squatter and port != squatter and len(tried) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    finally:
        proc.kill()  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]


def test_without_a_new_port_the_taken_one_is_reported(tmp_path: Path, squatter: int) -> None:
    cmd, log = http_server(tmp_path, squatter)
    with pytest.raises(PortTaken):
        start_on_free_port(lambda: launch(cmd, log, [squatter]), chosen=False)


def test_other_start_failures_are_not_taken_for_a_lost_race(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "raise SystemExit('no config')"]
    with pytest.raises(RuntimeError, match="no config") as failed:
        start_on_free_port(lambda: launch(cmd, tmp_path / "x.log", [ports.free_port()], timeout=5))
    assert not isinstance(failed.value, PortTaken)


@pytest.mark.parametrize(
    "line",
    [
        "1733500000: Error: Address already in use",  # mosquitto
        'err="listen tcp 127.0.0.1:9090: bind: address already in use"',  # Go: prometheus, alertmanager
        "bind() to 127.0.0.1:8080 failed (98: Address already in use)",  # nginx
        "OSError: [Errno 98] Address already in use",  # Python
    ],
)
def test_programs_saying_the_address_is_in_use_are_recognised(line: str) -> None:
    assert address_in_use(line)
    assert not address_in_use("permission denied")


def test_a_listener_is_told_from_the_process_that_holds_it(squatter: int) -> None:
    assert ports.owns_listener(os.getpid(), squatter) is True
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as other:
        try:
            assert ports.owns_listener(other.pid, squatter) is False
        finally:
            other.kill()
