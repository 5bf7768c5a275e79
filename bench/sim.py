"""1,000 simulated devices through a 4-stage rollout (zero soak): wall time, peak memory, growth from 100.

The models are compiled and signed once, up front, into a model cache on disk.
Each fleet size then runs in a fresh process (``python -m bench.sim N CACHE``)
that never imports the compiler, so its peak RSS is that of the fleet process
alone: Python, the harness (artifact proxy, HTTP client) and N real agents with
their shared onnxruntime sessions, as ``edgefleet sim run`` runs them. The
broker (Mosquitto, the production configuration: TLS, a client certificate per
device; ``EDGEFLEET_BENCH_BROKER=password`` or ``insecure-dev`` for the other
modes) and the fleet server run in their own processes and are not counted.
Wall time is from creating the rollout to the server reporting it
``completed``; the baseline is the same run with 100 devices. The memory row
gives the peak of each process, its RSS before the fleet started, the peak's
growth per device, and the marginal cost of the 900 extra devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = [1, 10, 50, 100]
BROKER = os.environ.get("EDGEFLEET_BENCH_BROKER", "mtls")  # mtls, password or insecure-dev


def scenario(devices: int) -> dict[str, Any]:
    return {
        "name": f"bench-{devices}",
        "time_limit": 600,
        "tick_interval": 0.5,
        "fleet": {
            "devices": devices,
            "workload_hz": 0.5,
            "telemetry_interval": 5.0,
            "classes": [{"name": "rpi4", "share": 3}, {"name": "jetson", "share": 1}],
        },
        "models": {"v1": {"version": "1"}},
        "steps": [
            {
                "action": "rollout",
                "id": "r",
                "model": "v1",
                "stages": STAGES,
                "soak_seconds": 0.0,
                "device_timeout_seconds": 300,
                "max_failure_rate": 0.01,
                "min_inferences": 20,
                "timeout": 500,
            },
            {
                "action": "wait_rollout",
                "rollout": "r",
                "states": ["completed", "rolled_back", "aborted"],
                "timeout": 500,
            },
        ],
        "expect": [
            {"check": "rollout_state", "rollout": "r", "states": ["completed"]},
            {"check": "devices_running", "model": "v1", "at_least": 0.99},
        ],
    }


def measure(devices: int, model_cache: Path, processes: int = 1) -> dict[str, Any]:
    """One fleet size in this process (models prebuilt in ``model_cache``: no compiler here);
    ``processes`` > 1 splits the fleet over that many worker processes (their figures included)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from edgefleet.sim_harness import SimHarness, device_root
    from simulator.memory import peak_rss_bytes, rss_bytes
    from simulator.runner import ScenarioRun
    from simulator.scenario import parse_scenario

    sc = parse_scenario(scenario(devices))
    with (
        tempfile.TemporaryDirectory() as tmp,
        SimHarness(sc, Path(tmp), model_cache=model_cache, broker_auth=BROKER) as harness,
        device_root(Path(tmp)) as device_dir,
    ):
        assert "compiler" not in sys.modules, "models must come from the cache"
        rss_before = rss_bytes()  # python + harness (proxies, HTTP client, signing); no agent yet
        peak_before = peak_rss_bytes()
        t0 = time.monotonic()
        run = ScenarioRun(
            sc, harness, Path(tmp), sample_interval=2.0, device_root=device_dir, processes=processes
        )
        result = run.execute()
        peak = peak_rss_bytes()
        events = dict((what, t) for t, what in result.events)
        start = next(t for t, w in result.events if w.startswith("step 0"))
        done = events.get("rollout r: completed")
        return {
            "devices": devices,
            "ok": result.ok,
            "rollout_s": round(done - start, 2) if done is not None else None,
            "fleet_start_s": result.figures.get("fleet_start_seconds"),
            "total_s": round(time.monotonic() - t0, 1),
            "rss_before_fleet_mb": round(rss_before / 2**20, 1),
            "peak_before_fleet_mb": round(peak_before / 2**20, 1),
            "peak_rss_mb": round(peak / 2**20, 1),
            "peak_growth_per_device_kb": round((peak - rss_before) / devices / 1024, 1),
            "rss_per_device_kb": result.figures.get("rss_per_device_kb"),
            "rollout_devices": result.figures.get("rollout_devices"),
            "state": result.figures.get("rollouts", {}).get("r"),
            "end_s": round(next((t for t, w in result.events if w.startswith("rollout r:")), -1) - start, 2),
            "max_loop_lag_s": result.figures.get("max_loop_lag_s"),
            "checks": [(c.outcome, c.label, c.detail) for c in result.checks],
            "processes": result.figures.get("fleet_processes"),
            "wall_s": result.figures.get("wall_seconds"),
            "broker": BROKER,
        }


