"""`edgefleet slo`: service level objectives per model, their budgets, alerts, planned windows, overrides."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.commands.common import (
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
from fleet_server.slo.spec import WORKBOOK_RULES

slo_app = typer.Typer(
    help="Service level objectives per model: error budgets, burn-rate alerts (docs/slo.md).",
    no_args_is_help=True,
)


def parse_target(text: str) -> float:
    """``99.5%`` or ``0.995``, as a share."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        fail(f"target {text!r}: a share like 0.995 or a percent like 99.5%", EXIT_USAGE)
    return value


def parse_ms(text: str) -> float:
    """``50ms``, ``1.5s`` or ``50`` (milliseconds)."""
    try:
        if text.endswith("ms"):
            return float(text[:-2])
        if text.endswith("s"):
            return float(text[:-1]) * 1000
        return float(text)
    except ValueError:
        fail(f"latency {text!r}: like 50ms or 1.5s", EXIT_USAGE)


def objectives_of(
    window: str,
    availability: str | None,
    error_rate: str | None,
    latency_p95: str | None,
    latency_p99: str | None,
    drift_psi: float | None,
    drift_target: str,
    accuracy: str | None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if availability is not None:
        out.append({"sli": "availability", "target": parse_target(availability), "window": window})
    if error_rate is not None:
        out.append({"sli": "error_rate", "target": parse_target(error_rate), "window": window})
    if latency_p95 is not None:
        out.append({"sli": "latency_p95", "threshold": parse_ms(latency_p95), "window": window})
    if latency_p99 is not None:
        out.append({"sli": "latency_p99", "threshold": parse_ms(latency_p99), "window": window})
    if drift_psi is not None:
        out.append(
            {
                "sli": "drift_psi",
                "threshold": drift_psi,
                "target": parse_target(drift_target),
                "window": window,
            }
        )
    if accuracy is not None:
        out.append({"sli": "accuracy", "target": parse_target(accuracy), "window": window})
    return out


@slo_app.command("create")
def slo_create(
    name: Annotated[str, typer.Argument(help="The SLO's name: lower-case letters, digits, '.', '_', '-'.")],
    model: Annotated[str, typer.Option("--model", help="The model's name; every version counts.")],
    hardware_id: Annotated[
        str | None, typer.Option("--hardware-id", help="Only this hardware cohort (default: every one).")
    ] = None,
    window: Annotated[
        str, typer.Option("--window", help="The budget window of every objective: 28d, 7d, 1h.")
    ] = "28d",
    availability: Annotated[
        str | None, typer.Option("--availability", help="Share of predictions served: 99.5% or 0.995.")
    ] = None,
    error_rate: Annotated[
        str | None, typer.Option("--error-rate", help="Share of inferences without an error: 99.9%.")
    ] = None,
    latency_p95: Annotated[
        str | None, typer.Option("--latency-p95", help="95% of inferences under this: 20ms.")
    ] = None,
    latency_p99: Annotated[
        str | None, typer.Option("--latency-p99", help="99% of inferences under this: 50ms.")
    ] = None,
    drift_psi: Annotated[
        float | None,
        typer.Option("--drift-psi", help="Output drift allowed per evaluation step, in PSI: 0.25."),
    ] = None,
    drift_target: Annotated[
        str, typer.Option("--drift-target", help="Share of steps within --drift-psi.")
    ] = "99%",
    accuracy: Annotated[
        str | None, typer.Option("--accuracy", help="Share of labelled predictions that are right: 90%.")
    ] = None,
    fast_page: Annotated[
        bool,
        typer.Option(
            "--fast-page/--no-fast-page",
            help="The default policy has a page at 14.4x over 5m and 1m (with 300 events in the"
            " minute) before the SRE workbook's three rules: it pages in minutes, not ~40."
            " --no-fast-page keeps the workbook's rules only.",
        ),
    ] = True,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an SLO: one objective per flag given; burn-rate rules: a fast page tier and the SRE
    workbook's three."""
    objectives = objectives_of(
        window, availability, error_rate, latency_p95, latency_p99, drift_psi, drift_target, accuracy
    )
    if not objectives:
        fail(
            "give at least one objective: --availability, --error-rate, --latency-p95, --latency-p99,"
            " --drift-psi or --accuracy",
            EXIT_USAGE,
        )
    body: dict[str, Any] = {
        "name": name,
        "model": model,
        "hardware_id": hardware_id,
        "objectives": objectives,
    }
    if not fast_page:
        body["rules"] = [r.as_dict() for r in WORKBOOK_RULES]
    with client(server, token) as conn:
        out = api(lambda: conn.create_slo(body))
    if as_json:
        print_json(out)
        return
    slis = ", ".join(_objective_text(o) for o in out["objectives"])
    console.print(f"[green]created[/] SLO {out['name']} for {out['model']}: {slis}", highlight=False)


def _objective_text(o: dict[str, Any]) -> str:
    threshold = o.get("threshold")
    unit = "ms" if str(o["sli"]).startswith("latency") else ""
    over = f" <= {threshold:g}{unit}" if threshold is not None else ""
    return f"{o['sli']}{over} {o['target'] * 100:g}% / {o['window']}"


@slo_app.command("list")
def slo_list(
    model: Annotated[str | None, typer.Option("--model", help="Only this model's.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List SLOs, oldest first."""
    with client(server, token) as conn:
        rows = api(lambda: conn.slos(model))
    if as_json:
        print_json(rows)
        return
    table = Table("name", "model", "cohort", "objectives", "rules")
    for r in rows:
        table.add_row(
            r["name"],
            r["model"],
            r.get("hardware_id") or "all",
            "\n".join(_objective_text(o) for o in r["objectives"]),
            ", ".join(f"{x['severity']} {x['factor']:g}x {x['long']}/{x['short']}" for x in r["rules"]),
        )
    console.print(table)


@slo_app.command("status")
def slo_status(
    name: Annotated[str | None, typer.Argument(help="One SLO (default: every one).")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Each objective's SLI, budget left and burn rates; whether the budget blocks rollouts."""
    with client(server, token) as conn:
        names = [name] if name else [s["name"] for s in api(conn.slos)]
        out = [api(lambda n=n: conn.slo_status(n)) for n in names]  # type: ignore[misc]
    if as_json:
        print_json(out[0] if name else out)
        return
    table = Table("slo", "sli", "value", "target", "budget left", "burn (long/short)", "alert")
    for s in out:
        for o in s["objectives"]:
            value = "-" if o["value"] is None else f"{o['value'] * 100:.3f}%"
            burns = ", ".join(f"{r['long_burn']:.1f}/{r['short_burn']:.1f}" for r in o["rules"])
            breaching = [r["name"] for r in o["rules"] if r["breaching"]]
            table.add_row(
                s["name"],
                o["sli"],
                value,
                f"{o['target'] * 100:g}%",
                ("[red]spent[/] " if o["budget_remaining"] <= 0 and o["events"] else "")
                + f"{o['budget_remaining'] * 100:.0f}%",
                burns,
                ", ".join(breaching) or "",
            )
    console.print(table)


@slo_app.command("alerts")
def slo_alerts(
    state: Annotated[str | None, typer.Option("--state", help="pending, firing or resolved.")] = None,
    deliveries: Annotated[bool, typer.Option("--deliveries", help="Show the delivery log instead.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """SLO alerts (one per model, cohort and severity), or the log of their deliveries."""
    with client(server, token) as conn:
        rows = api(conn.alert_deliveries) if deliveries else api(lambda: conn.alerts(state))
    if as_json:
        print_json(rows)
        return
    if deliveries:
        table = Table("id", "alert", "status", "receiver", "tries", "delivered", "last error")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["alert_id"],
                r["status"],
                r["receiver"],
                str(r["attempts"]),
                r.get("delivered_at") or ("gave up" if r["gave_up"] else ""),
                r["last_error"],
            )
    else:
        table = Table("alert", "state", "since", "silenced", "causes")
        for r in rows:
            table.add_row(
                r["id"], r["state"], r["since"], "yes" if r["silenced"] else "", "\n".join(r["causes"])
            )
    console.print(table)


@slo_app.command("window")
def slo_window(
    model: Annotated[str, typer.Argument(help="The model's name.")],
    minutes: Annotated[float, typer.Option("--minutes", min=1, help="How long it lasts from now.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (shown with the held alerts).")],
    hardware_id: Annotated[str | None, typer.Option("--hardware-id", help="Only this cohort.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Declare a planned-rollout window: the model's alerts are not notified until it ends."""
    body = {"model": model, "minutes": minutes, "reason": reason, "hardware_id": hardware_id}
    with client(server, token) as conn:
        out = api(lambda: conn.planned_window(body))
    if as_json:
        print_json(out)
    else:
        console.print(
            f"[green]declared[/] window {out['id']} for {model} until {out['ends']}", highlight=False
        )


@slo_app.command("override")
def slo_override(
    model: Annotated[str, typer.Argument(help="The model's name.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why the rollout must go although the budget is spent.")
    ],
    hours: Annotated[float, typer.Option("--hours", min=0.1, help="How long the override holds.")] = 24.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let new rollouts of a model whose error budget is spent go ahead (admin; audited with the reason)."""
    with client(server, token) as conn:
        out = api(lambda: conn.budget_override(model, reason, hours))
    if as_json:
        print_json(out)
    else:
        console.print(
            f"[yellow]override[/] {out['id']} for {model} until {out['expires_at']}", highlight=False
        )
