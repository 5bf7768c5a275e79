"""The ``edgefleet`` command line: git/kubectl-style subcommands over the five packages.

Each command group lives in ``edgefleet/commands/``. Heavy imports
(onnxruntime, fastapi, sqlmodel) happen inside the command that needs them, so
``edgefleet agent`` works on a device with the ``agent`` extra only, and
``--help`` stays fast. Listing and status commands take ``--json``; every
failure exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import typer

from edgefleet.commands.broker import broker_app
from edgefleet.commands.compile import compile_cmd
from edgefleet.commands.devices import devices_app
from edgefleet.commands.examples import examples_app
from edgefleet.commands.keys import keys_app
from edgefleet.commands.models import models_app
from edgefleet.commands.processes import agent_cmd, demo_cmd, server_cmd
from edgefleet.commands.rollouts import parse_selector, parse_stages, rollouts_app
from edgefleet.commands.sim import sim_app
from edgefleet.commands.tokens import audit_app, tokens_app

app = typer.Typer(
    name="edgefleet",
    help="Compile, sign, roll out and serve ML models on fleets of edge devices.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.command("compile")(compile_cmd)
app.add_typer(examples_app, name="examples")
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
app.add_typer(rollouts_app, name="rollouts")
app.command("server")(server_cmd)
app.command("agent")(agent_cmd)
app.add_typer(sim_app, name="sim")
app.add_typer(broker_app, name="broker")
app.add_typer(tokens_app, name="tokens")
app.add_typer(audit_app, name="audit")
app.command("demo")(demo_cmd)

__all__ = ["app", "main", "parse_selector", "parse_stages"]


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