def prepare_models(cache: Path) -> None:
    """Build and sign the bench's models once, here: the measured processes never load the compiler."""
    from edgefleet.sim_harness import SimHarness
    from simulator.scenario import parse_scenario

    with tempfile.TemporaryDirectory() as tmp:
        SimHarness(parse_scenario(scenario(100)), Path(tmp), model_cache=cache)._build_models()


def _subprocess(devices: int, cache: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.sim", str(devices), str(cache)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench.sim {devices} failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(small: int = 100, large: int = 1000) -> list[dict[str, object]]:
    """Both sizes, each in a fresh process with the models prebuilt on disk, so each peak RSS is
    that fleet's own; a rollout that did not complete is reported (end state in ``target``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "models"
        prepare_models(cache)
        base, big = _subprocess(small, cache), _subprocess(large, cache)
    outcome = (
        ""
        if big["state"] == "completed"
        else f"; FAILED: {large} ended {big['state']} {big['rollout_devices']}"
    )
    extra = large - small
    marginal_kb = round((big["peak_rss_mb"] - base["peak_rss_mb"]) * 1024 / extra, 1)
    return [
        {
            "bench": f"sim: {large} devices, 4-stage rollout, zero soak (wall), broker {BROKER}",
            "baseline": f"same with {small} devices ({base['state']})",
            "baseline_ms": round(base["end_s"] * 1e3),
            "edgefleet_ms": round(big["end_s"] * 1e3),
            "ratio": round(big["end_s"] / base["end_s"], 2),
            "target": f"{large} devices < 120 s (loop lag max {big['max_loop_lag_s']} s){outcome}",
            "growth": f"x{round(big['end_s'] / base['end_s'], 1)} wall for x{large // small} devices",
            "fleet_start_s": f"{base['fleet_start_s']} -> {big['fleet_start_s']}",
            "lag_s": f"{base['max_loop_lag_s']} -> {big['max_loop_lag_s']}",
        },
        {
            "bench": f"sim: peak RSS of the {large}-device process (models prebuilt, no compiler)",
            "baseline": f"same with {small} devices",
            "baseline_mb": base["peak_rss_mb"],
            "edgefleet_mb": big["peak_rss_mb"],
            "ratio": round(big["peak_rss_mb"] / base["peak_rss_mb"], 2),
            "target": f"report: {marginal_kb} KB per extra device ({small} -> {large})",
            "before_fleet_mb": f"{base['rss_before_fleet_mb']} / {big['rss_before_fleet_mb']}",
            "peak_growth_kb_per_device": (
                f"{base['peak_growth_per_device_kb']} / {big['peak_growth_per_device_kb']}"
            ),
            "end_rss_growth_kb_per_device": f"{base['rss_per_device_kb']} / {big['rss_per_device_kb']}",
        },
    ]


if __name__ == "__main__":
    # python -m bench.sim                       the two rows of `python -m bench sim`
    # python -m bench.sim prepare CACHE         build the models into CACHE
    # python -m bench.sim N CACHE [PROCESSES]   one fleet size, JSON on the last line
    if sys.argv[1:2] == ["prepare"]:
        prepare_models(Path(sys.argv[2]))
    elif len(sys.argv) > 2:
        procs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
        print(json.dumps(measure(int(sys.argv[1]), Path(sys.argv[2]), procs)))
    else:
        for row in run():
            print(row)
