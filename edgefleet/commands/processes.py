"""Long-running processes: `edgefleet server`, `agent`, `sim`, `broker run`, `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.commands.common import (
    JsonOpt,
    ServerOpt,
    console,
    fail,
)

broker_app = typer.Typer(help="Run a local MQTT broker for trials.", no_args_is_help=True)


def server_cmd(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    keys: Annotated[
        Path | None, typer.Option("--keys", help="Dir with trust.json, fleet.key [EDGEFLEET_KEYS_DIR].")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Artifacts and SQLite [EDGEFLEET_DATA_DIR].")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL, e.g. PostgreSQL [EDGEFLEET_DATABASE_URL].")
    ] = None,
    mqtt: Annotated[str | None, typer.Option(help="Broker host:port [EDGEFLEET_MQTT_HOST/PORT].")] = None,
    public_url: Annotated[
        str | None, typer.Option(help="Base URL devices download from [EDGEFLEET_PUBLIC_URL].")
    ] = None,
) -> None:
    """Run the fleet server: admin API, rollout engine, MQTT bridge, artifact serving.

    Every setting also comes from its EDGEFLEET_* environment variable; flags win.
    """
    from fleet_server.runner import main
    from fleet_server.settings import ServerSettings

    overrides: dict[str, Any] = {
        "keys_dir": keys,
        "data_dir": data_dir,
        "database_url": database_url,
        "public_url": public_url,
    }
    if mqtt:
        mhost, _, mport = mqtt.rpartition(":")
        overrides.update(mqtt_host=mhost or "127.0.0.1", mqtt_port=int(mport))
    settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    if not (Path(settings.keys_dir) / "trust.json").is_file():
        fail(f"no trust.json in {settings.keys_dir}: run `edgefleet keys init` or pass --keys")
    main(settings, host, port)


def agent_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="Agent TOML config.", exists=True)],
    synthetic_hz: Annotated[
        float, typer.Option("--synthetic-load", help="Run N random inferences/s (demo only).")
    ] = 0.0,
) -> None:
    """Run the device agent until SIGINT/SIGTERM."""
    import logging

    from device_agent.config import load_config
    from device_agent.run import run_agent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config)
    except (ValueError, TypeError, OSError) as exc:
        fail(f"{config}: {exc}")
    run_agent(cfg, workload_hz=synthetic_hz)


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


def demo_cmd(
    devices: Annotated[int, typer.Option("--devices", "-n", help="Simulated devices.")] = 50,
    keep: Annotated[Path | None, typer.Option(help="Keep the work directory here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """End to end: train, compile, sign, push, roll out to simulated devices, catch a bad model."""
    from edgefleet.demo import run_demo

    ok = run_demo(devices=devices, workdir=keep, as_json=as_json)
    raise typer.Exit(0 if ok else 1)
