"""The shared harness pieces do what the suite relies on: ``wait_for`` returns the first truthy
value and fails naming what it awaited (at once when the watched process exited), and the
loopback file server serves a directory quietly and releases its port on close."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.loopback_http import file_server, serve_directory
from tests.support.waiting import exited_output, wait_for


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = iter([0, [], "ready", "later"])
    assert wait_for(lambda: next(calls), 5, "ready", interval=0.001) == "ready"


def test_wait_for_names_what_it_waited_for_and_the_last_ignored_error() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError("nobody listens")

    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the API \(last: Connection"):
        wait_for(refused, 0.2, "the API", interval=0.01, ignore=(OSError,))


def test_wait_for_fails_at_once_when_the_process_exits() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "print('bad config'); raise SystemExit(3)"], stdout=subprocess.PIPE
    )
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)exited with 3 before /healthz:\nbad config"):
        wait_for(lambda: False, 60, "/healthz", proc=proc, output=lambda: exited_output(proc))
    assert time.monotonic() - start < 30  # not the 60 s deadline


def test_file_server_serves_the_directory_and_frees_its_port(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "timestamp.json").write_bytes(b'{"signed": {}}')
    with serve_directory(tmp_path) as url:
        assert httpx.get(f"{url}/metadata/timestamp.json").content == b'{"signed": {}}'
        assert httpx.get(f"{url}/metadata/missing.json").status_code == 404
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "GET /metadata" not in capfd.readouterr().err  # no access log in the test output
    server = file_server(tmp_path)
    server.close()
    server.close()  # a second close (a fixture's finally after the test closed it) is harmless
