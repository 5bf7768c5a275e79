"""Which devices a rollout targets: selector over tags, hardware id, runtime and agent version.

A stored rollout keeps its selector as a dict, and the ticker re-applies it to
devices that register or change after the rollout began (they join it), so
matching works on the dict form and on a device row alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from fleet_server.models import Device


def device_runtimes(device: Device) -> set[str]:
    caps = (device.reported or {}).get("capabilities") or {}
    runtimes = caps.get("runtimes") or {}
    return {str(k) for k in runtimes} if isinstance(runtimes, (dict, list)) else set()


def matches(device: Device, selector: Mapping[str, Any], hardware_ids: list[str]) -> bool:
    """AND of every criterion given; the model's hardware ids always apply."""
    if device.hardware_id not in hardware_ids:
        return False
    hw = selector.get("hardware_id")
    if hw is not None and device.hardware_id != hw:
        return False
    tags: Mapping[str, str] = selector.get("tags") or {}
    if any(device.tags.get(k) != v for k, v in tags.items()):
        return False
    runtime = selector.get("runtime")
    if runtime is not None and runtime not in device_runtimes(device):
        return False
    spec = selector.get("agent_version")
    if spec is not None:
        if device.agent_version is None:
            return False
        try:
            return Version(device.agent_version) in SpecifierSet(spec)
        except (InvalidVersion, InvalidSpecifier):
            return False
    return True
