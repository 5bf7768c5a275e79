"""A device's own small disk is a real tmpfs: filling it makes writes fail with ENOSPC (root only)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from simulator.disk import BALLAST, DeviceDisks, free_bytes


def test_fill_a_device_disk_then_unmount(tmp_path: Path) -> None:
    disks = DeviceDisks()
    where = tmp_path / "dev-1"
    if not disks.mount("dev-1", where, 1 << 20):
        pytest.skip(disks.unavailable or "no tmpfs")
    try:
        (where / "state.json").write_text("{}")
        assert free_bytes(where) > 900_000
        written = disks.fill("dev-1", leave_bytes=0)
        assert written > 900_000 and (where / BALLAST).stat().st_size == written
        assert free_bytes(where) < 4096
        with pytest.raises(OSError) as info, open(where / "model.part", "wb") as fh:
            fh.write(os.urandom(64 << 10))
            fh.flush()
        assert info.value.errno == errno.ENOSPC
    finally:
        assert disks.unmount_all() == []
    assert not os.path.ismount(where) and not (where / BALLAST).exists()


def test_without_root_the_reason_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    disks = DeviceDisks()
    assert not disks.mount("dev-1", tmp_path / "d", 1 << 20)
    assert disks.unavailable is not None and "not root" in disks.unavailable
    assert disks.mounted == {}
