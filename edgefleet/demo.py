"""``edgefleet demo``: the product's main job, end to end, on the embedded defaults.

Train a digits classifier, compile it to int8 for arm64-cpu and sign it; start
a broker, the fleet server (SQLite) and simulated devices running the real
agent; roll the model out in stages; then roll out a broken model (NaN
outputs) and show the first stage's gate roll the canaries back while the
rest of the fleet never receives it. The devices' apps label their answers
with the true digit a moment later (the simulator's label source, through
``Agent.label``); a third model, about 5 points less accurate on the digits
but with finite outputs and the same latency, passes every other gate, and the
accuracy gate rolls it back at the canary stage on those labels. Every part
talks over real MQTT and HTTP.

The broker is the production configuration (``edgefleet.broker``: TLS, a
client certificate per device from the fleet CA, the per-device ACL; the server
on its own listener with its own certificate). Only on a machine without
Mosquitto does the demo fall back to the embedded development broker, and it
says so in its summary (``broker_security``).

Everything it writes (keys, bundles, the broker's and the server's files, the
devices' data) goes into one work directory: a new temporary one, removed when
the demo ends (passed, failed or interrupted) unless ``keep`` asks to keep it,
or one the caller names, which is the caller's and stays.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from simulator.readable import readable

HARDWARE = "rpi4"
STAGES = [10.0, 50.0, 100.0]
WORKLOAD_HZ = 30.0  # inferences per device per second (every answer is labelled)
# Labels a second the canary stage of the accuracy step gets, whatever the fleet's size: 5
# canaries at WORKLOAD_HZ on the default fleet. A smaller fleet has fewer canaries (1 of 3 or 10
# devices), which at WORKLOAD_HZ took 33 s to reach MIN_LABELS; for that step its devices infer
# faster instead, so the step takes ~7 s on any fleet.
CANARY_LABELS_PER_S = 150.0
# The subtly worse model: the good one with its first layer's weights perturbed (a fine-tune gone
# slightly wrong), about this much less accurate on the held-out digits; same graph, same latency.
ACCURACY_LOSS = 0.05
# Labels the accuracy gate waits for on each side: a 5-point loss at ~92% is then ~5.8 standard
# errors, where the always-valid test needs ~2.9 (docs/decisions/0016), so the canary stage
# catches it in all but ~1 of 1,000 runs (at 600 labels: ~1 in 30).
MIN_LABELS = 1000


@dataclass
class DemoResult:
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def demo_stack(
    work: Path,
    devices: int,
    sample_inputs: np.ndarray,
    tick_interval: float = 0.2,
    truth: np.ndarray | None = None,
) -> Iterator[dict[str, Any]]:
    """Broker + server + registered simulated fleet, torn down in reverse order. ``truth``: the
    real class of each sample input; the devices' apps then label every answer with it."""
    from edgefleet.broker import fleet_mqtt_keys, server_mqtt_settings, start_broker
    from fleet_server.runner import ServerThread
    from fleet_server.settings import ServerSettings
    from simulator.fleet import DeviceSpec, Fleet
    from simulator.labels import LabelDelay, LabelPlan
    from simulator.registry import register_devices

    with ExitStack() as stack:
        # the fleet CA lives with the fleet's other keys (work/keys/ca)
        broker = start_broker(workdir=work / "broker", keys_dir=work / "keys")
        stack.callback(broker.stop)
        settings = ServerSettings(
            data_dir=work / "server",
            keys_dir=work / "keys",
            **server_mqtt_settings(broker.info),
            tick_interval=tick_interval,
            auth_required=True,
        )
        # port 0: the server binds a free port itself (devices download from where it listens)
        server = ServerThread(settings, host="127.0.0.1")
        server.start()
        stack.callback(server.stop)
        # the API answers before the bridge has subscribed; a device's first events published
        # meanwhile would have no subscriber to reach (clean sessions)
        if not server.wait_subscribed(15):
            raise RuntimeError("the fleet server's MQTT bridge did not subscribe within 15 s")
        specs = [DeviceSpec(f"dev-{i:03d}", HARDWARE, {"site": "demo"}) for i in range(devices)]
        register_devices(server.url, specs, token=server.admin_token)
        fleet = Fleet(
            specs,
            broker.info,
            work / "keys" / "trust.json",
            work / "devices",
            workload_hz=WORKLOAD_HZ,
            sample_inputs=sample_inputs,
            telemetry_interval=1.0,
            tuf_root_path=work / "keys" / "root.json",  # installs go through TUF release metadata
            credentials=fleet_mqtt_keys(broker.info, [s.device_id for s in specs]),
            # the truth about an answer reaches the device's app 0.1-1 s after it
            labels=LabelPlan(delay=LabelDelay("uniform", 0.1, 1.0), truth=truth)
            if truth is not None
            else None,
        )
        fleet.start()
        stack.callback(fleet.stop)
        yield {"broker": broker, "server": server, "fleet": fleet, "specs": specs}


