"""`edgefleet keys`: create and inspect signing keys and the trust root."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    console,
    fail,
    print_json,
)

keys_app = typer.Typer(help="Create and inspect signing keys and the trust root.", no_args_is_help=True)


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Where to write the keys.")] = Path("keys"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate root, release and fleet keys and the root-signed trust root (trust.json)."""
    from signing.keyring import init_keys

    try:
        trust = init_keys(directory, force=force)
    except FileExistsError as exc:
        fail(str(exc))
    info = _trust_summary(trust)
    if as_json:
        print_json({"dir": str(directory), **info})
        return
    console.print(f"[green]wrote[/] keys and trust root to {directory}/")
    _print_trust(info)
    console.print(
        "[yellow]keep root.key and release.key offline; the server needs trust.json and fleet.key[/]"
    )


@keys_app.command("show")
def keys_show(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Key directory.")] = Path("keys"),
    as_json: JsonOpt = False,
) -> None:
    """Verify and show the trust root in a key directory."""
    from signing.errors import TrustError
    from signing.keyring import KeyDir

    try:
        info = _trust_summary(KeyDir(directory).trust_root())
    except (OSError, TrustError) as exc:
        fail(f"cannot read trust root in {directory}: {exc}")
    if as_json:
        print_json(info)
    else:
        _print_trust(info)


def _trust_summary(trust: Any) -> dict[str, Any]:
    return {
        "version": trust.version,
        "expires": trust.expires.isoformat(),
        "root_threshold": trust.root_threshold,
        "root_keys": sorted(trust.root_keys),
        "release_keys": sorted(trust.release_keys),
        "fleet_keys": sorted(trust.fleet_keys),
    }


def _print_trust(info: dict[str, Any]) -> None:
    table = Table("role", "key ids", title=f"trust root v{info['version']} (expires {info['expires']})")
    for role in ("root_keys", "release_keys", "fleet_keys"):
        table.add_row(role.removesuffix("_keys"), "\n".join(k[:16] + "…" for k in info[role]))
    console.print(table)


# ---------------------------------------------------------------- compile
