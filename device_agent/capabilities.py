"""What this device is and can run: the capabilities it reports, and the fit a release is held to."""

from __future__ import annotations

import os
import platform
import shutil
from typing import Any

from device_agent.config import AgentConfig
from device_agent.judgement import DeviceFit
from device_agent.runtime import RuntimeFactory, available_runtimes


def capabilities(config: AgentConfig, runtime: RuntimeFactory) -> dict[str, Any]:
    """What this device can run, for the server's targeting and the operator's eyes."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    try:
        disk_free = shutil.disk_usage(config.data_dir).free
    except OSError:
        disk_free = 0
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "memory": memory,
        "disk_free": disk_free,
        "runtimes": available_runtimes(),
        "delegates": [config.npu_delegate] if config.npu_delegate else [],
        "targets": list(config.targets),
        "runnable_targets": [t for t in config.targets if runtime.supports(t)],
        "python": platform.python_version(),
    }


def device_fit(config: AgentConfig, runtime: RuntimeFactory) -> DeviceFit:
    """The device as :mod:`device_agent.judgement` holds a release to it (asked afresh per install)."""
    reason = getattr(runtime, "unsupported_reason", None)
    return DeviceFit(
        config.hardware_id,
        tuple(config.targets),
        frozenset(t for t in config.targets if runtime.supports(t)),
        **({"why_not": reason} if callable(reason) else {}),
    )


__all__ = ["capabilities", "device_fit"]
