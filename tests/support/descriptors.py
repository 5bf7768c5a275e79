"""Counting this process's open file descriptors, for the per-module leak check in ``tests/conftest.py``.

The warning class lives here, in an importable module, because pytest-xdist sends a worker's
warnings to the controller by the class's module and name: a class defined in a ``conftest``
resolves there to whichever ``conftest`` module was imported last, and the controller crashes.
"""

from __future__ import annotations

import contextlib
import os

PROC_FDS = "/proc/self/fd"


class FileDescriptorLeak(UserWarning):
    """A test module left file descriptors open: leaked across a long session they pass 1024,
    where select() fails and the process's limit comes close."""


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each points at (a path, socket:[inode], pipe:[...])."""
    fds: dict[int, str] = {}
    for name in os.listdir(PROC_FDS):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            fds[int(name)] = os.readlink(f"{PROC_FDS}/{name}")
    return fds
