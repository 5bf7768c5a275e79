"""`edgefleet devices`: register, list and provision devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    ServerOpt,
    api,
    client,
    console,
    fail,
    parse_pairs,
    print_json,
)
from edgefleet.commands.keys import DEFAULT_PASS_ENV, InsecureOpt, PassEnvOpt, PassFileOpt, resolve_passphrase

devices_app = typer.Typer(help="Register, list and provision devices.", no_args_is_help=True)


@devices_app.command("register")
def devices_register(
    device_id: Annotated[str, typer.Argument(help="Device id (its MQTT identity).")],
    hardware: Annotated[str, typer.Option("--hw", help="Hardware id, e.g. rpi4.")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value (repeatable).")] = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device so the server accepts its messages and serves it bundles."""
    tags = parse_pairs(tag, "--tag")
    with client(server) as conn:
        device = api(lambda: conn.register_device(device_id, hardware, tags))
    if as_json:
        print_json(device)
    else:
        console.print(f"[green]registered[/] {device_id} ({hardware})")


@devices_app.command("provision")
def devices_provision(
    device_id: Annotated[str, typer.Argument(help="Device id (its MQTT username and client id).")],
    hardware: Annotated[str, typer.Option("--hw", help="Hardware id, e.g. rpi4.")],
    broker_host: Annotated[str, typer.Option("--broker-host", help="Broker address the device connects to.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Bootstrap directory (default: ./ID).")
    ] = None,
    keys: Annotated[Path, typer.Option("--keys", help="Key directory (trust roots, fleet CA).")] = Path(
        "keys"
    ),
    broker_port: Annotated[int, typer.Option("--broker-port", min=1, max=65535)] = 8883,
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file", help="Mosquitto password file to add the device to (broker config dir)."
        ),
    ] = None,
    metadata_url: Annotated[str | None, typer.Option("--metadata-url", help="TUF metadata base URL.")] = None,
    targets_url: Annotated[str | None, typer.Option("--targets-url", help="TUF targets base URL.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-provision (new credentials).")] = False,
    auth: Annotated[
        str | None,
        typer.Option(
            "--auth",
            help="What agent.toml authenticates with: password or mtls "
            "(default: password with --password-file, else mtls).",
        ),
    ] = None,
    data_dir: Annotated[
        str, typer.Option("--data-dir", help="Agent state directory in agent.toml (relative: next to it).")
    ] = "data",
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a device identity (password + client certificate), its agent.toml and bootstrap file.

    The directory is what the device needs: `python -m device_agent --config agent.toml` runs as
    written (TLS to the broker, its credentials, trust anchors)."""
    from edgefleet.provision import AUTH_MODES, ProvisionError, provision_device
    from signing.errors import TrustError
    from signing.keyring import KeyDir
    from signing.keys import KeyLocked, WrongPassphrase

    if auth is not None and auth not in AUTH_MODES:
        fail(f"--auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}", 2)
    if not (keys / "trust.json").exists():
        fail(f"no key directory at {keys} (run `edgefleet keys init`)")
    passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
    out = out or Path(device_id)
    try:
        result = provision_device(
            KeyDir(keys), device_id, hardware, out, broker_host=broker_host, broker_port=broker_port,
            password_file=password_file, metadata_url=metadata_url, targets_url=targets_url,
            passphrase=passphrase, force=force, auth=auth, data_dir=data_dir,
        )  # fmt: skip
    except (ProvisionError, FileExistsError, KeyLocked, WrongPassphrase, TrustError, OSError) as exc:
        fail(f"cannot provision {device_id!r}: {exc}")
    info = {"device_id": device_id, "bootstrap": str(result.bootstrap), "cert": str(result.cert),
            "agent_config": str(result.agent_config), "auth": result.auth,
            "password_file": str(password_file) if password_file else None}  # fmt: skip
    if as_json:
        print_json(info)
        return
    console.print(f"[green]provisioned[/] {device_id}: copy {out}/ to the device (it holds its secrets)")
    console.print(f"run it with: python -m device_agent --config {result.agent_config.name} ({result.auth})")
    if password_file:
        console.print(f"added to {password_file}: reload the broker (SIGHUP) to let it in")


@devices_app.command("list")
def devices_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """List devices with what they run and their deployment state."""
    with client(server) as conn:
        devices = api(conn.devices)
    if as_json:
        print_json(devices)
        return
    table = Table("device", "hw", "online", "running", "state", "seq", "tags")
    for d in devices:
        running = d.get("running_model") or {}
        table.add_row(
            d["device_id"],
            d["hardware_id"],
            "yes" if d.get("online") else "no",
            f"{running.get('name')}:{running.get('version')}" if running else "-",
            str(d.get("deployment_state") or "-"),
            str(d.get("deployment_seq") or 0),
            ",".join(f"{k}={v}" for k, v in (d.get("tags") or {}).items()),
        )
    console.print(table)


@devices_app.command("drift")
def devices_drift(
    drifting: Annotated[bool, typer.Option("--drifting", help="Only devices drifting now.")] = False,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Devices the server saw off their desired seq or model, and the directives it republished."""
    with client(server) as conn:
        rows = api(lambda: conn.drift(drifting))
    if as_json:
        print_json(rows)
        return
    table = Table("device", "drift", "episodes", "republished", "restored", "since", "detail")
    for r in rows:
        table.add_row(
            r["device_id"], r["drift"], str(r["episodes"]), str(r["republished"]), str(r["restored"]),
            str(r.get("since") or "-"), r.get("detail") or "",
        )  # fmt: skip
    console.print(table)


# ---------------------------------------------------------------- rollouts
