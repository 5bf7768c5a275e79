"""`edgefleet broker`: run a throwaway local broker, or write a production Mosquitto configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.commands.common import (
    JsonOpt,
    console,
    fail,
    print_json,
)
from edgefleet.commands.keys import DEFAULT_PASS_ENV, InsecureOpt, PassEnvOpt, PassFileOpt, resolve_passphrase

broker_app = typer.Typer(
    help="Run a local MQTT broker for trials, or write a production Mosquitto config.", no_args_is_help=True
)


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


@broker_app.command("config")
def broker_config(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for mosquitto.conf and its files.")],
    hostname: Annotated[
        list[str], typer.Option("--hostname", help="Broker DNS name or IP for its certificate (repeatable).")
    ],
    keys: Annotated[Path, typer.Option("--keys", help="Key directory (holds the fleet CA).")] = Path("keys"),
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TLS listener port.")] = 8883,
    bind: Annotated[str, typer.Option("--bind", help="Listen address.")] = "0.0.0.0",
    auth: Annotated[
        str, typer.Option("--auth", help="Device authentication: password or mtls.")
    ] = "password",
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Persistence directory (default: OUT/data).")
    ] = None,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a production Mosquitto config: TLS, password file or mTLS, per-device ACL, persistence."""
    from edgefleet.broker_config import AUTH_MODES, write_broker_config
    from edgefleet.provision import ProvisionError
    from signing.keyring import KeyDir
    from signing.keys import KeyLocked, WrongPassphrase

    if auth not in AUTH_MODES:
        fail(f"--auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}", 2)
    if not (keys / "trust.json").exists():
        fail(f"no key directory at {keys} (run `edgefleet keys init`)")
    passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
    try:
        files = write_broker_config(
            KeyDir(keys), out, hostnames=hostname, port=port, bind=bind, auth=auth,
            persistence_dir=data_dir, passphrase=passphrase,
        )  # fmt: skip
    except (ValueError, OSError, KeyLocked, WrongPassphrase, ProvisionError) as exc:
        fail(f"cannot write the broker config: {exc}")
    info = {k: str(v) if v is not None else None for k, v in vars(files).items()}
    if as_json:
        print_json(info)
        return
    console.print(f"[green]wrote[/] {files.conf} ({auth}, TLS on {bind}:{port})")
    console.print(f"start it with: mosquitto -c {files.conf}")
    console.print(f"[yellow]the fleet server's broker credentials are in {files.server_credentials}[/]")
