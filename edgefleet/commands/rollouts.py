"""`edgefleet rollouts`: create and steer staged rollouts."""

from __future__ import annotations

import sys
from itertools import pairwise
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgefleet.commands.common import (
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api,
    client,
    console,
    fail,
    parse_pairs,
    print_json,
)
from edgefleet.commands.rollout_watch import (
    current_stage_label,
    delivery_line,
    exit_code,
    follow,
    outcome_error,
    stage_table,
)

rollouts_app = typer.Typer(help="Create and steer staged rollouts.", no_args_is_help=True)


def parse_selector(selector: str | None) -> dict[str, Any]:
    """``hw=rpi4,site=berlin`` -> {"hardware_id": "rpi4", "tags": {"site": "berlin"}}.

    ``runtime=onnxruntime`` and ``agent=>=0.2`` select by runtime and agent version; the grammar
    is the server's (``GET /api/v1/devices?selector=`` reads the same text).
    """
    from fleet_server.selector_syntax import SelectorError
    from fleet_server.selector_syntax import parse_selector as parse

    try:
        return parse(selector or "")
    except SelectorError as exc:
        fail(f"--selector: {exc}", 2)


def parse_stages(stages: str) -> list[float]:
    try:
        values = [float(s.strip().rstrip("%")) for s in stages.split(",") if s.strip()]
    except ValueError:
        fail(f"--stages must be percentages like 1%,10%,100%, got {stages!r}", 2)
    if not values or values != sorted(values) or values[-1] > 100 or values[0] <= 0:
        fail("--stages must be increasing percentages in (0, 100]", 2)
    return values


def parse_counts(counts: str) -> list[float]:
    """``5,50,500`` -> cumulative device counts."""
    try:
        values = [int(s.strip()) for s in counts.split(",") if s.strip()]
    except ValueError:
        fail(f"--stage-counts must be whole numbers like 5,50,500, got {counts!r}", 2)
    if not values or values[0] <= 0 or any(b <= a for a, b in pairwise(values)):
        fail("--stage-counts must be increasing positive device counts", 2)
    return [float(v) for v in values]


def parse_retries(pairs: list[str] | None) -> dict[str, int]:
    """``timed_out=2`` ``download_failed=3`` ``*=1`` -> {class: retries}."""
    out: dict[str, int] = {}
    for key, value in parse_pairs(pairs, "--retry").items():
        if not value.isdigit():
            fail(f"--retry wants CLASS=N with N a whole number, got {key}={value}", 2)
        out[key] = int(value)
    return out


Action = Annotated[str | None, typer.Option(help="roll_back or pause (a human decides).")]
RolloutIdArg = Annotated[str, typer.Argument(help="Rollout id.", show_default=False)]


