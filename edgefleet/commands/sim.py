"""`edgefleet sim`: run a scenario (`sim run x.toml`), or N real agents against a running stack."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgefleet.commands.common import JsonOpt, ServerOpt, TokenOpt, console, err, fail, print_json, warn
from edgefleet.commands.keys import DEFAULT_PASS_ENV, InsecureOpt, PassEnvOpt, PassFileOpt, resolve_passphrase

if TYPE_CHECKING:
    from simulator.runner import RunResult

sim_app = typer.Typer(
    help="Simulate a fleet: scenarios with faults against a real broker and server, or a plain fleet.",
    no_args_is_help=True,
)


@sim_app.command("run")
def run_cmd(
    scenario: Annotated[Path, typer.Argument(help="Scenario TOML file (see docs/simulator.md).")],
    small: Annotated[
        bool, typer.Option("--small", help="Apply the file's [small] overrides (CI size).")
    ] = False,
    report_dir: Annotated[
        Path | None, typer.Option(help="Where the report goes (default: <workdir>/report).")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Work directory (default: a new temp dir).")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Server database URL (default: SQLite in the workdir).")
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            "-p",
            min=1,
            max=64,
            help="Split the fleet over N worker processes (default: the file's fleet.processes, else 1).",
        ),
    ] = None,
    broker_auth: Annotated[
        str,
        typer.Option(
            "--broker-auth",
            help="How devices authenticate to the production broker: mtls or password; "
            "insecure-dev runs the open development broker instead.",
        ),
    ] = "mtls",
    as_json: JsonOpt = False,
) -> None:
    """Start a broker and a server, run the scenario, write the report; exit 1 if an expectation fails."""
    import logging

    from edgefleet.sim_harness import BROKER_MODES, run_scenario
    from simulator.scenario import ScenarioError

    if broker_auth not in BROKER_MODES:
        fail(f"--broker-auth must be one of {', '.join(BROKER_MODES)}, got {broker_auth!r}", 2)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("simulator.runner").setLevel(logging.INFO)
    try:
        outcome = run_scenario(
            scenario,
            small=small,
            workdir=workdir,
            report_dir=report_dir,
            database_url=database_url,
            processes=processes,
            broker_auth=broker_auth,
        )
    except ScenarioError as exc:
        fail(str(exc), 2)
    if as_json:
        print_json(run_document(outcome.result, outcome.report))
    else:
        show_run(outcome.result, outcome.report)
    if not outcome.result.ok:
        raise typer.Exit(1)


def run_document(result: RunResult, report: dict[str, Path]) -> dict[str, Any]:
    """What `sim run --json` prints: the checks and the figures as data."""
    from simulator.report import summary_rows

    return {
        "scenario": result.scenario,
        "ok": result.ok,
        "step_error": result.step_error,
        "skipped": result.skipped,
        "checks": [{"outcome": o, "expectation": e, "detail": d} for o, e, d in summary_rows(result)],
        "figures": result.figures,
        "report": {k: str(v) for k, v in report.items()},
    }


def show_run(result: RunResult, report: dict[str, Path]) -> None:
    """A run for a person: the checks and the figures as tables, then why the script stopped and
    what was skipped (stderr, as text: a reason may hold brackets), then where the report is."""
    console.print(checks_table(result))
    console.print(figures_table(result.figures))
    if result.step_error:
        err.print(Text.assemble(("script stopped: ", "bold red"), result.step_error), highlight=False)
    for why in result.skipped:
        warn(f"skipped: {why}")
    console.print(Text(f"report: {report.get('html')}"), highlight=False)


OUTCOME_STYLES = {"pass": "green", "FAIL": "bold red", "xfail": "yellow", "xpass": "cyan", "skip": "magenta"}


def checks_table(result: RunResult) -> Table:
    """The run's checks: outcome, expectation, detail (cells are text, never markup)."""
    from simulator.report import summary_rows

    table = Table("outcome", "expectation", "detail", title=f"scenario {result.scenario}")
    for outcome, expectation, detail in summary_rows(result):
        table.add_row(Text(outcome, style=OUTCOME_STYLES[outcome]), Text(expectation), Text(detail))
    return table


