"""`edgefleet telemetry`: what the devices measured, per model version, hardware class and rollout stage.

These are the figures the rollout gates read (``GET /api/v1/telemetry``, or one
rollout's with ``--rollout``). Stages are numbered from 1, as everywhere in the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from edgefleet.commands.common import JsonOpt, ServerOpt, TokenOpt, api, client, console, print_json


def telemetry_cmd(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Only this model: name:version or its sha256.", show_default=False
        ),
    ] = None,
    hardware: Annotated[
        str | None, typer.Option("--hw", help="Only this hardware id, e.g. rpi4.", show_default=False)
    ] = None,
    rollout: Annotated[
        str | None,
        typer.Option("--rollout", "-r", help="Only this rollout's devices, per stage.", show_default=False),
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Inferences, error rate, p95 latency and shadow agreement per model and hardware class."""
    with client(server, token) as conn:
        if rollout is not None:
            rows = api(lambda: conn.rollout_telemetry(rollout))
            rows = [
                r
                for r in rows
                if (hardware is None or r["hardware_id"] == hardware)
                and (model is None or model in (r.get("model"), r["sha256"]))
            ]
        else:
            rows = api(lambda: conn.telemetry(model=model, hardware_id=hardware))
    if as_json:
        print_json(rows)
        return
    console.print(telemetry_table(rows))


def telemetry_table(rows: list[Mapping[str, Any]]) -> Table:
    """Fits 80 columns; ``--json`` has every field (hashes whole, served_ok, shadow samples)."""
    table = Table(
        "model", "hw", "stage", "devices", "inferences", "errors", "p95 ms", "shadow",
        box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
    )  # fmt: skip
    for r in rows:
        p95 = r.get("latency_p95_us")
        agreement = r.get("shadow_agreement")
        table.add_row(
            str(r.get("model") or str(r["sha256"])[:12]),
            str(r["hardware_id"]),
            str(r["stage"] + 1) if r.get("stage") is not None else "-",
            str(r["devices"]),
            f"{r['inferences']:,}",
            f"{r['errors']:,} ({r['error_rate']:.1%})",
            f"{p95 / 1000:.2f}" if p95 is not None else "-",
            f"{agreement:.1%}" if agreement is not None else "-",
        )
    if not rows:
        table.caption = "no telemetry yet"
    return table
