"""Loopback ports for servers started by the demo, the simulator, the benches and the tests.

A port picked by binding port 0 and closing the socket (:func:`free_port`) is free only at that
moment: another process (another test worker) can bind it before the server does. Two cures:

* a server that accepts an inherited socket gets one bound here first (:func:`bound_socket`):
  nothing can take the port between choosing it and serving on it;
* an external program that takes its port from its configuration is started by
  :func:`launch` and :func:`start_on_free_port`: when the program reports the port in use, it
  is started again on a new port (bounded attempts), so a lost race costs a restart, not a run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

__all__ = [
    "PortTaken",
    "address_in_use",
    "bound_socket",
    "free_port",
    "launch",
    "owns_listener",
    "start_on_free_port",
    "wait_for_port",
]

T = TypeVar("T")

# How programs say it: Mosquitto and Python ("Address already in use"), Go ("bind: address
# already in use"), nginx ("(98: Address already in use)").
_IN_USE = ("address already in use", "eaddrinuse")


class PortTaken(RuntimeError):
    """Another process bound a port chosen for a server between choosing it and binding it."""


def free_port() -> int:
    """A loopback port free at this moment (see the module docstring for why that is not enough)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bound_socket(host: str = "127.0.0.1", listen: bool = False) -> socket.socket:
    """A TCP socket bound to a free port on ``host``, inheritable, to hand to the server that serves
    on it. No SO_REUSEADDR: while it is held, no other socket can bind the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.set_inheritable(True)
        if listen:
            sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def address_in_use(output: str) -> bool:
    """Whether a program's output says it could not bind because the address was taken."""
    text = output.lower()
    return any(marker in text for marker in _IN_USE)


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, alive: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts connections; give up early once ``alive`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline or (alive is not None and alive.poll() is not None):
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.01)


def listening_inodes(
    port: int, tables: Sequence[Path] = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
) -> set[str]:
    """The socket inodes listening on TCP ``port`` (any address), from Linux's socket tables."""
    found: set[str] = set()
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st ... inode: st 0A is LISTEN
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


def owns_listener(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on ``port``: the proof that a server which
    answers there is this one and not another process that took the port first. ``None`` where
    the system does not tell (no /proc)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    if not Path("/proc/net/tcp").exists() or not fd_dir.exists():
        return None
    inodes = listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # not ours to look at
        return None
    links = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # closed since listed (listdir's own descriptor, say)
            links.add(os.readlink(fd_dir / fd))
    return any(f"socket:[{inode}]" in links for inode in inodes)


def launch(
    cmd: Sequence[str],
    log_path: Path,
    ports: Sequence[int],
    *,
    ready: Callable[[], bool] | None = None,
    timeout: float = 30.0,
    settle: float = 0.05,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Run ``cmd`` (output to ``log_path``) until it listens on every port in ``ports`` and ``ready()``
    says so, and make sure the listener is OURS; the process and its open log (close it after the
    process ends).

    "Something answers on the port" is no proof: when another process took the port first, that
    one answers while ours fails to bind and exits. So the program must hold the listening socket
    itself (:func:`owns_listener`; where the system cannot tell, still run ``settle`` seconds after
    it looked ready). If it exited and its output says the address was in use,
    :class:`PortTaken` (the caller picks new ports: :func:`start_on_free_port`); any other failure
    is a ``RuntimeError`` with the output's tail."""
    name = what or Path(cmd[0]).name
    # only this start's output counts: an earlier attempt's "address in use" is in the same log
    offset = log_path.stat().st_size if log_path.exists() else 0
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        for port in ports:
            wait_for_port("127.0.0.1", port, timeout=max(0.0, deadline - time.monotonic()), alive=proc)
            while owns_listener(proc.pid, port) is False:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError
                time.sleep(0.02)
        while ready is not None and not _safely(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.05)
        time.sleep(settle)  # a listener that failed to bind makes the program exit within moments
        if proc.poll() is not None:
            raise TimeoutError
    except BaseException as exc:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        if not isinstance(exc, TimeoutError):
            raise
        with open(log_path, "rb") as written:
            written.seek(offset)
            tail = written.read().decode(errors="replace")[-2000:]
        if address_in_use(tail):
            raise PortTaken(tail) from None
        raise RuntimeError(f"{name} did not start: {tail}") from None
    return proc, log


def _safely(ready: Callable[[], bool]) -> bool:
    try:
        return ready()
    except Exception:
        return False


def start_on_free_port(start: Callable[[], T], chosen: bool = True, attempts: int = 5) -> T:
    """``start()``, which picks its ports itself; when one of them was taken (:class:`PortTaken`),
    again with new ones, up to ``attempts`` times. ``chosen=False``: the caller fixed the ports,
    so a taken port is the caller's error and is raised at once."""
    for attempt in range(attempts):
        try:
            return start()
        except PortTaken:
            if not chosen or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
