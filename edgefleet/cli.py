"""The ``edgefleet`` command line: git/kubectl-style subcommands over the five packages.

Heavy imports (onnxruntime, fastapi, sqlmodel) happen inside the command that
needs them, so ``edgefleet agent`` works on a device with the ``agent`` extra
only, and ``--help`` stays fast. Listing and status commands take ``--json``;
every failure exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="edgefleet",
    help="Compile, sign, roll out and serve ML models on fleets of edge devices.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Create and inspect signing keys and the trust root.", no_args_is_help=True)
models_app = typer.Typer(help="Push and list signed model bundles on the fleet server.", no_args_is_help=True)
devices_app = typer.Typer(help="Register and list devices.", no_args_is_help=True)
rollouts_app = typer.Typer(help="Create and steer staged rollouts.", no_args_is_help=True)
broker_app = typer.Typer(help="Run a local MQTT broker for trials.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(broker_app, name="broker")

console = Console()
err = Console(stderr=True)

ServerOpt = Annotated[
    str | None,
    typer.Option("--server", "-s", envvar="EDGEFLEET_SERVER", help="Fleet server URL."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _client(server: str | None) -> Any:
    from edgefleet.client import ApiClient

    return ApiClient(server)


def _api(call: Any) -> Any:
    """Run an API call; turn ApiError into a clean message and exit code 1."""
    from edgefleet.client import ApiError

    try:
        return call()
    except ApiError as exc:
        fail(f"{exc.code}: {exc.message}" if exc.message else exc.code)


# ---------------------------------------------------------------- keys


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Where to write the keys.")] = Path("keys"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate root, release and fleet keys and the root-signed trust root (trust.json)."""
    from signing.keyring import init_keys

    try:
        trust = init_keys(directory, force=force)
    except FileExistsError as exc:
        fail(str(exc))
    info = _trust_summary(trust)
    if as_json:
        print_json({"dir": str(directory), **info})
        return
    console.print(f"[green]wrote[/] keys and trust root to {directory}/")
    _print_trust(info)
    console.print(
        "[yellow]keep root.key and release.key offline; the server needs trust.json and fleet.key[/]"
    )


@keys_app.command("show")
def keys_show(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Key directory.")] = Path("keys"),
    as_json: JsonOpt = False,
) -> None:
    """Verify and show the trust root in a key directory."""
    from signing.errors import TrustError
    from signing.keyring import KeyDir

    try:
        info = _trust_summary(KeyDir(directory).trust_root())
    except (OSError, TrustError) as exc:
        fail(f"cannot read trust root in {directory}: {exc}")
    if as_json:
        print_json(info)
    else:
        _print_trust(info)


def _trust_summary(trust: Any) -> dict[str, Any]:
    return {
        "version": trust.version,
        "expires": trust.expires.isoformat(),
        "root_threshold": trust.root_threshold,
        "root_keys": sorted(trust.root_keys),
        "release_keys": sorted(trust.release_keys),
        "fleet_keys": sorted(trust.fleet_keys),
    }


def _print_trust(info: dict[str, Any]) -> None:
    table = Table("role", "key ids", title=f"trust root v{info['version']} (expires {info['expires']})")
    for role in ("root_keys", "release_keys", "fleet_keys"):
        table.add_row(role.removesuffix("_keys"), "\n".join(k[:16] + "…" for k in info[role]))
    console.print(table)


# ---------------------------------------------------------------- compile


