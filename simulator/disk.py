"""Real small disks for chosen devices: one tmpfs per device as its data dir, filled up on demand.

A device of a class with ``disk_mb`` keeps its slots, telemetry queue and
metadata on a tmpfs of that size mounted at its data dir, so "disk full" is
the kernel's ENOSPC, not a mock: the ``fill_disk`` fault writes a ballast file
until only ``leave_bytes`` are free. Mounting needs root (CAP_SYS_ADMIN); when
it is not available, :class:`DeviceDisks` records why and the scenario skips
the disk fault and the expectations that need it (``requires = "disk"``).
Every mount is unmounted in :meth:`DeviceDisks.unmount_all` (lazily when busy).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

BALLAST = ".sim-ballast"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DeviceDisks:
    """The tmpfs mounts of one scenario run."""

    def __init__(self) -> None:
        self.mounted: dict[str, Path] = {}  # device -> mount point (its data dir)
        self.unavailable: str | None = None  # why no disk could be mounted

    def mount(self, device_id: str, path: Path, size_bytes: int) -> bool:
        """Mount a tmpfs of ``size_bytes`` at ``path`` (the device's data dir, created empty)."""
        if self.unavailable is not None:
            return False
        if os.geteuid() != 0:
            self.unavailable = "a real full disk needs a tmpfs mount, and this process is not root"
            return False
        path.mkdir(parents=True, exist_ok=True)
        size_kb = max(64, int(size_bytes) // 1024)
        try:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
                check=True,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            self.unavailable = f"mount -t tmpfs failed: {detail.strip()}"
            return False
        self.mounted[device_id] = path
        return True

    def fill(self, device_id: str, leave_bytes: int = 0) -> int:
        """Write a ballast file on the device's disk until ``leave_bytes`` are free; return its size."""
        path = self.mounted[device_id]
        want = max(0, free_bytes(path) - leave_bytes)
        ballast = path / BALLAST
        written = 0
        chunk = b"\0" * (1 << 20)
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while written < want:
                try:
                    n = os.write(fd, chunk[: min(len(chunk), want - written)])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                if n <= 0:
                    break
                written += n
        finally:
            os.close(fd)
        log.info("%s: disk filled with %d bytes, %d free", device_id, written, free_bytes(path))
        return written

    def unmount_all(self) -> list[str]:
        """Unmount every disk (``umount -l`` when busy); return the mount points that stayed."""
        left: list[str] = []
        for device_id, path in list(self.mounted.items()):
            ok = False
            for cmd in (["umount", str(path)], ["umount", "-l", str(path)]):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    done = subprocess.run(cmd, capture_output=True, timeout=10)
                    if done.returncode == 0:
                        ok = True
                        break
            if ok:
                del self.mounted[device_id]
            else:
                left.append(str(path))
                log.error("could not unmount %s", path)
        return left


__all__ = ["BALLAST", "DeviceDisks", "free_bytes"]
