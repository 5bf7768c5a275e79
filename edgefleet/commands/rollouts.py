"""`edgefleet rollouts`: create and steer staged rollouts."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    ServerOpt,
    api,
    client,
    console,
    fail,
    parse_pairs,
    print_json,
)

rollouts_app = typer.Typer(help="Create and steer staged rollouts.", no_args_is_help=True)


def parse_selector(selector: str | None) -> dict[str, Any]:
    """``hw=rpi4,site=berlin`` -> {"hardware_id": "rpi4", "tags": {"site": "berlin"}}."""
    result: dict[str, Any] = {}
    tags: dict[str, str] = {}
    for key, value in parse_pairs([p for p in (selector or "").split(",") if p], "--selector").items():
        if key in ("hw", "hardware", "hardware_id"):
            result["hardware_id"] = value
        else:
            tags[key] = value
    if tags:
        result["tags"] = tags
    return result


def parse_stages(stages: str) -> list[float]:
    try:
        values = [float(s.strip().rstrip("%")) for s in stages.split(",") if s.strip()]
    except ValueError:
        fail(f"--stages must be percentages like 1%,10%,100%, got {stages!r}", 2)
    if not values or values != sorted(values) or values[-1] > 100 or values[0] <= 0:
        fail("--stages must be increasing percentages in (0, 100]", 2)
    return values


@rollouts_app.command("create")
def rollouts_create(
    model: Annotated[str, typer.Option("--model", "-m", help="name:version")],
    selector: Annotated[str | None, typer.Option("--selector", "-l", help="hw=rpi4,key=value")] = None,
    stages: Annotated[str, typer.Option("--stages", help="Cumulative percentages.")] = "10,50,100",
    soak: Annotated[float, typer.Option("--soak", help="Seconds each stage soaks before the next.")] = 60.0,
    device_timeout: Annotated[float, typer.Option(help="Seconds before a device is timed out.")] = 600.0,
    max_error_rate: Annotated[float, typer.Option(help="Gate: inference error rate.")] = 0.05,
    min_inferences: Annotated[int, typer.Option(help="Gate: minimum sample of inferences.")] = 20,
    max_failure_rate: Annotated[float, typer.Option(help="Gate: install failure rate.")] = 0.0,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout of a pushed model to the devices matching a selector."""
    if ":" not in model:
        fail("--model must be name:version", 2)
    body = {
        "model": model,
        "selector": parse_selector(selector),
        "stages": parse_stages(stages),
        "soak_seconds": soak,
        "device_timeout_seconds": device_timeout,
        "max_error_rate": max_error_rate,
        "min_inferences": min_inferences,
        "max_failure_rate": max_failure_rate,
    }
    with client(server) as conn:
        rollout = api(lambda: conn.create_rollout(**body))
    if as_json:
        print_json(rollout)
    else:
        console.print(f"[green]created[/] rollout {rollout['id']} of {model}")


@rollouts_app.command("list")
def rollouts_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """List rollouts."""
    with client(server) as conn:
        rollouts = api(conn.rollouts)
    if as_json:
        print_json(rollouts)
        return
    table = Table("id", "model", "state", "stage")
    for r in rollouts:
        table.add_row(str(r["id"]), str(r["model"]), str(r["state"]), str(r.get("current_stage")))
    console.print(table)


TERMINAL_STATES = {"completed", "rolled_back", "aborted"}


@rollouts_app.command("status")
def rollouts_status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow until it ends.")] = False,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout's stages, device counts and every decision with its figures."""
    with client(server) as conn:
        status = api(lambda: conn.rollout(rollout_id))
        while watch and status["state"] not in TERMINAL_STATES:
            if not as_json:
                console.print(f"{status['state']} stage {status.get('current_stage')}", end="\r")
            time.sleep(1)
            status = api(lambda: conn.rollout(rollout_id))
    if as_json:
        print_json(status)
        return
    print_rollout(status)


def print_rollout(status: dict[str, Any]) -> None:
    table = Table("stage", "percent", "target", "assigned", "done", "failed", "state")
    for i, st in enumerate(status.get("stages", [])):
        table.add_row(
            str(i),
            f"{st.get('percent')}%",
            str(st.get("target_count")),
            str(st.get("assigned")),
            str(st.get("done")),
            str(st.get("failed")),
            str(st.get("state")),
        )
    console.print(table, f"rollout {status['id']} of {status['model']}: [bold]{status['state']}[/]")
    for d in status.get("decisions", [])[-10:]:
        console.print(f"  {d.get('ts')}  {d.get('action')}: {d.get('reason')}")


def _rollout_action(action: str, rollout_id: str, server: str | None, as_json: bool) -> None:
    with client(server) as conn:
        status = api(lambda: conn.rollout_action(rollout_id, action))
    if as_json:
        print_json(status)
    else:
        console.print(f"rollout {rollout_id}: {status['state']}")


@rollouts_app.command("pause")
def rollouts_pause(rollout_id: str, server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """Pause a rollout: no new devices are notified until it resumes."""
    _rollout_action("pause", rollout_id, server, as_json)


@rollouts_app.command("resume")
def rollouts_resume(rollout_id: str, server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """Resume a paused rollout."""
    _rollout_action("resume", rollout_id, server, as_json)


@rollouts_app.command("abort")
def rollouts_abort(rollout_id: str, server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """Abort a rollout: no further devices are notified; devices keep what they run."""
    _rollout_action("abort", rollout_id, server, as_json)


# ---------------------------------------------------------------- processes