def figures_table(figures: dict[str, Any]) -> Table:
    """The run's figures with readable values (``rpi4=18, jetson=6``, not a dict)."""
    from simulator.report import figure_rows

    table = Table("figure", "value", title="figures")
    for name, value in figure_rows(figures):
        table.add_row(Text(name), Text(value))
    return table


@sim_app.command("check")
def check_cmd(
    scenario: Annotated[Path, typer.Argument(help="Scenario TOML file.")],
    small: Annotated[bool, typer.Option("--small", help="Check with the [small] overrides applied.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate a scenario file without running it (exit 2 with the bad keys named)."""
    from simulator.readable import readable
    from simulator.scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(scenario, small=small)
    except ScenarioError as exc:
        fail(str(exc), 2)
    classes = dict(sc.class_counts())
    if as_json:
        print_json(
            {"ok": True, "scenario": sc.name, "devices": sc.fleet.devices, "classes": classes,
             "steps": len(sc.steps), "expectations": len(sc.expect)}
        )  # fmt: skip
        return
    console.print(
        Text(f"{sc.name}: {sc.fleet.devices} devices ({readable(classes)}), {len(sc.steps)} steps, ok"),
        highlight=False,
    )


@sim_app.command("fleet")
def sim_cmd(
    devices: Annotated[int, typer.Option("--devices", "-n", help="How many agents.")] = 50,
    broker: Annotated[str, typer.Option(help="host:port of the MQTT broker.")] = "127.0.0.1:1883",
    mqtt_version: Annotated[int, typer.Option(help="5 or 4 (3.1.1).")] = 5,
    trust: Annotated[Path, typer.Option(help="trust.json the devices are provisioned with.")] = Path(
        "keys/trust.json"
    ),
    hardware: Annotated[str, typer.Option("--hw", help="Hardware id of the devices.")] = "rpi4",
    prefix: Annotated[str, typer.Option(help="Device id prefix.")] = "sim",
    first: Annotated[
        int, typer.Option(help="Number of the first device (split a fleet over processes).")
    ] = 0,
    workload_hz: Annotated[float, typer.Option(help="Inferences per second per device.")] = 2.0,
    data_root: Annotated[Path, typer.Option(help="Where device data dirs go.")] = Path(".sim"),
    register: Annotated[bool, typer.Option(help="Register the devices with the server first.")] = True,
    tuf_root: Annotated[
        Path | None,
        typer.Option(help="TUF root.json the devices are provisioned with (TUF mode; else DSSE-only)."),
    ] = None,
    broker_dir: Annotated[
        Path | None,
        typer.Option(
            "--broker-dir",
            help="A production broker's directory (`broker config --auth mtls` / `broker run`: its "
            "ca.crt): devices get client certificates from the fleet CA in --keys, kept under "
            "BROKER_DIR/devices/. Without it: an open development broker.",
        ),
    ] = None,
    keys: Annotated[Path, typer.Option("--keys", help="Key directory holding the fleet CA.")] = Path("keys"),
    shards: Annotated[
        Path | None,
        typer.Option(
            "--shards",
            help="shards.json of several production brokers (`broker run --shards N` / `broker config "
            "--shards N`, mtls): each device on the shard its id hashes to, as provisioning places it. "
            "Replaces --broker and --broker-dir.",
        ),
    ] = None,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run N real device agents in one process against an existing broker and server until Ctrl-C.

    It prints one line (--json: one object) once every agent is connected, then runs on."""
    import signal
    import threading

    import httpx

    from edgefleet.broker import BrokerInfo, SecureBrokerInfo, provision_devices
    from edgefleet.provision import ProvisionError
    from signing.keys import KeyLocked, WrongPassphrase
    from simulator.fleet import DeviceSpec, Fleet
    from simulator.registry import register_devices

    host, _, port = broker.rpartition(":")
    if not port.isdigit():
        fail(f"--broker must be host:port, got {broker!r}", 2)
    info = BrokerInfo(host or "127.0.0.1", int(port), mqtt_version, mqtt_version == 5)
    specs = [DeviceSpec(f"{prefix}-{i:05d}", hardware, {"sim": "1"}) for i in range(first, first + devices)]
    credentials: dict[str, dict[str, object]] = {}
    if shards is not None:
        if broker_dir is not None:
            fail("--shards names every broker's directory: no --broker-dir with it", 2)
        from fleet_server.shards import ShardError, assign, load_shards

        try:
            all_shards = load_shards(shards)
        except ShardError as exc:
            fail(str(exc), 2)
        names = [sh.name for sh in all_shards]
        where = {sh.name: sh for sh in all_shards}
        placed = {s.device_id: assign(s.device_id, names) for s in specs}
        specs = [
            DeviceSpec(
                s.device_id, s.hardware_id, s.tags,
                mqtt_host=where[placed[s.device_id]].host, mqtt_port=where[placed[s.device_id]].port,
            )
            for s in specs
        ]  # fmt: skip
        info = BrokerInfo(all_shards[0].host, all_shards[0].port, mqtt_version, mqtt_version == 5)
        passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
        for sh in all_shards:
            if sh.server_credentials is None:
                fail(f"{shards}: shard {sh.name} names no server_credentials (its broker directory)", 2)
            secure = SecureBrokerInfo(
                sh.host, sh.port, mqtt_version, mqtt_version == 5, auth="mtls",
                files_dir=sh.server_credentials.parent.resolve(), keys_dir=keys.resolve(),
            )  # fmt: skip
            mine = [d for d, name in placed.items() if name == sh.name]
            try:
                credentials |= provision_devices(secure, mine, passphrase)
            except (ProvisionError, KeyLocked, WrongPassphrase, OSError) as exc:
                fail(f"cannot issue the devices' certificates: {exc}")
    elif broker_dir is not None:
        if not (broker_dir / "ca.crt").is_file():
            fail(f"no ca.crt in {broker_dir}: give the directory `broker config` wrote", 2)
        secure = SecureBrokerInfo(
            info.host, info.port, mqtt_version, mqtt_version == 5, auth="mtls",
            files_dir=broker_dir.resolve(), keys_dir=keys.resolve(),
        )  # fmt: skip
        passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
        try:
            credentials = dict(provision_devices(secure, [s.device_id for s in specs], passphrase))
        except (ProvisionError, KeyLocked, WrongPassphrase, OSError) as exc:
            fail(f"cannot issue the devices' certificates: {exc}")
    else:
        warn("no --broker-dir: the devices connect without TLS (an open development broker)")
    if register:
        from edgefleet.client import default_server

        url = server or default_server()
        try:
            register_devices(url, specs, token=token)
        except httpx.HTTPStatusError as exc:
            answer = f"HTTP {exc.response.status_code}: {exc.response.text[:200]}"
            fail(f"cannot register the devices with {url}: {answer}")
        except httpx.HTTPError as exc:
            fail(f"cannot register the devices with {url}: {exc}", code="unreachable")
    fleet = Fleet(
        specs,
        info,
        trust,
        data_root,
        workload_hz=workload_hz,
        tuf_root_path=tuf_root,
        credentials=credentials,
    )
    fleet.start()
    if as_json:
        print_json({"devices": devices, "first": specs[0].device_id if specs else None,
                    "last": specs[-1].device_id if specs else None, "hardware_id": hardware,
                    "broker": broker if shards is None else str(shards),
                    "tls": broker_dir is not None or shards is not None})  # fmt: skip
    else:
        console.print(Text.assemble((f"{devices} agents running", "green"), " (Ctrl-C to stop)"))
    sys.stdout.flush()  # it runs on: a script waiting for this line must get it now
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
