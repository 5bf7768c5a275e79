"""`edgefleet deploy`: compile, gate, sign, push and roll out a model to every hardware class of
a selected fleet in one command (``edgefleet.deploy`` holds the decisions)."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

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
    err,
    fail,
    print_json,
    shows_progress,
    warn,
)
from edgefleet.commands.keys import DEFAULT_PASS_ENV, PassEnvOpt, PassFileOpt, load_role_key

DEFAULT_HARDWARE_TARGETS = "default"


def _sha12(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_policy(policy: str, conn: Any) -> tuple[Any, str]:
    """The rollout plan: a file holding one RolloutPolicy document, else an applied one by name."""
    from edgefleet.client import ApiError
    from edgefleet.manifests import ManifestError, load
    from fleet_server.schemas import RolloutPlan

    path = Path(policy)
    if path.is_file():
        try:
            _, docs = load([policy])
        except ManifestError as exc:
            fail(str(exc), code="invalid_document")
        found = [d for d in docs if d.kind == "RolloutPolicy"]
        if len(found) != 1:
            fail(
                f"{policy}: holds {len(found)} RolloutPolicy documents; --policy takes a file with one",
                EXIT_USAGE,
            )
        return found[0].spec, f"{policy} (RolloutPolicy/{found[0].name})"
    try:
        row = conn.config_document("RolloutPolicy", policy)
    except ApiError as exc:
        if exc.status == 404:
            fail(
                f"--policy {policy}: no such file, and no RolloutPolicy {policy!r} has been applied",
                EXIT_USAGE,
            )
        fail(f"{exc.code}: {exc.message}", code=exc.code)
    return RolloutPlan.model_validate(row["document"]["spec"]), f"RolloutPolicy/{policy} (applied)"


def _applied(conn: Any, kind: str, name: str) -> dict[str, Any] | None:
    from edgefleet.client import ApiError

    try:
        return dict(conn.config_document(kind, name)["document"]["spec"])
    except ApiError as exc:
        if exc.status == 404:
            return None
        fail(f"{exc.code}: {exc.message}", code=exc.code)


def deploy_cmd(
    model: Annotated[Path, typer.Argument(help="Float ONNX or TFLite model.", exists=True, dir_okay=False)],
    selector: Annotated[
        str, typer.Option("--selector", "-l", help="Which devices: hw=rpi4,app=ocr (tags), runtime=, agent=.")
    ],
    policy: Annotated[
        str,
        typer.Option(
            "--policy", "-p", help="A file with one RolloutPolicy document, or an applied one's name."
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Model family name (default: the file's stem).")
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            help="Version label (default: the model file's sha256, 12 digits); each class's"
            " bundle is VERSION-CLASS."
        ),
    ] = None,
    release: Annotated[int, typer.Option("--release", help="Monotonic release counter.")] = 1,
    calib: Annotated[
        str | None, typer.Option("--calib", help="Calibration samples (default: the applied Model's).")
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval", help="Held-out samples (labels optional).")
    ] = None,
    hardware_targets: Annotated[
        str | None,
        typer.Option(
            "--hardware-targets",
            help="The applied HardwareTargets document to map classes with [default: default].",
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Compiles at once (default: one per usable CPU)."),
    ] = None,
    mixed_precision_budget: Annotated[
        float,
        typer.Option(
            help="Seconds per class to search 16-bit/float layers when 8-bit misses the gate (0 = off)."
        ),
    ] = 120.0,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Keep the bundles in this directory (default: temporary)."),
    ] = None,
    keys: Annotated[Path, typer.Option("--keys", help="Key directory (uses release.key).")] = Path("keys"),
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile, gate, sign, push and roll out a model to every hardware class of the selected devices.

    Each class gets its compiler target from the applied Model document of the same name, the
    applied HardwareTargets document, or the compiler's built-in default, in that order; one
    bundle (VERSION-CLASS) and one rollout per class. A class whose compile or gate fails stops
    the deploy before anything is pushed, unless the policy says on_class_failure: skip. Exits 1
    on any refusal, naming the class and the reason.
    """
    from compiler.errors import CompilerError
    from compiler.pipeline import model_format
    from edgefleet import deploy as core
    from edgefleet.commands.rollouts import parse_selector
    from fleet_server.declarative import ModelSpec

    started = time.perf_counter()
    release_key = load_role_key(keys, "release", passphrase_file, passphrase_env)
    name = name or model.stem
    version = version or _sha12(model)
    try:
        fmt = model_format(model)
    except CompilerError as exc:
        fail(str(exc))
    base_selector = parse_selector(selector)
    with client(server, token) as conn, ExitStack() as stack:
        plan_spec, policy_from = load_policy(policy, conn)
        devices = api(lambda: conn.devices(selector=selector))
        per_class = Counter(str(d["hardware_id"]) for d in devices)
        if not per_class:
            fail(f"no device matches --selector {selector!r}", code="no_devices")
        model_doc = _applied(conn, "Model", name)
        model_spec = ModelSpec.model_validate(model_doc) if model_doc is not None else None
        mapping_name = hardware_targets or DEFAULT_HARDWARE_TARGETS
        mapping = _applied(conn, "HardwareTargets", mapping_name)
        if mapping is None and hardware_targets is not None:
            fail(
                f"--hardware-targets {hardware_targets}: no such HardwareTargets document has been applied",
                EXIT_USAGE,
            )
        calib = calib or (model_spec.calib if model_spec is not None else None)
        eval_data = eval_data or (model_spec.eval if model_spec is not None else None)
        if calib is None:
            fail(f"--calib is needed (no applied Model {name!r} names its calibration data)", EXIT_USAGE)
        plans = core.plan_classes(
            per_class, fmt, model=model_spec, hardware_targets=(mapping or {}).get("targets")
        )
        by_class = {p.hardware_class: p for p in plans}
        out_root = out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-deploy-")))
        key_pem = release_key.to_pem()
        compile_jobs = [
            core.CompileJob(
                hardware_class=p.hardware_class,
                model_path=str(model),
                target=p.target,
                calib=calib,
                eval=eval_data,
                out_dir=str(out_root / f"{name}-{core.class_version(version, p.hardware_class)}.bundle"),
                key_pem=key_pem,
                name=name,
                version=core.class_version(version, p.hardware_class),
                release=release,
                gate=p.gate,
                mixed_precision_seconds=mixed_precision_budget,
                output_kinds=_kinds(model_spec),
            )
            for p in plans
            if p.target is not None
        ]
        progress = stack.enter_context(_progress())
        tasks = {p.hardware_class: progress.add_task(_label(p, "waiting"), total=1.0) for p in plans}
        for p in plans:
            if p.state is core.ClassState.FAILED:
                progress.update(tasks[p.hardware_class], description=_label(p, "no target"), completed=1.0)

        def on_event(hw: str, step: str, fraction: float) -> None:
            progress.update(tasks[hw], description=_label(by_class[hw], step), completed=fraction * 0.8)

        def on_done(hw: str, result: dict[str, Any]) -> None:
            p = by_class[hw]
            if result["ok"]:
                p.state, p.bundle = core.ClassState.COMPILED, result["bundle"]
                p.compile_seconds = round(float(result["seconds"]), 2)
                progress.update(tasks[hw], description=_label(p, "compiled, gate passed"), completed=0.8)
            else:
                p.state, p.code, p.reason = core.ClassState.FAILED, result["code"], result["reason"]
                progress.update(tasks[hw], description=_label(p, result["code"]), completed=1.0)

        if compile_jobs:
            core.compile_all(compile_jobs, core.worker_count(len(compile_jobs), jobs), on_event, on_done)
        to_push = core.settle_failures(plans, plan_spec.on_class_failure)
        for p in to_push:
            progress.update(tasks[p.hardware_class], description=_label(p, "pushing"))
            try:
                pushed = conn.push_bundle(Path(str(p.bundle)), release_keys=[release_key])
            except Exception as exc:  # ApiError, or the bundle could not be read
                p.state, p.code, p.reason = core.ClassState.REFUSED, "push_refused", _why(exc)
                continue
            p.state, p.model = core.ClassState.PUSHED, f"{pushed['name']}:{pushed['version']}"
            progress.update(
                tasks[p.hardware_class], description=_label(p, "starting the rollout"), completed=0.9
            )
            body = {
                **plan_spec.model_dump(mode="json"),
                "model": p.model,
                "selector": {**base_selector, "hardware_id": p.hardware_class},
            }
            try:
                rollout = conn.create_rollout(**body)
            except Exception as exc:
                p.state, p.code, p.reason = core.ClassState.REFUSED, "rollout_refused", _why(exc)
                continue
            p.state, p.rollout = core.ClassState.ROLLING_OUT, str(rollout["id"])
            progress.update(
                tasks[p.hardware_class], description=_label(p, f"rollout {p.rollout}"), completed=1.0
            )
    report = {
        "ok": all(p.state in (core.ClassState.ROLLING_OUT, core.ClassState.SKIPPED) for p in plans)
        and any(p.state is core.ClassState.ROLLING_OUT for p in plans),
        "model": name,
        "version": version,
        "policy": policy_from,
        "on_class_failure": str(plan_spec.on_class_failure),
        "seconds": round(time.perf_counter() - started, 2),
        "classes": [p.to_dict() for p in plans],
    }
    if as_json:
        print_json(report)
    else:
        _print_table(plans)
    for p in plans:
        if p.state is core.ClassState.SKIPPED:
            warn(f"left out (on_class_failure: skip): {p.refusal()}")
    refusals = [p.refusal() for p in plans if p.state in (core.ClassState.FAILED, core.ClassState.REFUSED)]
    if refusals:
        aborted = any(p.state is core.ClassState.NOT_STARTED for p in plans) or not any(
            p.state is core.ClassState.ROLLING_OUT for p in plans
        )
        head = (
            "deploy aborted, nothing pushed"
            if aborted and not any(p.model for p in plans)
            else "deploy refused"
        )
        fail(f"{head}: " + "; ".join(refusals), code="deploy_refused")
    if not report["ok"]:
        fail("deploy refused: every class was left out", code="deploy_refused")


