"""Prometheus' Debian tools for the monitoring tests: found, installed with apt-get where this
machine allows it (root, apt-get present, EDGEFLEET_NO_APT unset), or a skip saying why."""

from __future__ import annotations

import shutil

import pytest

from tests.support.debian import apt_install

PACKAGES = ("prometheus", "prometheus-alertmanager")
TOOLS = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
}


def tool(name: str) -> str:
    """The path of ``name``, installing its Debian package when it is missing and that is possible."""
    found = shutil.which(name)
    if found is None:
        why = apt_install(*PACKAGES)
        found = shutil.which(name)
        if found is None:
            why = why or "not found after install"
            pytest.skip(f"{name} is not installed (Debian: apt-get install {TOOLS[name]}): {why}")
    return found
