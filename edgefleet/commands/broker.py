"""`edgefleet broker`: run a throwaway local broker (and, later, write production broker configs)."""

from __future__ import annotations

from typing import Annotated

import typer

from edgefleet.commands.common import (
    console,
)

broker_app = typer.Typer(help="Run a local MQTT broker for trials.", no_args_is_help=True)


@broker_app.command("run")
def broker_run(
    embedded: Annotated[bool, typer.Option(help="Use the embedded pure-Python broker.")] = False,
) -> None:
    """Start a throwaway local broker (Mosquitto if installed) and print its address."""
    import threading

    from edgefleet.broker import start_broker

    broker = start_broker("embedded" if embedded else "auto")
    console.print(f"[green]{broker.info.kind}[/] on {broker.info.url} (MQTT v{broker.info.mqtt_version})")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
