"""Debian's Chromium for the browser tests: found, installed with apt-get where this machine
allows it (root, apt-get present, EDGEFLEET_NO_APT unset), or a skip saying why.

Playwright drives this system browser (``executable_path``); it never downloads one of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.debian import apt_install

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
"""Where the browser tests leave their screenshots (gitignored); docs/console.md shows copies."""


def _found() -> str | None:
    return next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


def chromium() -> str:
    """The path of Debian's Chromium, installing it when it is missing and that is possible."""
    found = _found()
    if found is None:
        why = apt_install("chromium")
        found = _found()
        if found is None:
            pytest.skip(f"chromium is not installed (Debian: apt-get install chromium): {why or 'not found'}")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return found


def launch_args() -> list[str]:
    """Chromium refuses its sandbox as root (containers, CI): run it without there only."""
    return ["--no-sandbox"] if os.geteuid() == 0 else []


__all__ = ["ARTIFACTS", "chromium", "launch_args"]
