"""What every command module shares: consoles, failure exits, --json, the API client."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

ServerOpt = Annotated[
    str | None,
    typer.Option("--server", "-s", envvar="EDGEFLEET_SERVER", help="Fleet server URL."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="Admin API token.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line per error: greppable logs
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def client(server: str | None, token: str | None = None) -> Any:
    """An API client; the token defaults to ``$EDGEFLEET_TOKEN`` (inside ApiClient)."""
    from edgefleet.client import ApiClient

    return ApiClient(server, token=token)


def api(call: Any) -> Any:
    """Run an API call; turn ApiError into a clean message and exit code 1."""
    from edgefleet.client import ApiError

    try:
        return call()
    except ApiError as exc:
        fail(f"{exc.code}: {exc.message}" if exc.message else exc.code)


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{what} must be key=value, got {pair!r}", 2)
        out[key] = value
    return out
