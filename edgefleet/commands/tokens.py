"""`edgefleet tokens` (admin API credentials) and `edgefleet audit` (who changed what, when)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgefleet.commands.common import JsonOpt, ServerOpt, TokenOpt, api, client, console, print_json

tokens_app = typer.Typer(help="Create, list and revoke admin API tokens (admin role).", no_args_is_help=True)
audit_app = typer.Typer(help="Read the append-only audit log of mutating API calls.", no_args_is_help=True)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", help="Who or what uses the token.")],
    role: Annotated[
        str, typer.Option("--role", help="admin, operator, viewer or labeler (posts labels only).")
    ] = "viewer",
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once and never again (only its hash is stored)."""
    with client(server, token) as conn:
        out = api(lambda: conn.create_token(name, role))
    if as_json:
        print_json(out)
    else:
        console.print(f"[green]created[/] token {out['id']} ({out['name']}, {out['role']}):")
        console.print(out["token"], soft_wrap=True, highlight=False)


@tokens_app.command("list")
def tokens_list(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    with client(server, token) as conn:
        rows = api(conn.tokens)
    if as_json:
        print_json(rows)
        return
    table = Table("id", "name", "role", "created", "by", "revoked")
    for r in rows:
        table.add_row(
            r["id"], r["name"], r["role"], r["created_at"], r["created_by"], r.get("revoked_at") or ""
        )
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (from `tokens list`).")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: it stops working at once."""
    with client(server, token) as conn:
        out = api(lambda: conn.revoke_token(token_id))
    if as_json:
        print_json(out)
    else:
        console.print(f"[green]revoked[/] token {out['id']} ({out['name']})")


@audit_app.command("list")
def audit_list(
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000)] = 200,
    after_id: Annotated[int, typer.Option("--after-id", min=0, help="Only entries after this id.")] = 0,
    actor: Annotated[str | None, typer.Option("--actor", help="Only this actor.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mutating API calls, oldest first: when, who, what, result."""
    with client(server, token) as conn:
        rows = api(lambda: conn.audit(limit=limit, after_id=after_id, actor=actor))
    if as_json:
        print_json(rows)
        return
    table = Table("id", "when", "who", "what", "status", "result")
    for r in rows:
        table.add_row(
            str(r["id"]), r["ts"], r["actor"], f"{r['method']} {r['path']}", str(r["status"]), r["result"]
        )
    console.print(table)
