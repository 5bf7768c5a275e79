"""Poll a condition until it holds, failing with what was awaited.

Tests wait on real brokers, servers and processes, so they poll instead of sleeping a
fixed time: a poll returns as soon as the condition holds, and the deadline is only
reached on a hang, which the message then names.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
    proc: subprocess.Popen[Any] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
    output: Callable[[], str] | None = None,
) -> Any:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; return that.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds, or at once when
    ``proc`` (a process the condition depends on) has exited, with its exit code: a server
    that crashed at start-up fails the test now, not after the deadline. Exceptions of the
    types in ``ignore`` mean "not yet" (a server still starting refuses connections).
    ``output``, called only when the wait fails, adds what explains the failure (a log's tail).
    """
    deadline = time.monotonic() + timeout
    last = ""  # the last exception ``ignore`` let pass, named if the wait fails
    while True:
        try:
            value = predicate()
        except ignore as exc:
            value, last = None, f" (last: {type(exc).__name__}: {exc})"
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(_message(f"exited with {proc.returncode} before {what}{last}", output))
        if time.monotonic() > deadline:
            raise AssertionError(_message(f"timed out after {timeout:g}s waiting for {what}{last}", output))
        time.sleep(interval)


def exited_output(proc: subprocess.Popen[Any], limit: int = 4000) -> str:
    """The last ``limit`` characters an exited process wrote to its pipes; empty while it runs,
    since reading a live process's pipe would block the test (pass as ``output``)."""
    if proc.poll() is None:
        return ""
    out, err = proc.communicate()
    text = "".join(s.decode(errors="replace") if isinstance(s, bytes) else s for s in (out, err) if s)
    return text[-limit:]


def _message(head: str, output: Callable[[], str] | None) -> str:
    return f"{head}:\n{output()}" if output is not None else head
