"""Broker shards: which Mosquitto a device talks to, decided once at provisioning.

A fleet outgrows one broker long before it outgrows MQTT, and Mosquitto does not
cluster: it scales by running several brokers (shards), each device on exactly
one, with every fleet server replica connected to all of them
(``fleet_server.mqtt_bridge``). The one thing every party must agree on is which
shard a device is on: provisioning writes it into the device's ``agent.toml``,
the server stores it on the device record when the device is registered, and the
server publishes that device's directives there.

:func:`assign` is rendezvous (highest random weight) hashing of the device id
over the shard names: deterministic, so provisioning and the server compute the
same answer from the same list; balanced (each shard gets 1/N of the devices up
to the binomial spread); and adding a shard moves only the devices that now
score highest on the new shard (about 1/(N+1) of them), all of them *to* the new
shard. Even that movement never happens by itself: the assignment is stored on
the device record and in the device's configuration, and a changed shard list
only affects devices registered afterwards.

The shard list has one home, the shards file (``shards.json``, written by
``edgefleet broker config --shards N``): each shard's name, where devices reach
it, the fleet server's credentials file for it (``fleet-server.json``) and, in
password mode, its password file. The server reads it through
``ServerSettings.mqtt_shards`` and ``edgefleet devices provision --shards``
reads the same file. Without one, the single broker of the ``mqtt_*`` settings
is the one shard, named :data:`DEFAULT_SHARD`.

Stdlib only: provisioning imports it without the server's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SHARD = "default"  # the name of the single broker when there is no shards file
SHARDS_FILE = "shards.json"
SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ShardError(ValueError):
    """A shards file or shard name that cannot work (unreadable, duplicate names, no shards)."""


@dataclass(frozen=True)
class Shard:
    """One broker of the fleet. ``host``/``port``: its device listener (what ``agent.toml`` names);
    ``server_credentials``: the ``fleet-server.json`` the fleet server connects to it with;
    ``password_file``: its Mosquitto password file (password mode), where provisioning adds the
    devices assigned to it."""

    name: str
    host: str
    port: int
    server_credentials: Path | None = None
    password_file: Path | None = None


def _score(shard: str, device_id: str) -> int:
    digest = hashlib.blake2b(f"{shard}\0{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(device_id: str, shards: Sequence[str]) -> str:
    """The shard ``device_id`` belongs on: the name with the highest hash of (name, device id).

    Ties (astronomically unlikely with 64-bit scores) go to the name that sorts first, so the
    answer never depends on the order of the list."""
    if not shards:
        raise ShardError("no shards to assign a device to")
    return max(sorted(shards), key=lambda name: _score(name, device_id))


def check_names(names: Iterable[str]) -> list[str]:
    """The names, checked: valid and distinct (a duplicate would make two shards one)."""
    out = list(names)
    if not out:
        raise ShardError("a shard list needs at least one shard")
    for name in out:
        if not SHARD_NAME_RE.match(name):
            raise ShardError(f"invalid shard name {name!r}: letters, digits, '.', '_' or '-', up to 64")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise ShardError(f"duplicate shard names: {', '.join(dupes)}")
    return out


def resolve(stored: str | None, names: Sequence[str]) -> str:
    """The shard a device record names; a record from before shards (None) is on the first shard,
    the broker the fleet had before it was split (keep it first in the list)."""
    return stored if stored is not None else names[0]


def load_shards(path: Path) -> list[Shard]:
    """Read a shards file; relative paths in it are against its directory."""
    path = Path(path)
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(f"cannot read the shards file {path}: {exc}") from exc
    rows = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ShardError(f"{path}: expected an object with a list under 'shards'")
    shards: list[Shard] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ShardError(f"{path}: shard {i} is not an object")
        unknown = sorted(set(row) - {"name", "host", "port", "server_credentials", "password_file"})
        if unknown:
            raise ShardError(f"{path}: shard {i} has unknown keys {', '.join(unknown)}")
        try:
            name, host, port = str(row["name"]), str(row["host"]), int(row["port"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{path}: shard {i} needs a name, a host and a port ({exc})") from exc
        if not 0 < port < 65536:
            raise ShardError(f"{path}: shard {name!r} has an invalid port {port}")
        shards.append(
            Shard(
                name,
                host,
                port,
                _relative_to(path, row.get("server_credentials")),
                _relative_to(path, row.get("password_file")),
            )
        )
    check_names(s.name for s in shards)
    return shards


def write_shards(path: Path, shards: Sequence[Shard]) -> None:
    """Write a shards file (paths relative to it when they are below its directory)."""
    check_names(s.name for s in shards)
    path = Path(path)
    base = path.parent.resolve()

    def rel(p: Path | None) -> str | None:
        if p is None:
            return None
        p = Path(p).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    rows = []
    for s in shards:
        row: dict[str, Any] = {"name": s.name, "host": s.host, "port": s.port}
        if s.server_credentials is not None:
            row["server_credentials"] = rel(s.server_credentials)
        if s.password_file is not None:
            row["password_file"] = rel(s.password_file)
        rows.append(row)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"shards": rows}, indent=2) + "\n")
    os.replace(tmp, path)


def shard_names(shards_file: Path | None) -> list[str]:
    """The shard names of a shards file in its order; without one, the single default broker."""
    return [DEFAULT_SHARD] if shards_file is None else [s.name for s in load_shards(shards_file)]


def by_name(shards: Sequence[Shard]) -> dict[str, Shard]:
    return {s.name: s for s in shards}


def _relative_to(path: Path, value: Any) -> Path | None:
    if not value:
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else path.parent / p
