"""`edgefleet experiments`: A/B experiments between model versions, watched with always-valid intervals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgefleet.commands.common import JsonOpt, ServerOpt, TokenOpt, api, client, console, fail, print_json
from edgefleet.commands.rollouts import parse_selector

experiments_app = typer.Typer(
    help="A/B experiments between model versions: create, status (any time: the intervals are"
    " always valid), stop.",
    no_args_is_help=True,
)

ExperimentIdArg = Annotated[str, typer.Argument(help="Experiment id.", show_default=False)]


def parse_arm(text: str) -> dict[str, Any]:
    """``candidate=digits:3@2`` -> {"name": "candidate", "model": "digits:3", "weight": 2} (weight 1
    when left out)."""
    name, eq, rest = text.partition("=")
    if not eq or not name or not rest:
        fail(f"--arm wants NAME=MODEL:VERSION[@WEIGHT], got {text!r}", 2)
    model, at, weight = rest.partition("@")
    if ":" not in model:
        fail(f"--arm {name}: the model is name:version, got {model!r}", 2)
    try:
        w = float(weight) if at else 1.0
    except ValueError:
        fail(f"--arm {name}: the weight must be a number, got {weight!r}", 2)
    return {"name": name, "model": model, "weight": w}


def parse_guardrail(text: str) -> dict[str, Any]:
    """``latency_ms=5`` -> {"metric": "latency_ms", "max_harm": 5}; ``error_rate`` -> max_harm 0."""
    metric, eq, harm = text.rpartition("=") if "=" in text else (text, "", "")
    try:
        return {"metric": metric, "max_harm": float(harm) if eq else 0.0}
    except ValueError:
        fail(f"--guardrail wants METRIC[=MAX_HARM], got {text!r}", 2)


@experiments_app.command("create")
def experiments_create(
    name: Annotated[str | None, typer.Option("--name", help="A name people recognise.")] = None,
    arm: Annotated[
        list[str] | None,
        typer.Option("--arm", help="NAME=MODEL:VERSION[@WEIGHT], repeated; the first is the control."),
    ] = None,
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="hw=rpi4,key=value (tags), runtime=, agent=>=0.2")
    ] = None,
    metric: Annotated[
        str, typer.Option(help="Primary metric: accuracy, error_rate, latency_ms or outcome:<name>.")
    ] = "accuracy",
    better: Annotated[str | None, typer.Option(help="For an outcome metric: higher or lower.")] = None,
    alpha: Annotated[float, typer.Option(help="False-positive rate, however often it is looked at.")] = 0.05,
    min_samples: Annotated[int, typer.Option(help="Primary-metric samples per arm before a verdict.")] = 200,
    guardrail: Annotated[
        list[str] | None,
        typer.Option(
            "--guardrail", help="METRIC[=MAX_HARM]: stop an arm proven worse by more, e.g. latency_ms=5."
        ),
    ] = None,
    auto_promote: Annotated[
        bool, typer.Option("--auto-promote", help="Roll the proven winner out to the rest of the selector.")
    ] = False,
    soak: Annotated[float, typer.Option("--soak", help="The arms' rollouts: soak seconds.")] = 0.0,
    min_inferences: Annotated[
        int | None, typer.Option(help="The arms' rollouts: inferences before a device counts as serving.")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="The whole request as JSON (the API's body); flags add to it."),
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Split the selected devices into arms (every hardware cohort by the weights) and start them."""
    body: dict[str, Any] = {}
    if file is not None:
        try:
            body = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            fail(f"--file {file}: {exc}", 2)
        if not isinstance(body, dict):
            fail(f"--file {file}: expected a JSON object", 2)
    if name is not None:
        body["name"] = name
    if arm:
        body["arms"] = [parse_arm(a) for a in arm]
    if selector is not None:
        body["selector"] = parse_selector(selector)
    if "name" not in body or "arms" not in body:
        fail("an experiment needs --name and at least two --arm (or --file)", 2)
    body.setdefault("metric", metric)
    body.setdefault("alpha", alpha)
    body.setdefault("min_samples", min_samples)
    if better is not None:
        body["better"] = better
    if guardrail:
        body["guardrails"] = [parse_guardrail(g) for g in guardrail]
    if auto_promote:
        body["auto_promote"] = True
    policy = dict(body.get("policy") or {})
    policy.setdefault("soak_seconds", soak)
    if min_inferences is not None:
        policy["min_inferences"] = min_inferences
    body["policy"] = policy
    with client(server, token) as conn:
        exp = api(lambda: conn.create_experiment(**body))
    if as_json:
        print_json(exp)
        return
    split = ", ".join(f"{a['name']} {a['model']}: {a['devices']}" for a in exp["arms"])
    console.print(f"[green]created[/] experiment {exp['id']} ({split})")


