"""Long-running processes: `edgefleet server`, `agent`, `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.commands.common import (
    JsonOpt,
    fail,
    warn,
)


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
    mqtt_credentials: Annotated[
        Path | None,
        typer.Option(
            "--mqtt-credentials",
            help="fleet-server.json from `edgefleet broker config`: the broker's server listener, "
            "CA and the server's client certificate [EDGEFLEET_MQTT_CREDENTIALS].",
        ),
    ] = None,
    mqtt_shards: Annotated[
        Path | None,
        typer.Option(
            "--mqtt-shards",
            help="shards.json from `edgefleet broker config --shards N`: several brokers, each with its "
            "fleet-server.json; replaces --mqtt and --mqtt-credentials [EDGEFLEET_MQTT_SHARDS].",
        ),
    ] = None,
    key_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding fleet.key's passphrase [EDGEFLEET_KEY_PASSPHRASE_FILE; else "
            "EDGEFLEET_KEY_PASSPHRASE, else systemd's $CREDENTIALS_DIRECTORY/edgefleet-key-passphrase]."
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="Base URL devices download from [EDGEFLEET_PUBLIC_URL]; default: this server's "
            "scheme, address and port."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Serve HTTPS with this certificate (PEM).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="... and its private key (PEM).")] = None,
    fd: Annotated[
        int | None,
        typer.Option(
            "--fd",
            help="Serve on this inherited, bound TCP socket (descriptor number) instead of binding "
            "--host/--port: a supervisor or test holds the port from the moment it chooses it.",
            min=0,
        ),
    ] = None,
) -> None:
    """Run the fleet server: admin API, rollout engine, MQTT bridge, artifact serving.

    Every setting also comes from its EDGEFLEET_* environment variable; flags win.
    """
    from fleet_server.keyload import FleetKeyError, unlock_fleet_key
    from fleet_server.mqtt_client import MqttConfigError, shard_endpoints
    from fleet_server.settings import ServerSettings

    overrides: dict[str, Any] = {
        "keys_dir": keys,
        "data_dir": data_dir,
        "database_url": database_url,
        "public_url": public_url,
        "key_passphrase_file": key_passphrase_file,
        "mqtt_credentials": mqtt_credentials,
        "mqtt_shards": mqtt_shards,
    }
    if mqtt:
        mhost, _, mport = mqtt.rpartition(":")
        if not mport.isdigit():
            fail(f"--mqtt must be host:port, got {mqtt!r}", 2)
        overrides.update(mqtt_host=mhost or "127.0.0.1", mqtt_port=int(mport))
    settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    if not (Path(settings.keys_dir) / "trust.json").is_file():
        fail(f"no trust.json in {settings.keys_dir}: run `edgefleet keys init` or pass --keys")
    try:
        # before the server's imports (a second or more of CPU): a locked key is reported at once
        fleet_key = unlock_fleet_key(settings)
    except FleetKeyError as exc:  # a locked key is a configuration error: one line, no traceback
        fail(str(exc))
    from fleet_server.runner import main, tls_options

    try:
        brokers = shard_endpoints(settings)
        tls_options(tls_cert, tls_key)
    except (MqttConfigError, ValueError) as exc:
        fail(str(exc), 2)
    for broker in brokers.values():
        if not broker.security.tls:
            warn(f"the broker connection ({broker.url}) is not TLS: development only")
    try:
        main(settings, host, port, tls_cert=tls_cert, tls_key=tls_key, fd=fd, fleet_key=fleet_key)
    except FleetKeyError as exc:  # an unencrypted key that is not a key: found by the app
        fail(str(exc))


def agent_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="Agent TOML config.", exists=True)],
    synthetic_hz: Annotated[
        float, typer.Option("--synthetic-load", help="Run N random inferences/s (demo only).", min=0.0)
    ] = 0.0,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="json (default from config) or text.")
    ] = None,
) -> None:
    """Run the device agent until SIGINT/SIGTERM (see docs/agent.md for the config keys)."""
    from device_agent.config import load_config
    from device_agent.logs import setup_logging
    from device_agent.run import run_agent

    try:
        cfg = load_config(config)
    except (ValueError, TypeError, OSError) as exc:
        fail(f"{config}: {exc}")
    fmt = log_format or cfg.log_format
    if fmt not in ("json", "text"):
        fail(f"--log-format must be json or text, not {fmt!r}")
    setup_logging(fmt, cfg.log_level)
    run_agent(cfg, workload_hz=synthetic_hz)


def demo_cmd(
    devices: Annotated[int, typer.Option("--devices", "-n", help="Simulated devices.")] = 50,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the work directory (removed otherwise) and print where.")
    ] = False,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Work in this directory instead of a temporary one (it stays)."),
    ] = None,
    as_json: JsonOpt = False,
    console_ui: Annotated[
        bool,
        typer.Option(
            "--console",
            help="Afterwards leave the server running and print the web console's URL and a token (Ctrl-C"
            " stops it).",
        ),
    ] = False,
) -> None:
    """End to end: train, compile, sign, push, roll out to simulated devices, catch a bad model.

    Its temporary work directory is removed when it ends, passed, failed, interrupted (Ctrl-C,
    exit code 130) or terminated (SIGTERM, exit code 143), unless --keep.
    """
    import signal

    from edgefleet.demo import run_demo

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the stack stops, the directory goes

    signal.signal(signal.SIGTERM, terminated)
    ok = run_demo(devices=devices, workdir=workdir, as_json=as_json, keep=keep, console_ui=console_ui)
    raise typer.Exit(0 if ok else 1)
