"""Prometheus' Debian tools for the monitoring tests: found, installed with apt-get where this
machine allows it (root, apt-get present, EDGEFLEET_NO_APT unset), or a skip saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache

import pytest

PACKAGES = ("prometheus", "prometheus-alertmanager")
TOOLS = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
}


@cache
def _install() -> str:
    """'' when installed, else why not."""
    if os.environ.get("EDGEFLEET_NO_APT"):
        return "EDGEFLEET_NO_APT is set"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "no apt-get, or not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return "" if done.returncode == 0 else f"apt-get install failed: {done.stderr.strip()[-200:]}"


def tool(name: str) -> str:
    """The path of ``name``, installing its Debian package when it is missing and that is possible."""
    found = shutil.which(name)
    if found is None:
        why = _install()
        found = shutil.which(name)
        if found is None:
            why = why or "not found after install"
            pytest.skip(f"{name} is not installed (Debian: apt-get install {TOOLS[name]}): {why}")
    return found
