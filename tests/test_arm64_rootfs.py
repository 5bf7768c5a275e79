"""The arm64 rootfs script's own rules, without building anything: what its cache keys follow,
the ARM cpuinfo it mounts, the refusal to delete a mounted tree, the skip without root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "scripts"))
import arm64_rootfs  # noqa: E402  (a script, not a package)


def test_the_agent_extra_changes_the_venv_key_not_the_base_key(monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = arm64_rootfs.agent_requirements()
    assert "onnxruntime>=1.18" in reqs and not any(r.startswith("fastapi") for r in reqs)
    base, venv = arm64_rootfs.base_key(), arm64_rootfs.venv_key(reqs)
    assert arm64_rootfs.venv_key([*reqs, "pillow>=10"]) != venv
    assert arm64_rootfs.venv_key(list(reversed(reqs))) == venv  # order does not matter
    monkeypatch.setattr(arm64_rootfs, "DEBIAN_PACKAGES", (*arm64_rootfs.DEBIAN_PACKAGES, "mosquitto"))
    assert arm64_rootfs.base_key() != base and arm64_rootfs.venv_key(reqs) != venv  # the venv sits on it


def test_the_cpuinfo_is_an_arm_one_for_the_emulated_cpu() -> None:
    text = arm64_rootfs.cpuinfo_text("cortex-a72", cores=2)
    assert (
        text.count("processor\t:") == 2 and "CPU part\t: 0xd08" in text and "CPU implementer\t: 0x41" in text
    )
    assert "i8mm" in arm64_rootfs.cpuinfo_text("max", cores=1)
    assert "asimddp" not in arm64_rootfs.cpuinfo_text("cortex-a53", cores=1)


def test_a_tree_with_something_mounted_under_it_is_never_deleted(tmp_path: Path) -> None:
    assert arm64_rootfs.mounts_under(tmp_path / "nothing-here") == []
    with pytest.raises(RuntimeError, match="still mounted"):
        arm64_rootfs.remove_rootfs(Path("/proc"))  # a mount point: refused before any deletion
    assert Path("/proc/self").exists()


def test_without_root_it_skips_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arm64_rootfs.os, "geteuid", lambda: 1000)
    with pytest.raises(arm64_rootfs.CannotRun, match="needs root"):
        arm64_rootfs.ensure_host()
    assert arm64_rootfs.main(["check"]) == arm64_rootfs.EXIT_CANNOT


def test_the_script_runs_without_the_project_venv() -> None:
    """A bare python3 (no rich) can still say whether the lane runs here."""
    done = subprocess.run(
        [sys.executable, str(PROJECT / "scripts" / "arm64_rootfs.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "check" in done.stdout and "build" in done.stdout
