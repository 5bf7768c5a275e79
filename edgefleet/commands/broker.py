"""`edgefleet broker`: run a local broker (the production configuration on loopback, or an open
development one), or write a production Mosquitto configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from edgefleet.commands.common import (
    JsonOpt,
    console,
    fail,
    print_json,
)
from edgefleet.commands.keys import DEFAULT_PASS_ENV, InsecureOpt, PassEnvOpt, PassFileOpt, resolve_passphrase

broker_app = typer.Typer(
    help="Run a local MQTT broker (production config on loopback, or --insecure-dev), "
    "or write a production Mosquitto config.",
    no_args_is_help=True,
)


@broker_app.command("run")
def broker_run(
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Broker directory: config, credentials, persistence (default: a temp dir)."
        ),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option("--keys", help="Key directory holding the fleet CA (default: keys/ if it exists)."),
    ] = None,
    auth: Annotated[str, typer.Option("--auth", help="Device authentication: mtls or password.")] = "mtls",
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            min=1,
            max=65535,
            help="Port of the devices' listener (default: a free one).",
            show_default=False,
        ),
    ] = None,
    server_port: Annotated[
        int | None,
        typer.Option(
            "--server-port",
            min=1,
            max=65535,
            help="Port of the fleet server's TLS listener (default: a free one; production broker only).",
            show_default=False,
        ),
    ] = None,
    insecure_dev: Annotated[
        bool,
        typer.Option("--insecure-dev", help="An OPEN development broker instead: no TLS, anonymous, no ACL."),
    ] = False,
    embedded: Annotated[
        bool, typer.Option(help="With --insecure-dev: the embedded pure-Python broker (MQTT 3.1.1).")
    ] = False,
    shards: Annotated[
        int,
        typer.Option(
            "--shards",
            min=1,
            max=64,
            help="Run N production brokers from one fleet CA on free ports, and DIR/shards.json naming them.",
        ),
    ] = 1,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a local broker until SIGINT/SIGTERM: the production configuration (TLS, per-device identity,
    ACL; what `broker config` writes) on loopback ports, or with --insecure-dev an open one.

    It prints where it listens once it does (--json: one object, for scripts), then runs on."""
    import signal
    import sys
    import threading

    from edgefleet.broker import (
        PortTaken,
        SecureBrokerInfo,
        security_label,
        start_embedded,
        start_mosquitto,
        start_secure_broker,
    )
    from edgefleet.provision import AUTH_MODES, ProvisionError
    from signing.keys import KeyLocked, WrongPassphrase

    if auth not in AUTH_MODES:
        fail(f"--auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}", 2)
    if embedded and not insecure_dev:
        fail("the embedded broker is open (no TLS, no ACL): ask for it with --insecure-dev --embedded", 2)
    if server_port is not None and insecure_dev:
        fail("--server-port is the production broker's server listener; the open broker has one port", 2)
    if port is not None and port == server_port:
        fail(f"--port and --server-port must differ, both are {port}", 2)
    if shards > 1 and (insecure_dev or port is not None or server_port is not None):
        fail("--shards runs production brokers on free ports: no --insecure-dev, --port or --server-port", 2)
    # before the broker starts: a SIGTERM from now on stops it instead of leaving it running
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if shards > 1:
        _run_shards(shards, workdir, keys, auth, passphrase_file, passphrase_env, insecure, as_json, stop)
        return
    if insecure_dev:
        try:
            broker = start_embedded(port) if embedded else start_mosquitto(port, workdir=workdir)
        except PortTaken:
            fail(f"cannot start the broker: port {port} is taken by another process")
        except (OSError, RuntimeError) as exc:
            fail(f"cannot start the broker: {exc}")
    else:
        if keys is None and (Path("keys") / "trust.json").exists():
            keys = Path("keys")
        passphrase = None
        if keys is not None:
            passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
        try:
            broker = start_secure_broker(
                workdir, auth=auth, keys_dir=keys, passphrase=passphrase, port=port, server_port=server_port
            )
        except PortTaken:
            taken = " or ".join(str(p) for p in (port, server_port) if p is not None)
            fail(f"cannot start the broker: port {taken} is taken by another process")
        except (OSError, RuntimeError, ValueError, KeyLocked, WrongPassphrase, ProvisionError) as exc:
            fail(f"cannot start the broker: {exc}")
    info = broker.info
    summary: dict[str, object] = {"kind": info.kind, "url": info.url, "security": security_label(info)}
    if isinstance(info, SecureBrokerInfo):
        summary |= {
            "server_port": info.server_port,
            "server_credentials": str(info.server_credentials),
            "ca_file": str(info.ca_file),
            "keys": str(info.keys_dir),
            "pid": info.pid,
            "password_file": str(info.files_dir / "passwd") if info.auth == "password" else None,
        }
    if as_json:
        print_json(summary)
    elif isinstance(info, SecureBrokerInfo):
        say((info.kind, "green"), f" devices on {info.url}, fleet server on port {info.server_port}")
        say(f"  {summary['security']}")
        say(f"  server: edgefleet server --mqtt-credentials {info.server_credentials}")
        extra = (
            f" --password-file {summary['password_file']} (then: kill -HUP {info.pid})"
            if info.auth == "password"
            else ""
        )
        say(
            f"  devices: edgefleet devices provision ID --hw HW --keys {info.keys_dir} "
            f"--broker-host {info.host} --broker-port {info.port}{extra}"
        )
    else:
        say((info.kind, "bold yellow"), f" on {info.url} (MQTT v{info.mqtt_version})")
        say((str(summary["security"]), "bold yellow"))
    sys.stdout.flush()  # it runs on: a script reading this output must get it now
    process = getattr(broker, "process", None)
    try:
        while not stop.wait(0.5):
            if process is not None and process.poll() is not None:
                fail(f"the broker exited with code {process.returncode}")
    finally:
        broker.stop()