@app.command("compile")
def compile_cmd(
    model: Annotated[Path, typer.Argument(help="Float ONNX model.", exists=True, dir_okay=False)],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration samples (.npz).", exists=True)],
    name: Annotated[str, typer.Option("--name", help="Model family name.")],
    version: Annotated[str, typer.Option("--version", help="Version label, e.g. 7.")],
    release: Annotated[int, typer.Option("--release", help="Monotonic release counter.")] = 1,
    target: Annotated[str, typer.Option("--target", "-t", help="Hardware target.")] = "arm64-cpu",
    eval_data: Annotated[
        Path | None, typer.Option("--eval", help="Held-out samples (.npz, optional labels y).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Bundle directory to write.")] = None,
    keys: Annotated[Path, typer.Option("--keys", help="Key directory (uses release.key).")] = Path("keys"),
    hardware: Annotated[
        list[str] | None, typer.Option("--hw", help="Hardware id the bundle is for (repeatable).")
    ] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Gate: min top-1 agreement.")] = None,
    min_snr: Annotated[float | None, typer.Option("--min-snr", help="Gate: min SNR in dB.")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Gate: min cosine similarity.")] = None,
    no_gate: Annotated[
        bool, typer.Option("--no-gate", help="Write the bundle even if quality fails (recorded).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a float model for a target, measure what it cost, gate, and write a signed bundle."""
    from rich.progress import Progress

    from compiler import CompilerError, Gate, GateFailed
    from compiler.pipeline import compile_model
    from signing.keyring import KeyDir

    try:
        release_key = KeyDir(keys).key("release")
    except (OSError, ValueError) as exc:
        fail(f"cannot load release key from {keys}: {exc}")
    gate: Gate | None = None
    if not no_gate:
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "min_top1_agreement": min_agreement,
                "min_snr_db": min_snr,
                "min_cosine": min_cosine,
            }.items()
            if v is not None
        }
        gate = Gate(**overrides)
    out = out or Path(f"{name}-{version}.bundle")
    try:
        with Progress(console=err, transient=True, disable=as_json) as progress:
            task = progress.add_task("compiling", total=1.0)

            def report(step: str, fraction: float) -> None:
                progress.update(task, description=step, completed=fraction)

            result = compile_model(
                model,
                target=target,
                calib_path=calib,
                eval_path=eval_data,
                out_dir=out,
                release_key=release_key,
                name=name,
                version=version,
                release=release,
                hardware_ids=hardware or None,
                gate=gate,
                progress=report,
            )
    except GateFailed as exc:
        if as_json:
            print_json({"ok": False, "failures": exc.failures, "report": exc.report})
        fail("quality gate failed, no bundle written:\n  " + "\n  ".join(exc.failures))
    except (CompilerError, FileExistsError, FileNotFoundError) as exc:
        fail(str(exc))
    manifest = result.manifest
    if as_json:
        print_json({"ok": True, "bundle": str(result.bundle_dir), "manifest": manifest.to_dict()})
        return
    _print_report(result.report)
    console.print(
        f"[green]wrote[/] {result.bundle_dir} ({manifest.ref}, release {manifest.release}, "
        f"{manifest.target}, sha256 {manifest.model_file.sha256[:12]}…)"
    )


def _print_report(report: dict[str, Any]) -> None:
    table = Table("figure", "value", title="quantization report")
    for key, value in report.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str)
            value = value if len(value) < 80 else value[:77] + "..."
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(str(key), str(value))
    console.print(table)


# ---------------------------------------------------------------- models


@models_app.command("push")
def models_push(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.", exists=True, file_okay=False)],
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed bundle; the server verifies it against its trusted release keys."""
    with _client(server) as api:
        model = _api(lambda: api.push_bundle(bundle))
    if as_json:
        print_json(model)
    else:
        console.print(f"[green]pushed[/] {model['name']}:{model['version']} sha256 {model['sha256'][:12]}…")


@models_app.command("list")
def models_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """List the models the server holds."""
    with _client(server) as api:
        models = _api(api.models)
    if as_json:
        print_json(models)
        return
    table = Table("model", "release", "target", "hardware", "sha256", "size")
    for m in models:
        table.add_row(
            f"{m['name']}:{m['version']}",
            str(m["release"]),
            m["target"],
            ",".join(m.get("hardware_ids", [])),
            m["sha256"][:12],
            f"{m['length']:,}",
        )
    console.print(table)


# ---------------------------------------------------------------- devices


def _parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{what} must be key=value, got {pair!r}", 2)
        out[key] = value
    return out


@devices_app.command("register")
def devices_register(
    device_id: Annotated[str, typer.Argument(help="Device id (its MQTT identity).")],
    hardware: Annotated[str, typer.Option("--hw", help="Hardware id, e.g. rpi4.")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value (repeatable).")] = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device so the server accepts its messages and serves it bundles."""
    tags = _parse_pairs(tag, "--tag")
    with _client(server) as api:
        device = _api(lambda: api.register_device(device_id, hardware, tags))
    if as_json:
        print_json(device)
    else:
        console.print(f"[green]registered[/] {device_id} ({hardware})")


@devices_app.command("list")
def devices_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """List devices with what they run and their deployment state."""
    with _client(server) as api:
        devices = _api(api.devices)
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


# ---------------------------------------------------------------- rollouts


def parse_selector(selector: str | None) -> dict[str, Any]:
    """``hw=rpi4,site=berlin`` -> {"hardware_id": "rpi4", "tags": {"site": "berlin"}}."""
    result: dict[str, Any] = {}
    tags: dict[str, str] = {}
    for key, value in _parse_pairs([p for p in (selector or "").split(",") if p], "--selector").items():
        if key in ("hw", "hardware", "hardware_id"):
            result["hardware_id"] = value
        else:
            tags[key] = value
    if tags:
        result["tags"] = tags
    return result


def parse_stages(stages: str) -> list[float]:
    try:
        values = [float(s.strip().rstrip("%")) for s in stages.split(",") if s.strip()]
    except ValueError:
        fail(f"--stages must be percentages like 1%,10%,100%, got {stages!r}", 2)
    if not values or values != sorted(values) or values[-1] > 100 or values[0] <= 0:
        fail("--stages must be increasing percentages in (0, 100]", 2)
    return values


@rollouts_app.command("create")
def rollouts_create(
    model: Annotated[str, typer.Option("--model", "-m", help="name:version")],
    selector: Annotated[str | None, typer.Option("--selector", "-l", help="hw=rpi4,key=value")] = None,
    stages: Annotated[str, typer.Option("--stages", help="Cumulative percentages.")] = "10,50,100",
    soak: Annotated[float, typer.Option("--soak", help="Seconds each stage soaks before the next.")] = 60.0,
    device_timeout: Annotated[float, typer.Option(help="Seconds before a device is timed out.")] = 600.0,
    max_error_rate: Annotated[float, typer.Option(help="Gate: inference error rate.")] = 0.05,
    min_inferences: Annotated[int, typer.Option(help="Gate: minimum sample of inferences.")] = 20,
    max_failure_rate: Annotated[float, typer.Option(help="Gate: install failure rate.")] = 0.0,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout of a pushed model to the devices matching a selector."""
    if ":" not in model:
        fail("--model must be name:version", 2)
    body = {
        "model": model,
        "selector": parse_selector(selector),
        "stages": parse_stages(stages),
        "soak_seconds": soak,
        "device_timeout_seconds": device_timeout,
        "max_error_rate": max_error_rate,
        "min_inferences": min_inferences,
        "max_failure_rate": max_failure_rate,
    }
    with _client(server) as api:
        rollout = _api(lambda: api.create_rollout(**body))
    if as_json:
        print_json(rollout)
    else:
        console.print(f"[green]created[/] rollout {rollout['id']} of {model}")


@rollouts_app.command("list")
def rollouts_list(server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """List rollouts."""
    with _client(server) as api:
        rollouts = _api(api.rollouts)
    if as_json:
        print_json(rollouts)
        return
    table = Table("id", "model", "state", "stage")
    for r in rollouts:
        table.add_row(str(r["id"]), str(r["model"]), str(r["state"]), str(r.get("current_stage")))
    console.print(table)


TERMINAL_STATES = {"completed", "rolled_back", "aborted"}


@rollouts_app.command("status")
def rollouts_status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow until it ends.")] = False,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout's stages, device counts and every decision with its figures."""
    with _client(server) as api:
        status = _api(lambda: api.rollout(rollout_id))
        while watch and status["state"] not in TERMINAL_STATES:
            if not as_json:
                console.print(f"{status['state']} stage {status.get('current_stage')}", end="\r")
            time.sleep(1)
            status = _api(lambda: api.rollout(rollout_id))
    if as_json:
        print_json(status)
        return
    print_rollout(status)


def print_rollout(status: dict[str, Any]) -> None:
    table = Table("stage", "percent", "target", "assigned", "done", "failed", "state")
    for i, st in enumerate(status.get("stages", [])):
        table.add_row(
            str(i),
            f"{st.get('percent')}%",
            str(st.get("target_count")),
            str(st.get("assigned")),
            str(st.get("done")),
            str(st.get("failed")),
            str(st.get("state")),
        )
    console.print(table, f"rollout {status['id']} of {status['model']}: [bold]{status['state']}[/]")
    for d in status.get("decisions", [])[-10:]:
        console.print(f"  {d.get('ts')}  {d.get('action')}: {d.get('reason')}")


def _rollout_action(action: str, rollout_id: str, server: str | None, as_json: bool) -> None:
    with _client(server) as api:
        status = _api(lambda: api.rollout_action(rollout_id, action))
    if as_json:
        print_json(status)
    else:
        console.print(f"rollout {rollout_id}: {status['state']}")


@rollouts_app.command("pause")
def rollouts_pause(rollout_id: str, server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """Pause a rollout: no new devices are notified until it resumes."""
    _rollout_action("pause", rollout_id, server, as_json)


@rollouts_app.command("resume")
def rollouts_resume(rollout_id: str, server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """Resume a paused rollout."""
    _rollout_action("resume", rollout_id, server, as_json)


@rollouts_app.command("abort")
def rollouts_abort(rollout_id: str, server: ServerOpt = None, as_json: JsonOpt = False) -> None:
    """Abort a rollout: no further devices are notified; devices keep what they run."""
    _rollout_action("abort", rollout_id, server, as_json)


# ---------------------------------------------------------------- processes


@app.command("server")
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


@app.command("agent")
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


@app.command("sim")
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


@app.command("demo")
def demo_cmd(
    devices: Annotated[int, typer.Option("--devices", "-n", help="Simulated devices.")] = 50,
    keep: Annotated[Path | None, typer.Option(help="Keep the work directory here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """End to end: train, compile, sign, push, roll out to simulated devices, catch a bad model."""
    from edgefleet.demo import run_demo

    ok = run_demo(devices=devices, workdir=keep, as_json=as_json)
    raise typer.Exit(0 if ok else 1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
