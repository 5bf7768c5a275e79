"""Debian's Chromium for the browser tests: found, installed with apt-get where this machine
allows it (root, apt-get present, EDGEFLEET_NO_APT unset), or a skip saying why.

Playwright drives this system browser (``executable_path``); it never downloads one of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
"""Where the browser tests leave their screenshots (gitignored); docs/console.md shows copies."""


def _found() -> str | None:
    return next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


@cache
def _install() -> str:
    """'' when installed, else why not."""
    if os.environ.get("EDGEFLEET_NO_APT"):
        return "EDGEFLEET_NO_APT is set"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "no apt-get, or not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return "" if done.returncode == 0 else f"apt-get install failed: {done.stderr.strip()[-200:]}"


def chromium() -> str:
    """The path of Debian's Chromium, installing it when it is missing and that is possible."""
    found = _found()
    if found is None:
        why = _install()
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
