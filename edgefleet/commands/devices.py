"""`edgefleet devices`: register, list and provision devices (one-device verbs: ``device_ops``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from edgefleet.commands.common import (
    EXIT_USAGE,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api,
    client,
    console,
    fail,
    parse_pairs,
    print_json,
)
from edgefleet.commands.device_ops import DEVICE_COLUMNS, device_row
from edgefleet.commands.keys import DEFAULT_PASS_ENV, InsecureOpt, PassEnvOpt, PassFileOpt, resolve_passphrase

devices_app = typer.Typer(help="Register, list and provision devices.", no_args_is_help=True)


@devices_app.command("register")
def devices_register(
    device_id: Annotated[str, typer.Argument(help="Device id (its MQTT identity).")],
    hardware: Annotated[str, typer.Option("--hw", help="Hardware id, e.g. rpi4.")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value (repeatable).")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device so the server accepts its messages and serves it bundles."""
    tags = parse_pairs(tag, "--tag")
    with client(server, token) as conn:
        device = api(lambda: conn.register_device(device_id, hardware, tags))
    if as_json:
        print_json(device)
    else:
        console.print(Text.assemble(("registered", "green"), f" {device_id} ({hardware})"))


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
    http_ca_file: Annotated[
        Path | None,
        typer.Option(
            "--http-ca-file",
            help="CA of the server's HTTPS certificate, copied for the agent (default with https "
            "URLs: the fleet CA).",
        ),
    ] = None,
    mirror: Annotated[
        list[str] | None,
        typer.Option(
            "--mirror",
            help="Base URL of a mirror of the published tree (static delivery; repeat, in the order "
            "the device tries them).",
        ),
    ] = None,
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
            passphrase=passphrase, force=force, auth=auth, data_dir=data_dir, http_ca_file=http_ca_file,
            mirrors=mirror,
        )  # fmt: skip
    except (ProvisionError, FileExistsError, KeyLocked, WrongPassphrase, TrustError, OSError) as exc:
        fail(f"cannot provision {device_id!r}: {exc}")
    info = {"device_id": device_id, "bootstrap": str(result.bootstrap), "cert": str(result.cert),
            "agent_config": str(result.agent_config), "auth": result.auth,
            "password_file": str(password_file) if password_file else None}  # fmt: skip
    if as_json:
        print_json(info)
        return
    console.print(
        Text.assemble(
            ("provisioned", "green"), f" {device_id}: copy {out}/ to the device (it holds its secrets)"
        ),
        highlight=False,
    )
    console.print(
        Text(f"run it with: python -m device_agent --config {result.agent_config.name} ({result.auth})"),
        highlight=False,
    )
    if password_file:
        console.print(
            Text(f"added to {password_file}: reload the broker (SIGHUP) to let it in"), highlight=False
        )


@devices_app.command("list")
def devices_list(
    selector: Annotated[
        str | None,
        typer.Option(
            "--selector", "-l", help="Only devices it picks: hw=rpi4,site=lab (as `rollouts create`)."
        ),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state",
            help="Only devices whose agent reports this deployment state: serving, failed, ...",
            show_default=False,
        ),
    ] = None,
    online: Annotated[
        bool | None,
        typer.Option(
            "--online/--offline", help="Only devices online, or only those offline.", show_default=False
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Only devices running it: name:version, a name, or a sha256."),
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List devices with what they run and their deployment state; the filters are the server's."""
    if state is not None:
        from device_agent.protocol import DeploymentState  # imports pydantic: only when asked for

        if state not in set(DeploymentState):
            fail(f"--state must be one of {', '.join(DeploymentState)}, got {state!r}", EXIT_USAGE)
    with client(server, token) as conn:
        devices = api(lambda: conn.devices(selector=selector, state=state, online=online, model=model))
    if as_json:
        print_json(devices)
        return
    table = Table(*DEVICE_COLUMNS)
    for d in devices:
        table.add_row(*device_row(d))
    console.print(table)


@devices_app.command("drift")
def devices_drift(
    drifting: Annotated[bool, typer.Option("--drifting", help="Only devices drifting now.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Devices the server saw off their desired seq or model, and the directives it republished."""
    with client(server, token) as conn:
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