@rollouts_app.command("create")
def rollouts_create(
    model: Annotated[str, typer.Option("--model", "-m", help="name:version")],
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="hw=rpi4,key=value (tags), runtime=, agent=>=0.2")
    ] = None,
    stages: Annotated[str, typer.Option("--stages", help="Cumulative percentages.")] = "10,50,100",
    stage_counts: Annotated[
        str | None, typer.Option(help="Cumulative device counts instead of --stages, e.g. 5,50,500.")
    ] = None,
    soak: Annotated[float, typer.Option("--soak", help="Seconds each stage soaks before the next.")] = 60.0,
    device_timeout: Annotated[float, typer.Option(help="Seconds before a device is timed out.")] = 600.0,
    max_error_rate: Annotated[float | None, typer.Option(help="Gate: inference error rate.")] = None,
    min_inferences: Annotated[int | None, typer.Option(help="Gate: minimum sample of inferences.")] = None,
    max_failure_rate: Annotated[float | None, typer.Option(help="Gate: install failure rate.")] = None,
    max_failures: Annotated[int | None, typer.Option(help="Gate: failed devices (count).")] = None,
    min_success_rate: Annotated[float | None, typer.Option(help="Gate: done/assigned at stage end.")] = None,
    failure_action: Action = None,
    delivery_action: Annotated[
        str | None,
        typer.Option(
            help="roll_back or pause: when only devices that could not fetch the release trip the"
            " failure gates (default pause)."
        ),
    ] = None,
    error_action: Action = None,
    max_latency_ratio: Annotated[
        float | None, typer.Option(help="Gate: p95 latency vs the replaced model on the same hardware.")
    ] = None,
    latency_action: Action = None,
    max_output_psi: Annotated[
        float | None, typer.Option(help="Gate: PSI of the outputs vs the replaced model.")
    ] = None,
    drift_action: Action = None,
    min_shadow_agreement: Annotated[
        float | None, typer.Option(help="Shadow first; promote at this top-1 agreement.")
    ] = None,
    shadow_action: Action = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            help="Gate: accuracy from field labels may fall at most this far below the replaced "
            "model's on the same hardware (0 = no worse; off when left out)."
        ),
    ] = None,
    accuracy_alpha: Annotated[
        float | None, typer.Option(help="Accuracy gate: false-alarm rate of its one-sided test.")
    ] = None,
    min_labels: Annotated[
        int | None, typer.Option(help="Accuracy gate: labelled predictions needed on each side.")
    ] = None,
    max_label_wait: Annotated[
        float | None,
        typer.Option(help="Accuracy gate: seconds a finished stage waits for labels before it pauses."),
    ] = None,
    accuracy_action: Action = None,
    require_approval: Annotated[bool, typer.Option(help="A human approves each next stage.")] = False,
    retry: Annotated[
        list[str] | None,
        typer.Option(
            "--retry", metavar="CLASS=N", help="Retries per failure class, e.g. timed_out=2 (repeat)."
        ),
    ] = None,
    retry_backoff: Annotated[float | None, typer.Option(help="Seconds before the first retry.")] = None,
    delivery_retries: Annotated[
        int | None,
        typer.Option(
            help="Retries of a device that could not fetch the release, unless --retry names its class."
        ),
    ] = None,
    rate: Annotated[int | None, typer.Option(help="Devices notified per minute.")] = None,
    rate_factor: Annotated[float | None, typer.Option(help="Multiply the rate each minute.")] = None,
    max_rate: Annotated[int | None, typer.Option(help="Cap of the ramped rate per minute.")] = None,
    probation: Annotated[
        float | None, typer.Option(help="Seconds the agent watches the new model before success.")
    ] = None,
    probation_min_inferences: Annotated[
        int | None, typer.Option(help="Probation: successful inferences before success (with --probation).")
    ] = None,
    probation_max_error_rate: Annotated[
        float | None, typer.Option(help="Probation: error rate that makes the agent revert.")
    ] = None,
    probation_max_latency_ratio: Annotated[
        float | None, typer.Option(help="Probation: p95 vs the previous model that makes the agent revert.")
    ] = None,
    capture_rate: Annotated[
        float | None,
        typer.Option(help="Capture for retraining: share of inferences devices keep and upload (0 to 1]."),
    ] = None,
    capture_keep: Annotated[
        str | None, typer.Option(help="Capture: inputs, outputs or both (with --capture-rate).")
    ] = None,
    capture_quota_mb: Annotated[
        float | None, typer.Option(help="Capture: disk per device for captures not yet uploaded, MB.")
    ] = None,
    skip_busy: Annotated[
        bool, typer.Option(help="Leave out devices in another active rollout instead of refusing.")
    ] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout of a pushed model to the devices matching a selector.

    Options left out take the server's policy defaults, except two chosen for rollouts run by
    hand: each stage soaks 60 s and a device has 600 s to prove it serves the model.
    """
    if ":" not in model:
        fail("--model must be name:version", 2)
    body: dict[str, Any] = {
        "model": model,
        "selector": parse_selector(selector),
        "stages": parse_counts(stage_counts) if stage_counts else parse_stages(stages),
        "soak_seconds": soak,
        "device_timeout_seconds": device_timeout,
    }
    if stage_counts:
        body["stage_unit"] = "count"
    if require_approval:
        body["require_approval"] = True
    if skip_busy:
        body["conflict"] = "skip"
    if retry:
        body["retry_limits"] = parse_retries(retry)
    probation_limits = {
        "min_inferences": probation_min_inferences,
        "max_error_rate": probation_max_error_rate,
        "max_latency_ratio": probation_max_latency_ratio,
    }
    if probation is not None:
        body["probation"] = {"seconds": probation} | {
            k: v for k, v in probation_limits.items() if v is not None
        }
    elif any(v is not None for v in probation_limits.values()):
        fail("--probation-* limits need --probation SECONDS", 2)
    if capture_rate is not None:
        body["capture"] = {"sample_rate": capture_rate}
        if capture_keep is not None:
            body["capture"]["keep"] = capture_keep
        if capture_quota_mb is not None:
            body["capture"]["quota_bytes"] = int(capture_quota_mb * (1 << 20))
    elif capture_keep is not None or capture_quota_mb is not None:
        fail("--capture-keep and --capture-quota-mb need --capture-rate", 2)
    optional = {
        "max_error_rate": max_error_rate,
        "min_inferences": min_inferences,
        "max_failure_rate": max_failure_rate,
        "max_failures": max_failures,
        "min_success_rate": min_success_rate,
        "failure_action": failure_action,
        "delivery_action": delivery_action,
        "error_action": error_action,
        "max_latency_ratio": max_latency_ratio,
        "latency_action": latency_action,
        "max_output_psi": max_output_psi,
        "drift_action": drift_action,
        "min_shadow_agreement": min_shadow_agreement,
        "shadow_action": shadow_action,
        "max_accuracy_drop": max_accuracy_drop,
        "accuracy_alpha": accuracy_alpha,
        "min_labels": min_labels,
        "max_label_wait_seconds": max_label_wait,
        "accuracy_action": accuracy_action,
        "retry_backoff_seconds": retry_backoff,
        "delivery_retries": delivery_retries,
        "rate_per_minute": rate,
        "rate_increment_factor": rate_factor,
        "max_rate_per_minute": max_rate,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    with client(server, token) as conn:
        rollout = api(lambda: conn.create_rollout(**body))
    if as_json:
        print_json(rollout)
    else:
        console.print(f"[green]created[/] rollout {rollout['id']} of {model}")


@rollouts_app.command("list")
def rollouts_list(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List rollouts (stages numbered from 1)."""
    with client(server, token) as conn:
        rollouts = api(conn.rollouts)
    if as_json:
        print_json(rollouts)
        return
    table = Table("id", "model", "state", "stage")
    for r in rollouts:
        table.add_row(str(r["id"]), str(r["model"]), str(r["state"]), current_stage_label(r))
    console.print(table)


