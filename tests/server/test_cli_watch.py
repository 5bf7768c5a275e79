"""`edgefleet rollouts status --watch` as a real process against a real server and real MQTT.

Piped: one newline-terminated line per change, stages numbered as the engine's reasons
number them, and the exit code says how the rollout ended. On a terminal (a pty): the
live view redraws in place and ends on the final state.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import httpx

from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import FakeDevice, wait_for
from .test_rollout_flow import directed, directives, serve, status
from .test_rollout_ops import create, fleet_on_old_model

EXE = str(Path(sys.executable).parent / "edgefleet")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def watch(server: ServerThread, rid: str, **popen: object) -> subprocess.Popen[str]:
    args = [EXE, "rollouts", "status", rid, "--watch", "--interval", "0.1", "--server", server.url]
    return subprocess.Popen(args, text=True, **popen)  # type: ignore[call-overload, no-any-return]


def test_watch_piped_prints_one_line_per_change_and_exits_1_on_rollback(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "wp", 4)
    rid = create(client, "wp", stages=[50, 100], min_inferences=20, max_error_rate=0.1, soak_seconds=30)
    proc = watch(server, rid, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    seen = ""  # the watcher's first state line, before any device acts (it starts slowly under load)
    while not seen.endswith("\n") or "state: " not in seen:
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=10)
        seen += line
    notified = directed(devs.values(), keydir, 2)
    serve(notified[0], directives(notified[0], keydir)[-1], inferences=10)
    wait_for(lambda: status(client, rid)["devices"][notified[0].device_id] == "done")
    time.sleep(0.5)  # most often the watcher sees this state before the next change
    serve(notified[1], directives(notified[1], keydir)[-1], inferences=10, errors=10)
    rest, errors = proc.communicate(timeout=60)
    out = seen + rest

    assert proc.returncode == 1, (out, errors)
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    state_lines = [line for line in lines if line.startswith("state: ")]
    decisions = [line for line in lines if line.startswith("decision: ")]
    assert len(state_lines) + len(decisions) == len(lines), lines  # nothing else: no spinner, no table
    # one line per change: never the same state line twice in a row, and each decision once
    assert all(a != b for a, b in pairwise(state_lines)), state_lines
    assert len(decisions) == len(set(decisions))
    final = status(client, rid)
    assert len(decisions) == len(final["decisions"])
    # stages are 1-based, as the engine's reasons say them
    assert state_lines[0].startswith("state: running, stage 1/2, devices: ")
    assert "decision: assign: stage 1/2: notify 2 device(s)" in decisions
    assert "stage 0/" not in out
    assert state_lines[-1].startswith("state: rolled_back, stage 1/2, devices: ")
    assert "rolled_back=2" in state_lines[-1]
    # the reason is one line on stderr
    assert errors.count("\n") == 1 and errors.startswith(
        f"error: rollout {rid} ended rolled_back: roll_back:"
    )


def test_watch_exits_0_when_completed_and_1_when_aborted(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "wc", 2)
    rid = create(client, "wc", stages=[100], min_inferences=1)
    proc = watch(server, rid, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for dev in devs.values():
        serve(dev, wait_for(lambda dev=dev: directives(dev, keydir))[-1], inferences=2)  # type: ignore[misc]
    out, errors = proc.communicate(timeout=60)
    assert proc.returncode == 0 and errors == "", errors
    assert out.splitlines()[-1] == "state: completed, stage 1/1, devices: done=2"

    # a second rollout (back to the first model) aborted by hand: the watch says so and exits 1
    rid2 = client.post(
        "/api/v1/rollouts",
        json={"model": "det:1", "selector": {"tags": {"site": "wc"}}, "soak_seconds": 60},
    ).json()["id"]
    proc = watch(server, rid2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: status(client, rid2)["devices"] and True)
    assert client.post(f"/api/v1/rollouts/{rid2}/abort").status_code == 200
    out, errors = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out.splitlines()[-1].startswith("state: aborted, stage 1/1")
    assert errors.startswith(f"error: rollout {rid2} ended aborted: abort:")


def test_watch_on_a_terminal_is_a_live_view(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "wt", 2)
    rid = create(client, "wt", stages=[50, 100], min_inferences=1)
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "40", "TERM": "xterm-256color"}
    proc = watch(server, rid, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    screen = read_pty(master, until=b"last decisions:")  # the first frame, before any device acts
    first = directed(devs.values(), keydir, 1)[0]
    serve(first, directives(first, keydir)[-1], inferences=2)
    (second,) = directed(devs.values(), keydir, 1, exclude=[first])
    serve(second, directives(second, keydir)[-1], inferences=2)
    screen += read_pty(master)
    os.close(master)
    raw = screen.decode(errors="replace")
    assert proc.wait(10) == 0, raw
    assert "\x1b[1A" in raw or "\x1b[2K" in raw  # redrawn in place (cursor up / erase line), not appended
    text = ANSI.sub("", raw)
    assert f"rollout {rid} of det:2" in text and "last decisions:" in text
    assert "stage 2 (100%)" in text and "completed" in text
    assert "done=" not in text  # the pipe's lines are not what a terminal shows


def wait_readable(fd: int, timeout: float) -> bool:
    """poll(), not select(): a long session may hold descriptors past FD_SETSIZE."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(timeout * 1000))


def read_pty(master: int, until: bytes | None = None, timeout: float = 60) -> bytes:
    """What the terminal got: up to ``until`` (or until the child closes it)."""
    screen = b""
    deadline = time.monotonic() + timeout
    while until is None or until not in screen:
        if time.monotonic() > deadline:
            raise AssertionError(screen.decode(errors="replace"))
        if not wait_readable(master, 0.2):
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        screen += chunk
    return screen
