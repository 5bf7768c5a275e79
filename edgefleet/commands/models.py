"""`edgefleet models`: push and list signed bundles on the fleet server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    ServerOpt,
    api,
    client,
    console,
    print_json,
)

models_app = typer.Typer(help="Push and list signed model bundles on the fleet server.", no_args_is_help=True)


@models_app.command("push")
def models_push(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.", exists=True, file_okay=False)],
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed bundle; the server verifies it against its trusted release keys."""
    with client(server) as conn:
        model = api(lambda: conn.push_bundle(bundle))
    if as_json:
        print_json(model)
    else:
        console.print(f"[green]pushed[/] {model['name']}:{model['version']} sha256 {model['sha256'][:12]}…")


@models_app.command("list")
def models_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """List the models the server holds."""
    with client(server) as conn:
        models = api(conn.models)
    if as_json:
        print_json(models)
        return
    table = Table("model", "release", "target", "hardware", "sha256", "size")
    for m in models:
        table.add_row(
            f"{m['name']}:{m['version']}",
            str(m["release"]),
            m["target"],
            ",".join(m.get("hardware_ids", [])),
            m["sha256"][:12],
            f"{m['length']:,}",
        )
    console.print(table)


# ---------------------------------------------------------------- devices
