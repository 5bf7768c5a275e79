"""Which devices a selector picks: over tags, hardware id, runtime and agent version.

One selector, three forms: the text people type (``hw=rpi4,site=lab``, read by
``selector_syntax.parse_selector``), the dict a rollout stores
(``{"hardware_id": "rpi4", "tags": {"site": "lab"}}``, ``schemas.Selector``),
and the test of one device. ``matches`` tests a device row against the dict, so the ticker can re-apply a
stored rollout's selector to devices that register or change after it began;
``sql_clauses`` states the criteria SQL can test (hardware id, tags, runtime),
so a listing filters 10,000 devices in the database; only the agent version (a
PEP 440 ordering) is tested here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from sqlalchemy import ColumnElement, case, cast, exists, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Session, col

from fleet_server.models import Device


def device_runtimes(device: Device) -> set[str]:
    caps = (device.reported or {}).get("capabilities") or {}
    runtimes = caps.get("runtimes") or {}
    return {str(k) for k in runtimes} if isinstance(runtimes, (dict, list)) else set()


def matches(device: Device, selector: Mapping[str, Any], hardware_ids: list[str]) -> bool:
    """AND of every criterion given; the model's hardware ids always apply."""
    return device.hardware_id in hardware_ids and matches_selector(device, selector)


def matches_selector(device: Device, selector: Mapping[str, Any]) -> bool:
    """AND of every criterion the selector gives (an empty selector matches every device)."""
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
    return spec is None or agent_version_matches(device.agent_version, spec)


def agent_version_matches(version: str | None, spec: str) -> bool:
    """The agent version is in the PEP 440 specifier (an unknown or unparsable version is not)."""
    if version is None:
        return False
    try:
        return Version(version) in SpecifierSet(spec)
    except (InvalidVersion, InvalidSpecifier):
        return False


def sql_clauses(selector: Mapping[str, Any], dialect: str) -> list[ColumnElement[bool]]:
    """The criteria SQL tests exactly as ``matches_selector`` does: hardware id, tags and runtime
    (``dialect``: the engine's name)."""
    clauses: list[ColumnElement[bool]] = []
    hw = selector.get("hardware_id")
    if hw is not None:
        clauses.append(col(Device.hardware_id) == hw)
    for key, value in (selector.get("tags") or {}).items():
        clauses.append(_tag_equals(key, value, dialect))
    runtime = selector.get("runtime")
    if runtime is not None:
        clauses.append(_has_runtime(runtime, dialect))
    return clauses


class Target(NamedTuple):
    """A device a selector picks: its id and the model it runs."""

    id: str
    running_sha256: str | None


def matching_devices(
    session: Session, selector: Mapping[str, Any], hardware_ids: Sequence[str]
) -> list[Target]:
    """(id, running model hash) of every device ``matches`` picks, tested in SQL but for the agent
    version: what a rollout targets. Plain rows, never Device objects: a 10,000-device fleet
    loaded through the ORM (each device's reported JSON decoded) made rollout creation take
    seconds."""
    if not hardware_ids:
        return []
    dialect = session.get_bind().dialect.name
    query = select(col(Device.id), col(Device.running_sha256), col(Device.agent_version)).where(
        col(Device.hardware_id).in_(list(hardware_ids)), *sql_clauses(selector, dialect)
    )
    spec = selector.get("agent_version")
    return [
        Target(r.id, r.running_sha256)
        for r in session.connection().execute(query).all()
        if spec is None or agent_version_matches(r.agent_version, spec)
    ]


def _tag_equals(key: str, value: str, dialect: str) -> ColumnElement[bool]:
    if dialect == "postgresql":  # tags ->> key: the key is a bound text, any characters
        return col(Device.tags)[key].as_string() == value
    # SQLite's JSON paths cannot spell every key (a '"' or non-ASCII one matches nothing), so
    # compare decoded keys row by row
    pairs = func.json_each(col(Device.tags)).table_valued("key", "value").alias("tag")
    return exists(select(1).select_from(pairs).where(pairs.c.key == key, pairs.c.value == value))


def _has_runtime(runtime: str, dialect: str) -> ColumnElement[bool]:
    """The reported ``capabilities.runtimes`` names ``runtime``: a key of it (an object) or an
    element (a list), as ``device_runtimes`` reads it."""
    if dialect == "postgresql":  # jsonb ? text: an object's key or a string element of an array
        return cast(col(Device.reported), JSONB)["capabilities"]["runtimes"].has_key(runtime)
    path = "$.capabilities.runtimes"
    each = func.json_each(col(Device.reported), path).table_valued("key", "value").alias("runtime")
    name = case((func.json_type(col(Device.reported), path) == "array", each.c.value), else_=each.c.key)
    return exists(select(1).select_from(each).where(name == runtime))


__all__ = [
    "Target",
    "agent_version_matches",
    "device_runtimes",
    "matches",
    "matches_selector",
    "matching_devices",
    "sql_clauses",
]
