"""`edgefleet apply | diff | plan | get | describe | schema`: declarative configuration, kubectl-style.

The files are read and validated here first, so a mistake is named by file, line and field
before anything is sent; the server validates again (an API client may skip this CLI) and
decides what changes. ``diff`` and ``plan`` are the server's dry run, shown two ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgefleet.commands.common import (
    EXIT_FAILURE,
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

FilesOpt = Annotated[
    list[str],
    typer.Option(
        "--filename", "-f", help="Fleet file, directory of them, or - for standard input (repeatable)."
    ),
]
DEFAULT_SCHEMA_PATH = Path("docs/schema/fleet.schema.json")


def read_documents(files: list[str], conn: Any = None) -> tuple[list[dict[str, Any]], str]:
    """The validated documents as JSON values, and the source named in the history. With a
    connection, a window name that neither the files nor the server declare is named by its file
    and line too (the server would refuse it with the document's name only)."""
    from edgefleet.manifests import ManifestError, load
    from fleet_server import declarative

    try:
        sourced, docs = load(files)
    except ManifestError as exc:
        fail(str(exc), code="invalid_document")
    if conn is not None and declarative.referenced_windows(docs):
        applied = api(lambda: conn.config_documents(declarative.WINDOW_KIND))
        unknown = declarative.window_problems(docs, [row["name"] for row in applied])
        if unknown:
            fail(
                "; ".join(sourced[e.index].where(p) for e in unknown for p in e.problems),
                code="invalid_document",
            )
    return [d.body() for d in docs], ", ".join(files)[:512]


def _send(files: list[str], dry_run: bool, server: str | None, token: str | None) -> dict[str, Any]:
    with client(server, token) as conn:
        documents, source = read_documents(files, conn)
        result: dict[str, Any] = api(lambda: conn.apply_config(documents, source, dry_run))
    return result


def apply_cmd(
    files: FilesOpt,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate on the server and show what would change; store nothing."),
    ] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply fleet files: each document is created, configured (changed) or left unchanged.

    Applying the same files again changes nothing. Every apply is kept with its documents and
    diff (`edgefleet describe KIND NAME` shows a document's history) and is in the audit log.
    """
    result = _send(files, dry_run, server, token)
    if as_json:
        print_json(result)
        return
    suffix = " (dry run)" if dry_run else ""
    for c in result["changes"]:
        style = {"created": "green", "configured": "yellow"}.get(c["action"], "dim")
        console.print(Text.assemble(f"{c['kind'].lower()}/{c['name']} ", (c["action"], style), suffix))
    if result.get("id"):
        console.print(f"[dim]apply {result['id']}[/]")


def diff_cmd(
    files: FilesOpt,
    exit_code: Annotated[
        bool, typer.Option("--exit-code", help="Exit 1 when something would change (as git diff).")
    ] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what applying the files would change, as a unified diff of each live document against
    the declared one (nothing when they are equal)."""
    result = _send(files, True, server, token)
    changed = [c for c in result["changes"] if c["action"] != "unchanged"]
    if as_json:
        print_json({"changed": bool(changed), "changes": result["changes"]})
    else:
        for c in changed:
            for line in c["diff"].splitlines():
                style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
                style = "bold" if line.startswith(("+++", "---")) else style
                console.print(Text(line, style=style or ""), soft_wrap=True, highlight=False)
    if exit_code and changed:
        raise typer.Exit(EXIT_FAILURE)


def plan_cmd(
    files: FilesOpt,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what applying the files would do, document by document, and the totals."""
    result = _send(files, True, server, token)
    changes = result["changes"]
    counts = {a: sum(c["action"] == a for c in changes) for a in ("created", "configured", "unchanged")}
    if as_json:
        print_json({"changes": [{k: c[k] for k in ("kind", "name", "action")} for c in changes], **counts})
        return
    table = Table("ACTION", "KIND", "NAME", box=None, header_style="bold")
    marks = {
        "created": ("+ create", "green"),
        "configured": ("~ change", "yellow"),
        "unchanged": ("  keep", "dim"),
    }
    for c in changes:
        mark, style = marks[c["action"]]
        table.add_row(Text(mark, style=style), c["kind"], c["name"])
    console.print(table)
    console.print(
        f"Plan: {counts['created']} to create, {counts['configured']} to change,"
        f" {counts['unchanged']} unchanged."
    )


def _kind(text: str) -> str:
    from fleet_server.declarative import find_kind, kind_names

    kind = find_kind(text)
    if kind is None:
        fail(f"unknown kind {text!r}; kinds: {kind_names()}", EXIT_USAGE)
    return kind.name


def _age(ts: str) -> str:
    return str(ts)[:19].replace("T", " ")


def get_cmd(
    kind: Annotated[
        str | None,
        typer.Argument(help="Kind (Model, RolloutPolicy, SLO, HardwareTargets); all when left out."),
    ] = None,
    name: Annotated[str | None, typer.Argument(help="One document's name.")] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="yaml or json: the documents as declared.")
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List applied documents (one kind, or every kind), or print one document."""
    if output not in (None, "yaml", "json"):
        fail("--output is yaml or json", EXIT_USAGE)
    with client(server, token) as conn:
        if name is not None:
            if kind is None:
                fail("a name needs its kind: edgefleet get KIND NAME", EXIT_USAGE)
            rows = [api(lambda: conn.config_document(_kind(kind), name))]
        else:
            rows = api(lambda: conn.config_documents(_kind(kind) if kind else None))
    if as_json or output == "json":
        data = [r["document"] for r in rows] if output else rows
        print_json(data[0] if name is not None else data)
        return
    if output == "yaml":
        import yaml

        typer.echo(yaml.safe_dump_all([r["document"] for r in rows], sort_keys=False), nl=False)
        return
    table = Table("KIND", "NAME", "GENERATION", "UPDATED", "BY", "LABELS", box=None, header_style="bold")
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in r["document"]["metadata"].get("labels", {}).items())
        table.add_row(
            r["kind"], r["name"], str(r["generation"]), _age(r["updated_at"]), r["updated_by"], labels
        )
    console.print(table)


def describe_cmd(
    kind: Annotated[str, typer.Argument(help="Kind (Model, RolloutPolicy, SLO, HardwareTargets).")],
    name: Annotated[str, typer.Argument(help="The document's name.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one applied document: as declared, its spec with every default, and its history."""
    import yaml

    with client(server, token) as conn:
        row = api(lambda: conn.config_document(_kind(kind), name))
    if as_json:
        print_json(row)
        return
    meta = row["document"]["metadata"]
    lines = [
        ("Kind:", row["kind"]),
        ("Name:", row["name"]),
        ("Labels:", ", ".join(f"{k}={v}" for k, v in meta.get("labels", {}).items()) or "<none>"),
        ("Generation:", str(row["generation"])),
        ("Created:", _age(row["created_at"])),
        ("Updated:", f"{_age(row['updated_at'])} by {row['updated_by']} (apply {row['apply_id']})"),
    ]
    grid = Table.grid(padding=(0, 2))
    for k, v in lines:
        grid.add_row(Text(k, style="bold"), Text(v))
    console.print(grid)
    console.print(Text("Spec (as declared):", style="bold"))
    console.print(Text(_indent(yaml.safe_dump(row["document"]["spec"], sort_keys=False))), highlight=False)
    console.print(Text("Effective spec (with defaults):", style="bold"))
    console.print(Text(_indent(yaml.safe_dump(row["effective"], sort_keys=False))), highlight=False)
    console.print(Text("History:", style="bold"))
    history = Table("APPLY", "WHEN", "WHO", "ACTION", "SOURCE", box=None, header_style="bold")
    for h in row.get("history") or []:
        history.add_row(str(h["apply_id"]), _age(h["ts"]), h["actor"], h["action"], h["source"])
    console.print(history)


def _indent(text: str) -> str:
    return "".join(f"  {line}" for line in text.splitlines(keepends=True))


def schema_cmd(
    write: Annotated[
        Path | None,
        typer.Option(
            "--write", help=f"Write the schema to this file (the published one: {DEFAULT_SCHEMA_PATH})."
        ),
    ] = None,
) -> None:
    """Print the JSON schema of a fleet file's documents (generated from the kinds' models)."""
    from fleet_server.declarative import schema_text

    text = schema_text()
    if write is None:
        typer.echo(text, nl=False)
        return
    write.parent.mkdir(parents=True, exist_ok=True)
    write.write_text(text, encoding="utf-8")
    console.print(f"wrote {write}")


def register_config_commands(app: typer.Typer) -> None:
    app.command("apply")(apply_cmd)
    app.command("diff")(diff_cmd)
    app.command("plan")(plan_cmd)
    app.command("get")(get_cmd)
    app.command("describe")(describe_cmd)
    app.command("schema")(schema_cmd)


__all__ = ["read_documents", "register_config_commands"]
