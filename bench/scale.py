"""N simulated devices through a 4-stage rollout: wall, installs/s, CPU-seconds per 1,000 installs.

The same scenario as ``scenarios/scale-10k.toml`` (one model, a 1/10/50/100 %
rollout with zero soak, the secure broker: TLS and a client certificate per
device), sized by N and run two ways in the same bench:

- ``server`` (the baseline): every device downloads from the fleet server
  (TUF metadata, envelope, model, golden set: ~7 requests per install), through
  the simulator's HTTP proxy that lets 32 requests through at once, as an
  nginx without a cache in front of uvicorn would;
- ``mirror`` (static delivery): the server publishes the TUF repository and the
  bundles to a directory, a real nginx serves it (``fleet.mirrors = ["nginx"]``),
  and devices download from it; the fleet server leaves the download path.

Each run is a fresh process (``python -m bench.scale N CACHE --delivery D
--processes P``) with the models prebuilt. While it runs, the CPU time of each
process (fleet server, Mosquitto, nginx, each fleet worker, the coordinator)
is sampled from ``/proc`` every 0.5 s, so the figures cover exactly the
rollout: from creating it to the server reporting it ``completed``. The
delivery figures count what the devices asked during the rollout: of the
server (through the simulator's HTTP proxy) and of the mirror (nginx's access
log). The load average is printed with every run: the machine is
shared, so read wall times with it and prefer the CPU-seconds.

``python -m bench scale`` runs 100 and 1,000 devices both ways (~5 min);
``python -m bench.scale 10000 CACHE --processes 10`` is the big run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from simulator.gc_clock import GcClock

STAGES = [1, 10, 50, 100]
BROKER = os.environ.get("EDGEFLEET_BENCH_BROKER", "mtls")
FINISHED = ("rollout r: completed", "rollout r: rolled_back", "rollout r: aborted")
SCENARIO_FILE = Path(__file__).resolve().parent.parent / "scenarios" / "scale-10k.toml"
TICK_HZ = os.sysconf("SC_CLK_TCK")


def scenario(
    devices: int,
    delivery: str,
    processes: int,
    workload_hz: float | None = None,
    idle: float = 0.0,
    telemetry_interval: float | None = None,
) -> dict[str, Any]:
    """The scale scenario file, resized: N devices over ``processes`` workers, with ``delivery``
    (and ``workload_hz`` inferences per second per device instead of the file's, and
    ``telemetry_interval`` seconds between a device's telemetry batches instead of the file's);
    ``idle`` > 0: after the rollout the fleet runs that many seconds more, serving the new model
    (its background only: inferences, telemetry, keepalives)."""
    import tomllib

    data = tomllib.loads(SCENARIO_FILE.read_text())
    data.pop("small", None)
    data["name"] = f"scale-{devices}-{delivery}"
    if delivery == "mirror":
        data["fleet"]["mirrors"] = ["nginx"]
    else:
        data["fleet"].pop("mirrors", None)
    data["fleet"]["devices"] = devices
    data["fleet"]["processes"] = processes
    if workload_hz is not None:
        data["fleet"]["workload_hz"] = workload_hz
    if telemetry_interval is not None:
        data["fleet"]["telemetry_interval"] = telemetry_interval
    if idle > 0:
        data["steps"] = [*data["steps"], {"action": "sleep", "seconds": idle}]
    return dict(data)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included), in seconds; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK_HZ


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the server's forkserver and its ingest workers)."""
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(_children(child))
    return out