@broker_app.command("config")
def broker_config(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for mosquitto.conf and its files.")],
    hostname: Annotated[
        list[str], typer.Option("--hostname", help="Broker DNS name or IP for its certificate (repeatable).")
    ],
    keys: Annotated[Path, typer.Option("--keys", help="Key directory (holds the fleet CA).")] = Path("keys"),
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="TLS listener port of the devices.")
    ] = 8883,
    bind: Annotated[str, typer.Option("--bind", help="Listen address.")] = "0.0.0.0",
    server_port: Annotated[
        int,
        typer.Option(
            "--server-port", min=1, max=65535, help="TLS listener of the fleet server (its certificate only)."
        ),
    ] = 8884,
    server_bind: Annotated[
        str | None, typer.Option("--server-bind", help="Its listen address (default: --bind).")
    ] = None,
    auth: Annotated[
        str, typer.Option("--auth", help="Device authentication: password or mtls.")
    ] = "password",
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Persistence directory (default: OUT/data).")
    ] = None,
    shards: Annotated[
        int,
        typer.Option(
            "--shards",
            min=1,
            max=64,
            help="Write N brokers (OUT/shard-<i>/, ports PORT+2i and SERVER_PORT+2i) and OUT/shards.json "
            "for the server's --mqtt-shards and `devices provision --shards`.",
        ),
    ] = 1,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a production Mosquitto config: TLS, password file or mTLS, per-device ACL, persistence.

    With --shards N, N such brokers from the same fleet CA, and the shards file naming them."""
    from edgefleet.broker_config import AUTH_MODES, write_broker_config, write_shard_configs
    from edgefleet.provision import ProvisionError
    from signing.keyring import KeyDir
    from signing.keys import KeyLocked, WrongPassphrase

    if auth not in AUTH_MODES:
        fail(f"--auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}", 2)
    if not (keys / "trust.json").exists():
        fail(f"no key directory at {keys} (run `edgefleet keys init`)")
    passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
    if shards > 1:
        if data_dir is not None:
            fail("--data-dir names one broker's persistence; with --shards each has OUT/shard-<i>/data", 2)
        try:
            shards_file, all_files = write_shard_configs(
                KeyDir(keys), out, shards, hostnames=hostname, port=port, bind=bind, auth=auth,
                passphrase=passphrase, server_port=server_port, server_bind=server_bind,
            )  # fmt: skip
        except (ValueError, OSError, KeyLocked, WrongPassphrase, ProvisionError) as exc:
            fail(f"cannot write the broker configs: {exc}")
        if as_json:
            print_json(
                {
                    "shards_file": str(shards_file),
                    "shards": [
                        {k: str(v) if v is not None else None for k, v in vars(f).items()} for f in all_files
                    ],
                }
            )
            return
        for f in all_files:
            say(
                ("wrote", "green"),
                f" {f.conf} ({auth}, TLS: devices on port {f.port}, server on port {f.server_port})",
            )
        say(f"wrote {shards_file}: start each with mosquitto -c <its mosquitto.conf>")
        say(
            (
                f"the fleet server connects to all of them: edgefleet server --mqtt-shards {shards_file}",
                "yellow",
            )
        )
        say(f"devices: edgefleet devices provision ID --hw HW --keys {keys} --shards {shards_file}")
        return
    try:
        files = write_broker_config(
            KeyDir(keys), out, hostnames=hostname, port=port, bind=bind, auth=auth,
            persistence_dir=data_dir, passphrase=passphrase, server_port=server_port, server_bind=server_bind,
        )  # fmt: skip
    except (ValueError, OSError, KeyLocked, WrongPassphrase, ProvisionError) as exc:
        fail(f"cannot write the broker config: {exc}")
    info = {k: str(v) if v is not None else None for k, v in vars(files).items()}
    if as_json:
        print_json(info)
        return
    say(
        ("wrote", "green"),
        f" {files.conf} ({auth}, TLS: devices on {bind}:{port}, server on port {server_port})",
    )
    say(f"start it with: mosquitto -c {files.conf}")
    say(
        (
            f"the fleet server connects with: edgefleet server --mqtt-credentials {files.server_credentials}",
            "yellow",
        )
    )


def _run_shards(
    shards: int,
    workdir: Path | None,
    keys: Path | None,
    auth: str,
    passphrase_file: Path | None,
    passphrase_env: str,
    insecure: bool,
    as_json: bool,
    stop: Any,
) -> None:
    """``broker run --shards N``: N production brokers until SIGINT/SIGTERM; one exiting ends all."""
    import sys

    from edgefleet.broker import security_label, start_secure_shards
    from edgefleet.provision import ProvisionError
    from signing.keys import KeyLocked, WrongPassphrase

    if keys is None and (Path("keys") / "trust.json").exists():
        keys = Path("keys")
    passphrase = None
    if keys is not None:
        passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
    try:
        group = start_secure_shards(shards, workdir, auth=auth, keys_dir=keys, passphrase=passphrase)
    except (OSError, RuntimeError, ValueError, KeyLocked, WrongPassphrase, ProvisionError) as exc:
        fail(f"cannot start the brokers: {exc}")
    infos = group.infos
    first = next(iter(infos.values()))
    summary = {
        "kind": "mosquitto",
        "security": security_label(first),
        "shards_file": str(group.shards_file),
        "keys": str(first.keys_dir),
        "shards": [
            {"name": name, "url": i.url, "server_port": i.server_port, "pid": i.pid,
             "server_credentials": str(i.server_credentials),
             "password_file": str(i.files_dir / "passwd") if auth == "password" else None}
            for name, i in infos.items()
        ],
    }  # fmt: skip
    if as_json:
        print_json(summary)
    else:
        for name, i in infos.items():
            say(("mosquitto", "green"), f" {name}: devices on {i.url}, fleet server on port {i.server_port}")
        say(f"  {summary['security']}; shards file {group.shards_file}")
        say(f"  server: edgefleet server --mqtt-shards {group.shards_file}")
        say(
            f"  devices: edgefleet devices provision ID --hw HW --keys {first.keys_dir} "
            f"--shards {group.shards_file}"
        )
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            for name, b in group.brokers.items():
                process = getattr(b, "process", None)
                if process is not None and process.poll() is not None:
                    fail(f"broker {name} exited with code {process.returncode}")
    finally:
        group.stop()


def say(*parts: str | tuple[str, str]) -> None:
    """One line on stdout as text (paths may hold brackets; never markup), styled parts as (text, style)."""
    console.print(Text.assemble(*parts), highlight=False, soft_wrap=True)
