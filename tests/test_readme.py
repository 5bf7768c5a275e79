"""README.md's "The loop by hand", run as written: its ``sh`` blocks, in order, in one bash, in an
empty directory, with the project's venv first on PATH and no EDGEFLEET_* variable set.

So the README cannot drift from the product: a renamed option, a changed default, a step that no
longer works fails here. The blocks start a production broker, the server and a simulated fleet in
the background and stop them in their last block; whatever is left of them is killed with the
script's process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.broker import mosquitto_binary
from signing.keyring import SERVER_FILES
from signing.keys import is_encrypted_pem

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## The loop by hand"
PORTS = (8080, 8883, 8884)  # the ones the README names: the server, the devices' and the server's listeners
DEVICES = 20
# Runs of this test by different checkouts on one machine take turns: the ports are fixed.
LOCK = Path(tempfile.gettempdir()) / "edgefleet-readme-loop.lock"
LOCK_WAIT_S = 300.0
SCRIPT_TIMEOUT_S = 240.0


def loop_blocks(readme: str) -> list[str]:
    """The ``sh`` code blocks of the README's loop section, in order."""
    if SECTION not in readme:
        raise AssertionError(f"README.md has no {SECTION!r} section")
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)


def test_the_loop_section_has_the_steps_a_new_user_needs() -> None:
    """The section the other test runs: every step of the loop is in it, nothing is a placeholder."""
    script = "\n".join(loop_blocks(README.read_text()))
    for step in (
        "edgefleet examples digits",
        "edgefleet keys init",
        "edgefleet compile",
        "edgefleet broker run",
        "edgefleet server",
        "edgefleet sim fleet",
        "edgefleet models push",
        "edgefleet rollouts create",
        "--watch",
        "devices list --json",
    ):
        assert step in script, step
    assert not re.search(r"<[a-z][a-z _-]*>", script), "a placeholder such as <port> in the loop"
    assert "--insecure" not in script  # the loop is the production configuration


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    with open(LOCK, "w") as fh:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"another run of the README loop held {LOCK} for {LOCK_WAIT_S:.0f} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End whatever the script left running (its process group: broker, Mosquitto, server, fleet)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.timeout(LOCK_WAIT_S + SCRIPT_TIMEOUT_S + 60)  # waiting its turn, then the loop itself
def test_the_readme_loop_runs_as_written(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (the README asks for it)")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (the README asks for it)")
    script = "set -eu -o pipefail\n" + "\n".join(loop_blocks(README.read_text()))
    (tmp_path / "loop.sh").write_text(script)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with _machine_lock():
        taken = [p for p in PORTS if _port_taken(p)]
        if taken:
            pytest.skip(f"port(s) {taken} on 127.0.0.1 are in use by another process; the README needs them")
        started = time.monotonic()
        with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
            proc = subprocess.Popen(
                ["bash", str(tmp_path / "loop.sh")],
                cwd=work,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: everything it starts ends with it
            )
            try:
                code = proc.wait(SCRIPT_TIMEOUT_S)
                left = [p for p in PORTS if _port_taken(p)]  # what its last block did not stop
            except subprocess.TimeoutExpired:
                code, left = None, []
            finally:
                _kill_group(proc)
                proc.wait()
        wall = time.monotonic() - started
    stdout = (tmp_path / "stdout").read_text(errors="replace")
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    server_log = (work / "server.log").read_text(errors="replace") if (work / "server.log").exists() else ""
    context = f"exit {code} after {wall:.1f} s\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
    # the server's warnings and errors first (a stall shows there), then the log's tail
    noted = [
        line for line in server_log.splitlines() if '"level": "warning"' in line or '"level": "error"' in line
    ]
    context += "\n--- server.log warnings and errors\n" + "\n".join(line[:400] for line in noted[:30])
    context += f"\n--- server.log\n{server_log[-3000:]}"
    assert code == 0, context
    print(f"README loop: {wall:.1f} s wall")
    # the rollout completed (`--watch` in a pipe: one line per change; it exits 1 otherwise)
    assert "state: completed, stage 3/3" in stdout, context
    # `devices list --json`, the last output: every device serves digits:1 and proved it
    devices = json.loads(stdout[stdout.rindex("\n[\n") + 1 :])
    assert len(devices) == DEVICES
    assert all(
        d["running_model"]["name"] == "digits" and d["running_model"]["version"] == "1" for d in devices
    )
    assert {d["deployment_state"] for d in devices} == {"serving"}
    # the server was handed its own keys only, the fleet key encrypted
    assert sorted(os.listdir(work / "server-keys")) == sorted(SERVER_FILES)
    assert is_encrypted_pem((work / "server-keys" / "fleet.key").read_bytes())
    # and nothing the loop started outlived its last block
    assert not left, f"still listening after the loop's last block: {left}"