class CpuMeter:
    """Samples the CPU time of named processes every ``interval`` s (monotonic time, per role)."""

    def __init__(self, roles: Any, interval: float = 0.5) -> None:
        self.roles = roles  # () -> {role: [pids]}, asked at every sample (workers appear later)
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._seen: dict[int, float] = {}  # pid -> last CPU seen (a process that ended keeps it)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> CpuMeter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        now = time.monotonic()
        per_role: dict[str, float] = {}
        for role, pids in self.roles().items():
            total = 0.0
            for pid in pids:
                if pid == os.getpid():
                    t = os.times()
                    cpu = t.user + t.system
                else:
                    cpu = _cpu_seconds(pid) or self._seen.get(pid, 0.0)
                self._seen[pid] = cpu
                total += cpu
            per_role[role] = total
        self.samples.append((now, per_role))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU-seconds each role used between two monotonic instants (nearest samples)."""

        def at(t: float) -> dict[str, float]:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]

        a, b = at(t0), at(t1)
        return {role: round(b.get(role, 0.0) - a.get(role, 0.0), 2) for role in b}


def measure(
    devices: int,
    model_cache: Path,
    delivery: str,
    processes: int,
    workload_hz: float | None = None,
    idle: float = 0.0,
    telemetry_interval: float | None = None,
) -> dict[str, Any]:
    """One run in this process (models prebuilt in ``model_cache``); the figures as a dict.

    A device is done only once it served an inference with the new model, so the workload's
    period bounds each stage from below: at 0.2 inferences/s the last of a stage's devices waits
    up to 5 s after its swap (the timeline's ``proof_wait``).

    ``idle`` > 0: the fleet runs that long after the rollout, and ``background`` gives what the
    fleet costs per device-second then (inferences, telemetry, keepalives: what every device
    costs whether or not it installs), measured over the idle window after its first telemetry
    interval (the last installs' reports settle there). With one process the fleet runs in the
    coordinator, so its figure is the coordinator's."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from edgefleet.sim_harness import SimHarness, device_root
    from simulator.runner import ScenarioRun
    from simulator.scenario import parse_scenario

    sc = parse_scenario(scenario(devices, delivery, processes, workload_hz, idle, telemetry_interval))
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory() as tmp,
        SimHarness(sc, Path(tmp), model_cache=model_cache, broker_auth=BROKER) as harness,
        device_root(Path(tmp)) as device_dir,
    ):
        run = ScenarioRun(sc, harness, Path(tmp), sample_interval=2.0, device_root=device_dir)
        fleet_pids = lambda: [p.pid for p in getattr(run.fleet, "_procs", [])]  # noqa: E731
        nginx = getattr(harness, "_nginx", None)  # none without a mirror (or before mirrors existed)

        def roles() -> dict[str, list[int]]:
            server = harness._server._proc.pid
            out = {
                "server": [server],
                # its ingest workers (events, telemetry): processes of their own under a forkserver
                "server_ingest": _descendants(server),
                "broker": [harness._broker_handle.process.pid],
                "coordinator": [os.getpid()],
                "workers": fleet_pids(),
            }
            if nginx is not None:
                out["nginx"] = [nginx.proc.pid, *_children(nginx.proc.pid)]
            return out

        delivered: dict[str, tuple[int, int, int]] = {}  # when -> (requests, bytes, reached server)
        loads: list[float] = []

        def count() -> tuple[int, int, int]:
            """(requests, response bytes, requests that reached the fleet server) so far."""
            proxy = harness.artifact_proxy
            lines = nginx.requests() if nginx is not None else []
            mirrored = sum(int(line.rsplit(" ", 1)[1]) for line in lines if line.rsplit(" ", 1)[1].isdigit())
            return proxy.requests + len(lines), proxy.bytes_out + mirrored, proxy.requests

        meter = CpuMeter(roles).start()
        collections = GcClock(keep=True).start()  # this process's: the fleet's, with one process
        stop_watch = threading.Event()

        def watch() -> None:  # the delivery counters at the rollout's start and end
            while not stop_watch.is_set():
                events = [w for _, w in run.result.events]
                if "start" not in delivered and any(w.startswith("step 0") for w in events):
                    delivered["start"] = count()
                if "end" not in delivered and any(w.startswith(FINISHED) for w in events):
                    time.sleep(1.2)  # nginx flushes its access log every second
                    delivered["end"] = count()
                loads.append(os.getloadavg()[0])
                stop_watch.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        profiler = _profile(lambda: harness._server._proc.pid, run)
        idle_profiler = _profile_background(
            lambda: fleet_pids() if processes > 1 else [os.getpid()], run, len(sc.steps) - 1,
            min(idle / 2, sc.fleet.telemetry_interval), idle,
        )  # fmt: skip
        try:
            result = run.execute()
            timings = _timeline(harness, run.rollouts.get("r"))
        finally:
            stop_watch.set()
            watcher.join(5)
            meter.stop()
            collections.stop()
            profiler()
            idle_profiler()
        t0 = run._t0
        start = next(t for t, w in result.events if w.startswith("step 0"))
        background = None
        sleep = next((t for t, w in result.events if w.startswith(f"step {len(sc.steps) - 1}: sleep")), None)
        if idle > 0 and sleep is not None:
            i0 = sleep + min(idle / 2, sc.fleet.telemetry_interval)
            i1 = next((t for t, w in result.events if t > sleep and w.startswith("step")), None)
            i1 = i1 if i1 is not None else sleep + idle
            idle_cpu = meter.between(t0 + i0, t0 + i1)
            span = max(1e-9, i1 - i0)
            fleet_role = "workers" if processes > 1 else "coordinator"
            background = {
                "seconds": round(span, 1),
                "fleet_cpu_s": idle_cpu.get(fleet_role, 0.0),
                "fleet_cpu_ms_per_device_s": round(1000 * idle_cpu.get(fleet_role, 0.0) / span / devices, 4),
                "server_cpu_s": idle_cpu.get("server", 0.0),
                "broker_cpu_s": idle_cpu.get("broker", 0.0),
                # the coordinator's garbage collections in the window: count and seconds per generation
                "coordinator_gc": collections.between(t0 + i0, t0 + i1),
            }
        # a rollout held, then resumed by the scenario's operator, ends at its last word
        ends = [t for t, w in result.events if w.startswith("rollout r:") and len(w.split()) == 3]
        end = next((t for t, w in result.events if w.startswith(FINISHED)), ends[-1] if ends else None)
        state = result.figures.get("rollouts", {}).get("r")
        done = int(result.figures.get("rollout_devices", {}).get("r", {}).get("done", 0))
        cpu = meter.between(t0 + start, t0 + (end if end is not None else result.events[-1][0]))
        d0, d1 = delivered.get("start", (0, 0, 0)), delivered.get("end", count())
        requests, nbytes, upstream = (d1[i] - d0[i] for i in range(3))
        per_k = 1000 / max(1, done)
        wall = round(end - start, 2) if end is not None else None
        return {
            "devices": devices,
            "processes": processes,
            "delivery": delivery,
            "workload_hz": sc.fleet.workload_hz,
            "telemetry_interval": sc.fleet.telemetry_interval,
            "broker": BROKER,
            "ok": result.ok,
            "state": state,
            "done": done,
            "rollout_s": wall,
            "installs_per_s": round(done / wall, 1) if wall else None,
            "fleet_start_s": result.figures.get("fleet_start_seconds"),
            "cpu_s": cpu,
            "cpu_s_per_1000": {k: round(v * per_k, 1) for k, v in cpu.items()},
            "background": background,
            "requests_per_install": round(requests / max(1, done), 2),
            "server_requests_per_install": round(upstream / max(1, done), 3),
            "bytes_per_install": round(nbytes / max(1, done)),
            "max_loop_lag_s": result.figures.get("max_loop_lag_s"),
            # what the scenario's operator did (a resume after a delivery hold), with when
            "operator": [(round(t - start, 1), w) for t, w in result.events if w.startswith("operator:")],
            # the fleet processes' garbage collections while started (per generation: count, seconds)
            "fleet_gc": _fleet_gc(result.figures.get("fleet_processes"), collections),
            "load_before": [round(x, 1) for x in load_before],
            "load_during": [round(min(loads), 1), round(max(loads), 1)] if loads else None,
            "cores": os.cpu_count(),
            "telemetry_lost": (result.figures.get("telemetry_batches_sent") or 0)
            - (result.figures.get("telemetry_batches_stored") or 0),
            # how far behind the server's ingest fell, and how long it took to catch up at the end
            "max_ingest_lag_s": result.figures.get("max_ingest_lag_s"),
            "telemetry_drain_s": result.figures.get("telemetry_drain_s"),
            "checks": [(c.outcome, c.label, c.detail) for c in result.checks],
            "step_error": result.step_error,
            "timeline": timings,
        }


def _fleet_gc(processes: list[dict[str, Any]] | None, coordinator: GcClock) -> dict[str, Any]:
    """The fleet's collections summed over its worker processes (with one process, the fleet runs
    in the coordinator, whose own clock is the figure), and the longest single collection."""
    if not processes:
        return {"gc": coordinator.totals(), "gc_longest_s": coordinator.longest()}
    gens: dict[str, list[float]] = {}
    for proc in processes:
        for gen, (count, seconds) in proc.get("gc", {}).items():
            acc = gens.setdefault(gen, [0, 0.0])
            acc[0] += count
            acc[1] = round(acc[1] + seconds, 3)
    return {"gc": gens, "gc_longest_s": max((p.get("gc_longest_s", 0.0) for p in processes), default=0.0)}


def _py_spy(pid: int, output: str, *, rate: int, extra: list[str]) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` into ``output`` (raw collapsed stacks, without pausing it)."""
    spy = Path(sys.executable).parent / "py-spy"
    cmd = [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid), "--rate", str(rate),
           "--format", "raw", "--output", output, "--nonblocking", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _profile(server_pid: Any, run: Any) -> Any:
    """With ``EDGEFLEET_BENCH_PROFILE=FILE``: py-spy samples the fleet server (and its ingest
    workers) from the rollout's creation to the end of the run, collapsed stacks into FILE.
    Returns the function that stops it."""
    out = os.environ.get("EDGEFLEET_BENCH_PROFILE")
    if not out:
        return lambda: None
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def start() -> None:
        while not stop.is_set() and not any(w.startswith("step 0") for _, w in run.result.events):
            stop.wait(0.05)
        if stop.is_set():
            return
        procs.append(_py_spy(server_pid(), out, rate=100, extra=["--subprocesses"]))

    starter = threading.Thread(target=start, daemon=True)
    starter.start()

    def finish() -> None:
        stop.set()
        starter.join(5)
        for proc in procs:
            proc.send_signal(2)  # SIGINT: py-spy writes its file
            proc.wait(30)

    return finish


def _profile_background(pids: Any, run: Any, last_step: int, after: float, idle: float) -> Any:
    """With ``EDGEFLEET_BENCH_PROFILE_BACKGROUND=FILE`` and ``idle`` > 0: py-spy samples the fleet
    (the coordinator with one process, else each worker: ``FILE.<pid>``) over the window
    ``background`` measures, collapsed stacks; ``FILE.gil``: the same, only the thread that holds
    the GIL (what the process's Python spends its CPU on). Returns the function that stops it."""
    out = os.environ.get("EDGEFLEET_BENCH_PROFILE_BACKGROUND")
    if not out or idle <= 0:
        return lambda: None
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def start() -> None:
        mark = f"step {last_step}: sleep"
        while not stop.is_set() and not any(w.startswith(mark) for _, w in run.result.events):
            stop.wait(0.05)
        if stop.wait(after):
            return
        targets = pids()
        duration = ["--duration", str(max(1, int(idle - after) - 2))]
        for pid in targets:
            name = out if len(targets) == 1 else f"{out}.{pid}"
            procs.append(_py_spy(pid, name, rate=50, extra=duration))
            # and the samples of the thread holding the GIL only: a thread waiting for the GIL
            # reads as busy in the first file, at whatever line it waits in
            procs.append(_py_spy(pid, f"{name}.gil", rate=50, extra=[*duration, "--gil"]))

    starter = threading.Thread(target=start, daemon=True)
    starter.start()

    def finish() -> None:
        stop.set()
        starter.join(5)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:  # a run that failed early: its error, not this, is the news
                proc.kill()

    return finish


def _timeline(harness: Any, rollout_id: str | None) -> dict[str, Any] | None:
    """Where the rollout's wall time went (bench/rollout_timeline.py), from the server's database."""
    if rollout_id is None:
        return None
    from bench.rollout_timeline import timeline, totals
    from fleet_server.store import make_engine

    engine = make_engine(harness._server_settings(), migrate=False)
    try:
        tl = timeline(engine, rollout_id)
    finally:
        engine.dispose()
    return {
        "critical_path_totals": totals(tl),
        "stages": tl["stages"],
        "decisions": tl["decisions"],
        "ended": tl["ended"],
        "device_reasons": tl["device_reasons"],
        "failures": tl["failures"],
    }


def _subprocess(
    devices: int, cache: Path, delivery: str, processes: int, idle: float = 0.0
) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.scale", str(devices), str(cache), "--delivery", delivery,
         "--processes", str(processes), "--idle", str(idle)],
        capture_output=True,
        text=True,
        timeout=1800,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"bench.scale {devices} {delivery} failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def row(base: dict[str, Any], new: dict[str, Any]) -> dict[str, object]:
    """One bench row: the mirror run against the server run of the same size."""
    n = new["devices"]
    outcome = "" if new["state"] == "completed" else f"; FAILED: ended {new['state']}"

    def both(key: str) -> str:
        return f"{base[key]} -> {new[key]}"

    def server_cpu(r: dict[str, Any]) -> str:
        return f"{r['cpu_s_per_1000']['server']}"

    def all_cpu(r: dict[str, Any]) -> str:
        return f"{sum(r['cpu_s_per_1000'].values()):.0f}"

    walls = (base["rollout_s"], new["rollout_s"])
    return {
        "bench": f"scale: {n} devices, 4-stage rollout ({new['processes']} process(es), broker {BROKER})",
        "baseline": f"downloads from the fleet server ({base['state']})",
        "baseline_s": walls[0],
        "edgefleet_s": walls[1],
        "ratio": round(walls[1] / walls[0], 2) if all(walls) else None,
        "target": ("<= 15 s" if n <= 100 else "<= 300 s at 10,000") + outcome,
        "installs_per_s": both("installs_per_s"),
        "server_cpu_s_per_1000_installs": f"{server_cpu(base)} -> {server_cpu(new)}",
        "all_cpu_s_per_1000": f"{all_cpu(base)} -> {all_cpu(new)}",
        "requests_per_install": both("requests_per_install"),
        "server_requests_per_install": both("server_requests_per_install"),
        "bytes_per_install": both("bytes_per_install"),
        "load": f"{base['load_during']} / {new['load_during']}",
    }


def run(sizes: tuple[int, ...] = (100, 1000)) -> list[dict[str, object]]:
    """Each size both ways, each run in a fresh process with the models prebuilt."""
    from bench.sim import prepare_models

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "models"
        prepare_models(cache)
        for n in sizes:
            procs = max(1, n // 1000)
            base = _subprocess(n, cache, "server", procs)
            new = _subprocess(n, cache, "mirror", procs)
            rows.append(row(base, new))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    parser.add_argument("devices", type=int, nargs="?")
    parser.add_argument("cache", type=Path, nargs="?", help="model cache (built when missing)")
    parser.add_argument("--delivery", choices=("server", "mirror"), default="mirror")
    parser.add_argument("--processes", "-p", type=int, default=0, help="fleet workers (default N/1000)")
    parser.add_argument("--baseline", action="store_true", help="also run it with delivery=server")
    parser.add_argument("--workload-hz", type=float, default=None, help="inferences/s per device (file: 0.2)")
    parser.add_argument(
        "--telemetry-interval",
        type=float,
        default=None,
        help="s between a device's telemetry batches (file: 60)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0.0,
        help="run the fleet this many s before the rollout and report its background CPU per device-second",
    )
    args = parser.parse_args(argv)
    if args.devices is None:
        for r in run():
            print(r)
        return 0
    procs = args.processes or max(1, args.devices // 1000)
    cache = args.cache or Path(tempfile.gettempdir()) / "edgefleet-bench-models"
    if not (cache / "models.json").exists():
        from bench.sim import prepare_models

        prepare_models(cache)
    if args.baseline:
        base = _subprocess(args.devices, cache, "server", procs, args.idle)
        new = _subprocess(args.devices, cache, args.delivery, procs, args.idle)
        print(json.dumps(base))
        print(json.dumps(new))
        print(row(base, new))
        return 0
    print(
        json.dumps(
            measure(
                args.devices,
                cache,
                args.delivery,
                procs,
                args.workload_hz,
                args.idle,
                args.telemetry_interval,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
