"""Debian packages the tests need (Prometheus, Chromium): installed with apt-get where this
machine allows it (root, apt-get present, EDGEFLEET_NO_APT unset), never by hand; the callers
skip with the reason this returns when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache


@cache
def apt_install(*packages: str) -> str:
    """'' when ``packages`` got installed, else why not (one attempt per session and package set;
    an index that is out of date gets one ``apt-get update``)."""
    if os.environ.get("EDGEFLEET_NO_APT"):
        return "EDGEFLEET_NO_APT is set"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "no apt-get, or not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # The suite's workers install at the same time (Chromium in one, Prometheus in another): wait
    # for the other's dpkg lock instead of failing on it, which skipped the browser tests on a
    # fresh machine ("Could not get lock /var/lib/dpkg/lock-frontend").
    wait = ["-o", "DPkg::Lock::Timeout=600"]
    cmd = ["apt-get", *wait, "install", "-y", "-q", "--no-install-recommends", *packages]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        subprocess.run(["apt-get", *wait, "update", "-q"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return "" if done.returncode == 0 else f"apt-get install failed: {done.stderr.strip()[-200:]}"