@experiments_app.command("list")
def experiments_list(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List experiments with their state and verdict."""
    with client(server, token) as conn:
        rows = api(conn.experiments)
    if as_json:
        print_json(rows)
        return
    table = Table("id", "name", "state", "metric", "winner", "verdict")
    for e in rows:
        table.add_row(
            str(e["id"]),
            str(e["name"]),
            str(e["state"]),
            str(e["metric"]),
            str(e["winner"] or "-"),
            str(e["verdict"]),
        )
    console.print(table)


def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def print_experiment(exp: dict[str, Any]) -> None:
    arms = Table(
        "arm",
        "model",
        "state",
        "devices",
        "serving",
        "accuracy (labels)",
        "error rate",
        "latency ms",
        title="arms",
    )
    for a in exp["arms"]:
        m = a["metrics"]
        acc, err, lat = m["accuracy"], m["error_rate"], m["latency_ms"]
        arms.add_row(
            a["name"] + (" (control)" if a["name"] == exp["control"] else ""),
            a["model"],
            a["state"],
            str(a["devices"]),
            str(a["serving"]),
            f"{_num(acc['value'])} ({acc['samples']})",
            f"{_num(err['value'])} ({err['samples']})",
            _num(lat["value"]),
        )
    console.print(arms)
    level = f"always-valid {1 - exp['alpha_per_arm']:.1%} interval"
    effects = Table("arm", "metric", "effect", level, "anytime p", "verdict", title="against the control")
    for a in exp["arms"]:
        for e in a["effects"]:
            effects.add_row(
                a["name"],
                e["metric"],
                _num(e["estimate"]),
                "-" if e["lower"] is None else f"{e['lower']:+.4g} .. {e['upper']:+.4g}",
                _num(e["p_value"], 3),
                e["verdict"],
            )
    console.print(effects)
    console.print(
        Text.assemble(
            f"experiment {exp['id']} ({exp['name']}): ",
            (str(exp["state"]), "bold"),
            f"; winner: {exp['winner'] or '-'}; {exp['verdict']}",
        )
    )
    for d in exp["decisions"][-10:]:
        console.print(
            f"  {str(d['ts'])[:19].replace('T', ' ')}  {d['action']}: {d['reason']}", highlight=False
        )


@experiments_app.command("status")
def experiments_status(
    experiment_id: ExperimentIdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Per arm: devices, accuracy, error rate, latency, outcomes, and the effect against the control
    with its always-valid interval (valid however often it is looked at)."""
    with client(server, token) as conn:
        exp = api(lambda: conn.experiment(experiment_id))
    if as_json:
        print_json(exp)
    else:
        print_experiment(exp)


@experiments_app.command("stop")
def experiments_stop(
    experiment_id: ExperimentIdArg,
    arm: Annotated[
        str | None, typer.Option("--arm", help="Stop this arm only: its devices go back to the control.")
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="End it by rolling the proven winner out.")
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="Recorded with the decision.")] = "operator",
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop an arm, or the whole experiment (every arm but the control goes back to the control)."""
    body: dict[str, Any] = {"reason": reason, "promote": promote}
    if arm is not None:
        body["arm"] = arm
    with client(server, token) as conn:
        exp = api(lambda: conn.stop_experiment(experiment_id, **body))
    if as_json:
        print_json(exp)
    else:
        console.print(f"experiment {experiment_id}: {exp['state']}" + (f", arm {arm} stopped" if arm else ""))
