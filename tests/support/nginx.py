"""A real nginx for tests: Debian's package, installed through :mod:`tests.support.debian` when
missing, launched by :func:`edgefleet.nginx.start_nginx` (its own prefix, pid, logs and config on a
free port) and stopped at the end of the ``with`` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgefleet.nginx import Nginx, nginx_binary, start_nginx
from tests.support.debian import apt_install


def need_nginx() -> None:
    """Install nginx if it is missing; skip (with the reason) only where that is impossible."""
    if nginx_binary() is None:
        why = apt_install("nginx")
        if why or nginx_binary() is None:
            pytest.skip(f"nginx is needed and could not be installed: {why or 'not found after install'}")


@contextmanager
def nginx(root: Path | None, **options: Any) -> Iterator[Nginx]:
    """``start_nginx(root, **options)`` for the ``with`` block."""
    need_nginx()
    server = start_nginx(root, **options)
    try:
        yield server
    finally:
        server.stop()
