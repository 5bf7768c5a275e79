"""1,000 simulated devices through a 4-stage rollout (zero soak): wall time, peak memory, growth from 100.

Each fleet size runs in a fresh process (``python -m bench.sim N``) so its peak
RSS is its own: broker (Mosquitto, a separate process, not counted), fleet
server thread and N real agents in one Python process, as ``edgefleet sim run``
runs them. Wall time is from creating the rollout to the server reporting it
``completed``; the baseline is the same run with 100 devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = [1, 10, 50, 100]


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


def measure(devices: int) -> dict[str, Any]:
    """One fleet size in this process; returns the figures."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from edgefleet.sim_harness import SimHarness, device_root
    from simulator.memory import peak_rss_bytes
    from simulator.runner import ScenarioRun
    from simulator.scenario import parse_scenario

    sc = parse_scenario(scenario(devices))
    with (
        tempfile.TemporaryDirectory() as tmp,
        SimHarness(sc, Path(tmp)) as harness,
        device_root(Path(tmp)) as device_dir,
    ):
        t0 = time.monotonic()
        run = ScenarioRun(sc, harness, Path(tmp), sample_interval=2.0, device_root=device_dir)
        result = run.execute()
        events = dict((what, t) for t, what in result.events)
        start = next(t for t, w in result.events if w.startswith("step 0"))
        done = events.get("rollout r: completed")
        return {
            "devices": devices,
            "ok": result.ok,
            "rollout_s": round(done - start, 2) if done is not None else None,
            "fleet_start_s": result.figures.get("fleet_start_seconds"),
            "total_s": round(time.monotonic() - t0, 1),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
            "rss_per_device_kb": result.figures.get("rss_per_device_kb"),
            "rollout_devices": result.figures.get("rollout_devices"),
            "state": result.figures.get("rollouts", {}).get("r"),
            "end_s": round(next((t for t, w in result.events if w.startswith("rollout r:")), -1) - start, 2),
            "max_loop_lag_s": result.figures.get("max_loop_lag_s"),
            "checks": [(c.outcome, c.label, c.detail) for c in result.checks],
        }


def _subprocess(devices: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.sim", str(devices)], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench.sim {devices} failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(small: int = 100, large: int = 1000) -> list[dict[str, object]]:
    """Both sizes; a rollout that did not complete is reported (its end state in ``target``), not hidden."""
    base, big = _subprocess(small), _subprocess(large)
    outcome = (
        ""
        if big["state"] == "completed"
        else f"; FAILED: {large} ended {big['state']} {big['rollout_devices']}"
    )
    return [
        {
            "bench": f"sim: {large} devices, 4-stage rollout, zero soak (wall)",
            "baseline": f"same with {small} devices ({base['state']})",
            "baseline_ms": round(base["end_s"] * 1e3),
            "edgefleet_ms": round(big["end_s"] * 1e3),
            "ratio": round(big["end_s"] / base["end_s"], 2),
            "target": f"{large} devices < 120 s (loop lag max {big['max_loop_lag_s']} s){outcome}",
        },
        {
            "bench": f"sim: peak RSS of the {large}-device process",
            "baseline": f"same with {small} devices",
            "baseline_mb": base["peak_rss_mb"],
            "edgefleet_mb": big["peak_rss_mb"],
            "ratio": round(big["peak_rss_mb"] / base["peak_rss_mb"], 2),
            "target": f"report; per device {big['rss_per_device_kb']} KB (fleet only)",
        },
    ]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(measure(int(sys.argv[1]))))
    else:
        for row in run():
            print(row)
