"""`edgefleet devices`: register and list devices."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    ServerOpt,
    api,
    client,
    console,
    parse_pairs,
    print_json,
)

devices_app = typer.Typer(help="Register and list devices.", no_args_is_help=True)


@devices_app.command("register")
def devices_register(
    device_id: Annotated[str, typer.Argument(help="Device id (its MQTT identity).")],
    hardware: Annotated[str, typer.Option("--hw", help="Hardware id, e.g. rpi4.")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value (repeatable).")] = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device so the server accepts its messages and serves it bundles."""
    tags = parse_pairs(tag, "--tag")
    with client(server) as conn:
        device = api(lambda: conn.register_device(device_id, hardware, tags))
    if as_json:
        print_json(device)
    else:
        console.print(f"[green]registered[/] {device_id} ({hardware})")


@devices_app.command("list")
def devices_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """List devices with what they run and their deployment state."""
    with client(server) as conn:
        devices = api(conn.devices)
    if as_json:
        print_json(devices)
        return
    table = Table("device", "hw", "online", "running", "state", "seq", "tags")
    for d in devices:
        running = d.get("running_model") or {}
        table.add_row(
            d["device_id"],
            d["hardware_id"],
            "yes" if d.get("online") else "no",
            f"{running.get('name')}:{running.get('version')}" if running else "-",
            str(d.get("deployment_state") or "-"),
            str(d.get("deployment_seq") or 0),
            ",".join(f"{k}={v}" for k, v in (d.get("tags") or {}).items()),
        )
    console.print(table)


# ---------------------------------------------------------------- rollouts
