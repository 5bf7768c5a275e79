"""`edgefleet models`: push and list signed bundles on the fleet server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api,
    client,
    console,
    fail,
    print_json,
)
from edgefleet.commands.keys import DEFAULT_PASS_ENV, PassEnvOpt, PassFileOpt, load_role_key

models_app = typer.Typer(help="Push and list signed model bundles on the fleet server.", no_args_is_help=True)


KeysOpt = Annotated[
    Path, typer.Option("--keys", help="Key directory holding release.key (signs the TUF release metadata).")
]


@models_app.command("push")
def models_push(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.", exists=True, file_okay=False)],
    keys: KeysOpt = Path("keys"),
    no_tuf: Annotated[
        bool,
        typer.Option("--no-tuf", help="Upload without TUF release metadata (skeleton-mode devices only)."),
    ] = False,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed bundle and release it: the server verifies the bundle against its trusted
    release keys and the TUF targets metadata signed here with release.key (never sent)."""
    release_keys = None if no_tuf else [load_role_key(keys, "release", passphrase_file, passphrase_env)]
    with client(server, token) as conn:
        model = api(lambda: conn.push_bundle(bundle, release_keys=release_keys))
    if as_json:
        print_json(model)
    else:
        console.print(f"[green]pushed[/] {model['name']}:{model['version']} sha256 {model['sha256'][:12]}…")


@models_app.command("revoke")
def models_revoke(
    family: Annotated[str, typer.Argument(help="Model family (the bundle name).")],
    below: Annotated[int, typer.Option("--below", min=0, help="Lowest release devices may still install.")],
    keys: KeysOpt = Path("keys"),
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Raise the family's signed revocation floor: devices refuse releases below it (floors never go down)."""
    release_key = load_role_key(keys, "release", passphrase_file, passphrase_env)
    with client(server, token) as conn:
        try:
            out = api(lambda: conn.revoke_below(family, below, [release_key]))
        except ValueError as exc:
            fail(str(exc))
    if as_json:
        print_json(out)
    else:
        console.print(
            f"[green]revoked[/] {family} releases below {below} (targets v{out['targets_version']})"
        )


@models_app.command("list")
def models_list(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List the models the server holds."""
    with client(server, token) as conn:
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
