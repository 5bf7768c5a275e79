"""`edgefleet devices get|describe|delete|tag`: one device at a time, kubectl style.

Registered onto the ``devices`` group by ``edgefleet.cli`` (``register_device_ops``).
``tag`` takes kubectl's label syntax: ``key=value`` sets, ``key-`` removes, and
changing a key that already has another value needs ``--overwrite``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgefleet.commands.common import (
    EXIT_USAGE,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api,
    client,
    console,
    fail,
    print_json,
)

DeviceIds = Annotated[list[str], typer.Argument(help="Device id(s).", show_default=False)]
DEVICE_COLUMNS = ("device", "hw", "online", "running", "state", "seq", "tags")


def device_row(d: Mapping[str, Any]) -> list[str]:
    """A device as one table row under ``DEVICE_COLUMNS`` (what `devices list` and `get` show)."""
    running = d.get("running_model") or {}
    return [
        str(d["device_id"]),
        str(d["hardware_id"]),
        "yes" if d.get("online") else "no",
        f"{running.get('name')}:{running.get('version')}" if running else "-",
        str(d.get("deployment_state") or "-"),
        str(d.get("deployment_seq") or 0),
        format_tags(d.get("tags") or {}),
    ]


def format_tags(tags: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


class TagError(ValueError):
    """A tag change that cannot apply; ``usage`` when the argument itself is malformed."""

    def __init__(self, message: str, *, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


TagChange = tuple[str, str | None]  # (key, value); None removes the key


def parse_tag_changes(changes: list[str]) -> list[TagChange]:
    """``k=v`` sets, ``k-`` removes; checked before anything is asked of the server."""
    parsed: list[TagChange] = []
    for change in changes:
        key, sep, value = change.partition("=")
        if sep and key:
            parsed.append((key, value))
        elif not sep and len(change) > 1 and change.endswith("-"):
            parsed.append((change[:-1], None))
        else:
            raise TagError(f"a tag change is key=value or key-, got {change!r}", usage=True)
    keys = [key for key, _ in parsed]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise TagError(f"tag {', '.join(map(repr, twice))} changed twice", usage=True)
    return parsed


def apply_tag_changes(
    current: Mapping[str, str], changes: list[TagChange], overwrite: bool
) -> dict[str, str]:
    """The tags after ``changes``; pure, so it is tested without a server.

    Removing an absent key is a no-op (the result is what was asked for); setting a key
    that holds another value raises unless ``overwrite``: a typo must not silently move a
    device out of a rollout's selector.
    """
    tags = dict(current)
    for key, value in changes:
        if value is None:
            tags.pop(key, None)
        elif key in tags and tags[key] != value and not overwrite:
            raise TagError(
                f"tag {key!r} already has the value {tags[key]!r}; --overwrite replaces it", usage=False
            )
        else:
            tags[key] = value
    return tags


def devices_get(
    device_ids: DeviceIds,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show devices by id as `devices list` does (JSON: one object for one id, else a list)."""
    with client(server, token) as conn:
        found = [api(partial(conn.device, d)) for d in device_ids]
    if as_json:
        print_json(found[0] if len(found) == 1 else found)
        return
    table = Table(*DEVICE_COLUMNS)
    for d in found:
        table.add_row(*device_row(d))
    console.print(table)


def devices_describe(
    device_id: Annotated[str, typer.Argument(help="Device id.", show_default=False)],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything the server knows about a device: identity, tags, what it runs, its slots and clock."""
    with client(server, token) as conn:
        d = api(lambda: conn.device(device_id))
    if as_json:
        print_json(d)
        return
    console.print(describe_table(d))


def describe_table(d: Mapping[str, Any]) -> Table:
    running = d.get("running_model") or {}
    inventory = d.get("inventory") or {}
    offset = d.get("clock_offset_seconds")
    fields: list[tuple[str, Any]] = [
        ("Device", d["device_id"]),
        ("Hardware", d["hardware_id"]),
        ("Tags", format_tags(d.get("tags") or {}) or "-"),
        ("Registered", d.get("registered_at")),
        ("Online", f"{'yes' if d.get('online') else 'no'} (last seen {d.get('last_seen') or 'never'})"),
        ("Agent", d.get("agent_version") or "-"),
        (
            "Running",
            f"{running.get('name')}:{running.get('version')} (sha256 {str(running.get('sha256'))[:12]}…)"
            if running
            else "-",
        ),
        (
            "Deployment",
            f"{d.get('deployment_state') or '-'} (seq {d.get('deployment_seq', 0)}, "
            f"desired seq {d.get('desired_seq', 0)})",
        ),
        (
            "Clock offset",
            f"{offset:+.3f} s (measured {d.get('clock_offset_at')})"
            if offset is not None
            else "not measured",
        ),
        ("Active slot", inventory.get("active_slot") or "-"),
        ("Shadow", inventory.get("shadow_sha256") or "-"),
        ("Slots", inventory.get("slots") or "-"),
        ("Capabilities", inventory.get("capabilities") or "-"),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")  # hashes wrap whole, never cut
    for name, value in fields:
        grid.add_row(f"{name}:", Text(nested_text(value)))
    return grid


def nested_text(value: Any, indent: int = 0) -> str:
    """A nested mapping as indented ``key: value`` lines (never a dict repr)."""
    if not isinstance(value, Mapping):
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "-"
        return "-" if value is None else str(value)
    lines = []
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            lines.append(" " * indent + f"{key}:")
            lines.append(nested_text(item, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {nested_text(item)}")
    return "\n".join(lines) or "-"


def devices_delete(
    device_ids: DeviceIds,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete devices from the registry (refused while an active rollout holds one).

    The broker credentials the device was provisioned with are not revoked here.
    """
    deleted = []
    with client(server, token) as conn:
        for device_id in device_ids:
            deleted.append(api(partial(conn.delete_device, device_id)))
            if not as_json:
                console.print(f"deleted device {device_id}", highlight=False)
    if as_json:
        print_json(deleted[0] if len(deleted) == 1 else deleted)


def devices_tag(
    device_id: Annotated[str, typer.Argument(help="Device id.", show_default=False)],
    changes: Annotated[
        list[str],
        typer.Argument(
            help="key=value to set, key- to remove (repeat).", show_default=False, metavar="CHANGE..."
        ),
    ],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the value of a key the device already has.")
    ] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set or remove a device's tags; a running rollout whose selector it now matches takes it in.

    The change is read-modify-write of the device's whole tag set (PUT .../tags).
    """
    try:
        parsed = parse_tag_changes(changes)
    except TagError as exc:
        fail(str(exc), EXIT_USAGE)
    with client(server, token) as conn:
        device = api(lambda: conn.device(device_id))
        try:
            tags = apply_tag_changes(device.get("tags") or {}, parsed, overwrite)
        except TagError as exc:
            fail(str(exc), code="tag_exists")
        if tags != device.get("tags"):
            device = api(lambda: conn.set_device_tags(device_id, tags))
    if as_json:
        print_json(device)
    else:
        console.print(
            f"{device_id} tags: {format_tags(device.get('tags') or {}) or '(none)'}", highlight=False
        )


def register_device_ops(devices_app: typer.Typer) -> None:
    """Add get, describe, delete and tag to the ``devices`` group."""
    devices_app.command("get")(devices_get)
    devices_app.command("describe")(devices_describe)
    devices_app.command("delete")(devices_delete)
    devices_app.command("tag")(devices_tag)
