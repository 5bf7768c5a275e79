"""What every command module shares: consoles, the server options, errors, --json, progress bars.

A command that talks to the fleet server takes the same three options, defined
here once::

    def cmd(..., server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False):
        with client(server, token) as conn:
            rows = api(conn.devices)

Errors go through ``fail`` (or ``api``, which turns an ``ApiError`` into one):
one line on stderr, or ``{"error": {"code", "message"}}`` on stderr when the
command line holds ``--json``, then the exit code (docs/cli.md). The root
command (``edgefleet.cli``) decides the output mode once per invocation and
renders usage errors and unexpected exceptions the same way.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

console = Console()
err = Console(stderr=True)

# Exit codes (documented in `edgefleet --help` and docs/cli.md).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

ServerOpt = Annotated[
    str | None,
    typer.Option("--server", "-s", envvar="EDGEFLEET_SERVER", help="Fleet server URL.", show_default=False),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="Admin API token.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON (errors too, on stderr).")]


@dataclass(frozen=True)
class OutputMode:
    """How this invocation reports: ``json`` when ``--json`` is on its command line; ``debug``: tracebacks."""

    json: bool = False
    debug: bool = False

    @classmethod
    def from_args(cls, args: Sequence[str]) -> OutputMode:
        """Read from the raw arguments, so usage errors found while parsing are rendered the same way."""
        options = list(args[: args.index("--")] if "--" in args else args)
        return cls(json="--json" in options, debug="--debug" in options)


DEFAULT_MODE = OutputMode()
_mode: ContextVar[OutputMode] = ContextVar("edgefleet_output_mode", default=DEFAULT_MODE)


def output_mode() -> OutputMode:
    return _mode.get()


@contextmanager
def output_mode_set(mode: OutputMode) -> Iterator[None]:
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def enable_debug() -> None:
    _mode.set(OutputMode(json=_mode.get().json, debug=True))


def report_error(message: str, *, code: str) -> None:
    """Write one error: one line on stderr, or the JSON error object under ``--json``."""
    line = " ".join(message.split())  # one line, whatever the message held
    if output_mode().json:
        sys.stderr.write(json.dumps({"error": {"code": code, "message": line}}) + "\n")
        sys.stderr.flush()
    else:
        # Text, not markup: a message may hold brackets (paths, option names) that rich would eat.
        err.print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True, highlight=False)


def fail(message: str, exit_code: int = EXIT_FAILURE, *, code: str | None = None) -> NoReturn:
    """Report ``message`` and exit; ``code`` is the error's stable name in JSON output."""
    report_error(message, code=code or ("usage_error" if exit_code == EXIT_USAGE else "failed"))
    raise typer.Exit(exit_code)


def warn(message: str) -> None:
    """A one-line warning on stderr; silent under --json (the JSON on stdout says what happened)."""
    if not output_mode().json:
        err.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def client(server: str | None, token: str | None = None) -> Any:
    """An API client; the token defaults to ``$EDGEFLEET_TOKEN`` (inside ApiClient)."""
    from edgefleet.client import ApiClient

    return ApiClient(server, token=token)


def api(call: Callable[[], Any]) -> Any:
    """Run an API call; turn ApiError into a one-line error named by the server's code, exit code 1."""
    from edgefleet.client import ApiError

    try:
        return call()
    except ApiError as exc:
        fail(f"{exc.code}: {exc.message}" if exc.message else exc.code, code=exc.code)


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{what} must be key=value, got {pair!r}", EXIT_USAGE)
        out[key] = value
    return out


def shows_progress() -> bool:
    """Progress bars only for a person: never under --json, never when stderr is not a terminal."""
    return not output_mode().json and err.is_terminal


@contextmanager
def transfer_progress(
    description: str, total: int | None, *, then: str | None = None
) -> Iterator[Callable[[int], None]]:
    """A byte-counting progress bar on stderr; yields ``advance(n_bytes)`` (negative moves it back).

    ``then`` replaces the description once every byte moved (e.g. while the server verifies an
    upload, which is not instant). Off (the callback does nothing) under --json or when stderr
    is not a terminal.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if not shows_progress():
        yield lambda _n: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)
            if then is not None and total is not None and progress.tasks[0].completed >= total:
                progress.update(task, description=then)

        yield advance