def _kinds(spec: Any) -> str | None:
    if spec is None or not spec.output_kinds:
        return None
    return ",".join(f"{name}={kind}" for name, kind in spec.output_kinds.items())


def _why(exc: Exception) -> str:
    from edgefleet.client import ApiError

    if isinstance(exc, ApiError):
        return f"{exc.code}: {exc.message}" if exc.message else exc.code
    return " ".join(str(exc).split()) or type(exc).__name__


def _label(p: Any, step: str) -> str:
    return f"{p.hardware_class:<16} {p.target or '-':<16} {step}"


def _progress() -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not shows_progress(),
    )


def _print_table(plans: list[Any]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("CLASS", "DEVICES", "TARGET", "MODEL", "ROLLOUT"):  # --json: where each target came from
        table.add_column(column, no_wrap=True)  # names and ids are copied from here: never cut them
    table.add_column("RESULT", overflow="fold")
    styles = {"rolling_out": "green", "skipped": "yellow", "failed": "red", "refused": "red"}
    for p in plans:
        result = str(p.state) + (f": {p.code}" if p.code else "")
        table.add_row(
            p.hardware_class,
            str(p.devices),
            p.target or "-",
            p.model or "-",
            p.rollout or "-",
            Text(result, style=styles.get(str(p.state), "")),
        )
    console.print(table)
