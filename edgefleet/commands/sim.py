"""`edgefleet sim`: run many real device agents in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.commands.common import (
    ServerOpt,
    console,
)


def sim_cmd(
    devices: Annotated[int, typer.Option("--devices", "-n", help="How many agents.")] = 50,
    broker: Annotated[str, typer.Option(help="host:port of the MQTT broker.")] = "127.0.0.1:1883",
    mqtt_version: Annotated[int, typer.Option(help="5 or 4 (3.1.1).")] = 5,
    trust: Annotated[Path, typer.Option(help="trust.json the devices are provisioned with.")] = Path(
        "keys/trust.json"
    ),
    hardware: Annotated[str, typer.Option("--hw", help="Hardware id of the devices.")] = "rpi4",
    prefix: Annotated[str, typer.Option(help="Device id prefix.")] = "sim",
    workload_hz: Annotated[float, typer.Option(help="Inferences per second per device.")] = 2.0,
    data_root: Annotated[Path, typer.Option(help="Where device data dirs go.")] = Path(".sim"),
    register: Annotated[bool, typer.Option(help="Register the devices with the server first.")] = True,
    server: ServerOpt = None,
) -> None:
    """Run N real device agents in one process until Ctrl-C."""
    import signal
    import threading

    from edgefleet.broker import BrokerInfo
    from simulator.fleet import DeviceSpec, Fleet
    from simulator.registry import register_devices

    host, _, port = broker.rpartition(":")
    info = BrokerInfo(host or "127.0.0.1", int(port), mqtt_version, mqtt_version == 5)
    specs = [DeviceSpec(f"{prefix}-{i:04d}", hardware, {"sim": "1"}) for i in range(devices)]
    if register:
        from edgefleet.client import default_server

        register_devices(server or default_server(), specs)
    fleet = Fleet(specs, info, trust, data_root, workload_hz=workload_hz)
    fleet.start()
    console.print(f"[green]{devices} agents running[/] (Ctrl-C to stop)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
