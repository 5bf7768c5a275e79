"""What a test did to ``sys.stdout`` and ``sys.stderr``, for the per-test check in ``tests/conftest.py``.

Between tests they are pytest's capture files, shared by every test of the worker. A test (or a
thread it left running) that closes one, or leaves another object in its place, breaks pytest's
capture for the rest of the worker: every later test then errors at setup and teardown with
``ValueError: I/O operation on closed file``, far from the cause.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

NAMES = ("stdout", "stderr")


def std_streams() -> dict[str, TextIO | None]:
    return {name: getattr(sys, name) for name in NAMES}


def is_closed(stream: Any) -> bool:
    """Closed, or unusable because the object under it is (a text wrapper whose buffer was closed)."""
    try:
        return bool(stream.closed)
    except (AttributeError, ValueError):
        return stream is not None


def describe(stream: Any) -> str:
    return f"{type(stream).__module__}.{type(stream).__qualname__} at {id(stream):#x}" + (
        " (closed)" if is_closed(stream) else ""
    )


def damage(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """How ``after`` (the streams now) differs from ``before`` (at the test's start): one line a stream
    left closed or replaced; empty when both are as the test found them."""
    found = []
    for name in NAMES:
        was, now = before[name], after[name]
        if now is not was:
            found.append(f"sys.{name} was {describe(was)}, is now {describe(now)}")
        elif is_closed(now):
            found.append(f"sys.{name} ({describe(now)}) was closed")
    return found