def run_demo(
    devices: int = 50,
    workdir: Path | None = None,
    as_json: bool = False,
    keep: bool = False,
    console_ui: bool = False,
) -> bool:
    """Run the demo; True when every check passed. ``workdir``: work there (it stays); else in a new
    temporary directory, removed at the end, also after a failure or Ctrl-C, unless ``keep``.
    ``console_ui``: once the checks are done and reported, leave the server, broker and devices
    running and print the web console's address and a token to sign in with, until Ctrl-C."""
    console = Console(stderr=as_json)
    started = time.monotonic()
    result = DemoResult()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    kept = keep or workdir is not None
    reported = False

    def report() -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        result.figures["wall_seconds"] = round(time.monotonic() - started, 1)
        result.checks["finished in under 60 s"] = result.figures["wall_seconds"] < 60
        if as_json:
            document = {"ok": result.ok, **result.__dict__, "workdir": str(work) if kept else None}
            sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
            sys.stdout.flush()
        else:
            _print_summary(console, result, work if kept else None, removed_later=console_ui)

    def linger(server: Any) -> None:
        report()
        for line in (
            f"web console: {server.url}/ui/",
            f"sign in with the admin token: {server.admin_token}",
            "the server, broker and devices keep running until Ctrl-C"
            + ("" if kept else "; then the work directory is removed"),
        ):
            console.print(Text(line), highlight=False, soft_wrap=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            return

    try:
        work.mkdir(parents=True, exist_ok=True)
        try:
            _run(work, devices, console, result, linger if console_ui else None)
        except Exception as exc:  # the demo reports any failure as a failed check, then exits 1
            result.checks[f"ran to the end ({type(exc).__name__}: {exc})"] = False
        report()
    finally:
        if not kept:
            shutil.rmtree(work, ignore_errors=True)
    return result.ok


def _run(
    work: Path,
    devices: int,
    console: Console,
    result: DemoResult,
    linger: Callable[[Any], None] | None = None,
) -> None:
    from compiler.examples import make_nan_model, train_digits
    from compiler.gate import Gate, GateFailed
    from compiler.pipeline import compile_model
    from edgefleet.broker import security_label
    from edgefleet.client import ApiClient
    from signing.keyring import KeyDir, init_keys

    progress = Progress(
        TextColumn("{task.description:<46}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        step = progress.add_task("keys, training, compiling", total=5)
        init_keys(work / "keys")
        release_key = KeyDir(work / "keys").key("release")
        progress.advance(step)
        example = train_digits(work / "digits")
        result.figures["fp32_accuracy"] = round(example.accuracy, 4)
        progress.advance(step)

        def build(src: Path, version: int, gate: Gate | None, out: str) -> Any:
            return compile_model(
                src,
                target="arm64-cpu",
                calib_path=example.calib_path,
                eval_path=example.eval_path,
                out_dir=work / "bundles" / out,
                release_key=release_key,
                name="digits",
                version=str(version),
                release=version,
                hardware_ids=[HARDWARE],
                gate=gate,
            )

        good = build(example.model_path, 1, Gate(), "digits-1")
        report = good.report
        scores = report["outputs"]["scores"]
        result.figures["int8_agreement"] = scores["top1_agreement"]
        result.figures["int8_snr_db"] = round(scores["snr_db"], 1)
        result.figures["int8_accuracy"] = round(report["accuracy"]["int8"], 4)
        progress.advance(step)
        broken_src = work / "digits" / "broken.onnx"
        make_nan_model(example.model_path, broken_src)
        try:
            build(broken_src, 2, Gate(), "digits-2-gated")
            result.checks["compiler gate refuses the NaN model"] = False
        except GateFailed:
            result.checks["compiler gate refuses the NaN model"] = True
        # A careless engineer skips the gate (recorded in the manifest); the fleet must still be safe.
        broken = build(broken_src, 2, None, "digits-2")
        progress.advance(step)
        worse_src = work / "digits" / "worse.onnx"
        _make_worse_model(example.model_path, worse_src, example.eval_path, ACCURACY_LOSS)
        worse = build(worse_src, 3, Gate(), "digits-3")  # a valid model: the compiler's gate passes it
        result.figures["digits_3_int8_accuracy"] = round(worse.report["accuracy"]["int8"], 4)
        progress.advance(step)
        good_sha = good.manifest.model_file.sha256
        bad_sha = broken.manifest.model_file.sha256
        worse_sha = worse.manifest.model_file.sha256

        boot = progress.add_task("broker, server (SQLite), devices", total=3)
        held_out = np.load(example.eval_path)
        samples = held_out["x"].astype(np.float32)
        with demo_stack(work, devices, samples, truth=held_out["y"]) as stack:
            progress.update(boot, completed=3)
            fleet = stack["fleet"]
            server = stack["server"]
            result.figures["broker"] = stack["broker"].info.kind
            result.figures["broker_security"] = security_label(stack["broker"].info)
            with ApiClient(server.url, token=server.admin_token) as api:
                # Released through TUF: the release key signs the targets metadata here, never on the server.
                api.push_bundle(good.bundle_dir, release_keys=[release_key])
                rollout = _create_rollout(api, "digits:1")
                t_rollout = time.monotonic()
                status = _follow(
                    progress, api, rollout["id"], devices, "rollout digits:1 (10% -> 50% -> 100%)"
                )
                result.figures["rollout_1_seconds"] = round(time.monotonic() - t_rollout, 1)
                result.figures["rollout_1_state"] = status["state"]
                result.checks["digits:1 rollout completed"] = status["state"] == "completed"
                result.checks["all devices serve digits:1"] = all(
                    a.running_sha256 == good_sha for a in fleet.agents.values()
                )
                result.checks["every device proved it served digits:1"] = all(
                    d.get("running_model") and d["running_model"]["sha256"] == good_sha for d in api.devices()
                )

                api.push_bundle(broken.bundle_dir, release_keys=[release_key])
                rollout2 = _create_rollout(api, "digits:2")
                t_bad = time.monotonic()
                status2 = _follow(progress, api, rollout2["id"], devices, "rollout digits:2 (broken: NaN)")
                result.figures["rollback_seconds"] = round(time.monotonic() - t_bad, 1)
                result.figures["rollout_2_state"] = status2["state"]
                result.checks["broken rollout rolled back"] = status2["state"] == "rolled_back"
                canary = math.ceil(devices * STAGES[0] / 100)
                got_bad = [d for d, a in fleet.agents.items() if bad_sha in a.history]
                result.figures["devices_that_ran_broken"] = len(got_bad)
                result.checks[f"only the {canary} canaries ever ran the broken model"] = (
                    0 < len(got_bad) <= canary
                )
                wait_until(
                    lambda: all(a.running_sha256 == good_sha for a in fleet.agents.values()),
                    timeout=20,
                    what="canaries back on digits:1",
                )
                result.checks["canaries back on digits:1"] = True
                _accuracy_step(
                    progress, api, fleet, devices, worse.bundle_dir, release_key, worse_sha, result
                )
                stats = api.stats()
                result.figures["telemetry_batches"] = stats.get("telemetry_batches")
                result.figures["malformed_messages"] = stats.get("malformed_messages")
                result.figures["decision"] = next(
                    (d.get("reason") for d in reversed(status2.get("decisions", [])) if d.get("reason")),
                    None,
                )
                result.figures["labels"] = dict(sorted(fleet.label_counts.items()))
            if linger is not None:
                progress.stop()  # the summary and the console's address print below a finished display
                linger(server)


def _accuracy_step(
    progress: Progress,
    api: Any,
    fleet: Any,
    devices: int,
    bundle: Path,
    release_key: Any,
    worse_sha: str,
    result: DemoResult,
) -> None:
    """Roll out the subtly worse model with the accuracy gate on; it must stop at the canaries."""
    canary = math.ceil(devices * STAGES[0] / 100)
    api.push_bundle(bundle, release_keys=[release_key])
    fleet.set_workload_hz(max(WORKLOAD_HZ, CANARY_LABELS_PER_S / canary))
    try:
        rollout = _create_rollout(api, "digits:3", max_accuracy_drop=0.0, min_labels=MIN_LABELS)
        t0 = time.monotonic()
        status = _follow(progress, api, rollout["id"], devices, "rollout digits:3 (5 points less accurate)")
    finally:
        fleet.set_workload_hz(WORKLOAD_HZ)
    result.figures["accuracy_rollback_seconds"] = round(time.monotonic() - t0, 1)
    result.figures["rollout_3_state"] = status["state"]
    stop: dict[str, Any] = next(
        (d for d in reversed(status.get("decisions", [])) if d.get("action") == "roll_back"), {}
    )
    f = stop.get("figures") or {}
    result.checks["subtly worse rollout rolled back by the accuracy gate"] = (
        status["state"] == "rolled_back" and f.get("gate") == "accuracy"
    )
    if f.get("gate") == "accuracy":
        result.figures["accuracy_gate"] = (
            f"digits:3 {f['accuracy']:.1%} over {f['labels']} labels vs digits:1 "
            f"{f['baseline_accuracy']:.1%} over {f['baseline_labels']}: {f['accuracy_change'] * 100:+.1f} "
            f"points, p = {f['accuracy_p_value']:.1g} (always valid)"
        )
    got = [d for d, a in fleet.agents.items() if worse_sha in a.history]
    result.figures["devices_that_ran_worse"] = len(got)
    result.checks[f"only the {canary} canaries ever ran the less accurate model"] = 0 < len(got) <= canary


def _create_rollout(api: Any, model: str, **gates: Any) -> dict[str, Any]:
    """The demo's rollout policy: three stages, 1 s soak, error-rate gate over >= 20 inferences
    (``gates``: more policy fields, e.g. the accuracy gate's)."""
    return dict(
        api.create_rollout(
            model=model,
            selector={"hardware_id": HARDWARE},
            stages=STAGES,
            soak_seconds=1.0,
            device_timeout_seconds=30,
            max_error_rate=0.05,
            min_inferences=20,
            **gates,
        )
    )


def _make_worse_model(src: Path, dst: Path, eval_path: Path, loss: float) -> float:
    """Write ``src`` with noise on its first layer's weights, the least that costs ``loss`` of its
    accuracy on the held-out digits (a fine-tune gone slightly wrong); return that accuracy.

    The graph is unchanged (same ops, same shapes), so the outputs stay finite and the latency the
    same: only the labels can tell it apart. Seeded, so every demo rolls out the same model.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    held_out = np.load(eval_path)
    x, y = held_out["x"].astype(np.float32), held_out["y"]

    def accuracy(model: Any) -> float:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        scores = session.run(None, {session.get_inputs()[0].name: x})[0]
        return float((scores.argmax(axis=1) == y).mean())

    base = onnx.load(str(src))
    first = next(t for t in base.graph.initializer if len(t.dims) == 2)  # the first layer's weights
    weights = numpy_helper.to_array(first)
    noise = np.random.default_rng(0).normal(0.0, weights.std(), weights.shape).astype(np.float32)
    target = accuracy(base) - loss
    model, got = base, accuracy(base)
    for scale in np.arange(0.01, 2.0, 0.01):
        model = onnx.load(str(src))
        target_tensor = next(t for t in model.graph.initializer if t.name == first.name)
        target_tensor.CopyFrom(
            numpy_helper.from_array((weights + float(scale) * noise).astype(np.float32), first.name)
        )
        got = accuracy(model)
        if got <= target:
            break
    onnx.save(model, str(dst))
    return got


def _follow(progress: Progress, api: Any, rollout_id: Any, devices: int, label: str) -> dict[str, Any]:
    task = progress.add_task(label, total=devices)
    deadline = time.monotonic() + 45
    while True:
        status: dict[str, Any] = api.rollout(rollout_id)
        done = sum(1 for s in status.get("devices", {}).values() if s == "done")
        progress.update(task, completed=done, description=f"{label}: {status['state']}")
        if status["state"] in ("completed", "rolled_back", "aborted", "paused"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout_id} still {status['state']} after 45 s")
        time.sleep(0.2)


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else readable(value)


def _seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else readable(value)


# The demo's figures as a person reads them, in this order; a figure not named here is shown
# under its own key (``readable`` value).
FIGURE_ROWS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "fp32_accuracy": ("float accuracy", _percent),
    "int8_accuracy": ("int8 accuracy", _percent),
    "int8_agreement": ("int8 vs float: top-1 agreement", _percent),
    "int8_snr_db": ("int8 vs float: SNR", lambda v: f"{readable(v)} dB"),
    "broker": ("broker", readable),
    "broker_security": ("broker security", readable),
    "rollout_1_state": ("digits:1 rollout", readable),
    "rollout_1_seconds": ("digits:1 rollout took", _seconds),
    "rollout_2_state": ("digits:2 (NaN) rollout", readable),
    "rollback_seconds": ("digits:2 rolled back after", _seconds),
    "devices_that_ran_broken": ("devices that ran digits:2", readable),
    "decision": ("gate decision", readable),
    "digits_3_int8_accuracy": ("digits:3 int8 accuracy (held out)", _percent),
    "rollout_3_state": ("digits:3 (less accurate) rollout", readable),
    "accuracy_rollback_seconds": ("digits:3 rolled back after", _seconds),
    "devices_that_ran_worse": ("devices that ran digits:3", readable),
    "accuracy_gate": ("accuracy gate decision", readable),
    "labels": ("labels the devices' apps posted", readable),
    "telemetry_batches": ("telemetry batches stored", readable),
    "malformed_messages": ("malformed messages", readable),
    "wall_seconds": ("wall time", _seconds),
}


def figure_rows(figures: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The demo's figures as (what, value) rows of plain text: never a dict or a Python repr."""
    rows = [(label, show(figures[key])) for key, (label, show) in FIGURE_ROWS.items() if key in figures]
    return rows + [(key, readable(value)) for key, value in figures.items() if key not in FIGURE_ROWS]


def _print_summary(
    console: Console, result: DemoResult, kept: Path | None, removed_later: bool = False
) -> None:
    table = Table("check", "result", title="edgefleet demo")
    for name, ok in result.checks.items():
        table.add_row(Text(name), Text("ok", style="green") if ok else Text("FAILED", style="bold red"))
    console.print(table)
    figures = Table("figure", "value")
    for label, value in figure_rows(result.figures):
        figures.add_row(Text(label), Text(value))
    console.print(figures)
    if kept is not None:
        console.print(Text(f"work directory kept: {kept}"), highlight=False)
    elif not removed_later:
        console.print("work directory removed (--keep keeps it)", highlight=False)
    verdict = ("demo passed", "bold green") if result.ok else ("demo failed", "bold red")
    console.print(Text(*verdict))