@rollouts_app.command("status")
def rollouts_status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.", show_default=False)],
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Follow until the rollout finishes or waits for a human; exit 0 only if it completed.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between polls with --watch.")
    ] = 1.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout's stages, device counts and every decision with its figures.

    With --watch: on a terminal a live view (stage timeline, device counts per state, last
    decisions); in a pipe one line per change. The exit code is then 0 if the rollout
    completed, 1 if it was rolled back or aborted, or stopped for a human (paused,
    awaiting_approval).
    """
    with client(server, token) as conn:
        fetch = lambda: api(lambda: conn.rollout(rollout_id))  # noqa: E731
        if not watch:
            status = fetch()
        elif as_json:
            status = follow(fetch, interval=interval)
        elif console.is_terminal:
            status = follow(fetch, interval=interval, console=console)
        else:
            status = follow(fetch, interval=interval, out=sys.stdout)
    if as_json:
        print_json(status)
    elif not watch:
        print_rollout(status)
    if watch and (problem := outcome_error(status)) is not None:
        fail(problem[1], exit_code(status), code=problem[0])


def print_rollout(status: dict[str, Any]) -> None:
    console.print(stage_table(status))
    console.print(
        Text.assemble(
            f"rollout {status['id']} of {status['model']}: ",
            (str(status["state"]), "bold"),
            f", stage {current_stage_label(status)}",
        )
    )
    if (line := delivery_line(status)) is not None:
        console.print(line)
    decisions = Table.grid(padding=(0, 2))
    decisions.add_column(no_wrap=True, style="dim")
    decisions.add_column()
    for d in status.get("decisions", [])[-10:]:
        decisions.add_row(
            f"  {str(d.get('ts'))[:19].replace('T', ' ')}", Text(f"{d.get('action')}: {d.get('reason')}")
        )
    console.print(decisions)


def _rollout_action(
    action: str, rollout_id: str, server: str | None, token: str | None, as_json: bool
) -> None:
    with client(server, token) as conn:
        status = api(lambda: conn.rollout_action(rollout_id, action))
    if as_json:
        print_json(status)
    else:
        console.print(f"rollout {rollout_id}: {status['state']}")


@rollouts_app.command("pause")
def rollouts_pause(
    rollout_id: RolloutIdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Pause a rollout: no new devices are notified until it resumes."""
    _rollout_action("pause", rollout_id, server, token, as_json)


@rollouts_app.command("resume")
def rollouts_resume(
    rollout_id: RolloutIdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Resume a paused rollout; devices that could not fetch the release are sent it again."""
    _rollout_action("resume", rollout_id, server, token, as_json)


@rollouts_app.command("abort")
def rollouts_abort(
    rollout_id: RolloutIdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Abort a rollout: no further devices are notified; devices keep what they run."""
    _rollout_action("abort", rollout_id, server, token, as_json)


@rollouts_app.command("approve")
def rollouts_approve(
    rollout_id: RolloutIdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Approve the current stage: passes a manual gate, or overrides a gate that paused the rollout."""
    _rollout_action("approve", rollout_id, server, token, as_json)


@rollouts_app.command("rollback")
def rollouts_rollback(
    rollout_id: RolloutIdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Send every device that got this rollout's model back to the model it ran before."""
    _rollout_action("rollback", rollout_id, server, token, as_json)
