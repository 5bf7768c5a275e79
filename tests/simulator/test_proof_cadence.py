"""A device's proof of serving reaches the fleet server at once, whatever its telemetry interval.

The server counts a device ``done`` when it reports the rollout's model running AND at least one
successful inference with it. The agent sends that proof as a state report the moment its first
good inference with a new model is served, not in its next periodic telemetry batch, so a fleet
can send metrics every minute (or every few) without slowing a zero-soak stage. Every other
end-to-end test runs agents with a sub-second interval, which would hide a proof that waits
for a batch; this one runs them with a 60 s interval through a real broker and fleet server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.broker import mosquitto_binary
from edgefleet.sim_harness import run_scenario

INTERVAL = 60.0

SCENARIO = f"""
name = "proof-cadence"
time_limit = 120
tick_interval = 0.5
[fleet]
devices = 4
workload_hz = 2.0
telemetry_interval = {INTERVAL}
[[fleet.classes]]
name = "rpi4"
[models.v1]
version = "1"
[[steps]]
action = "rollout"
id = "r"
model = "v1"
stages = [50, 100]
soak_seconds = 0.0
[[steps]]
action = "wait_rollout"
rollout = "r"
states = ["completed", "rolled_back", "aborted", "paused"]
timeout = 50
[[expect]]
check = "rollout_state"
rollout = "r"
states = ["completed"]
"""


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_a_long_telemetry_interval_does_not_slow_a_zero_soak_rollout(tmp_path: Path) -> None:
    path = tmp_path / "proof-cadence.toml"
    path.write_text(SCENARIO)
    result = run_scenario(path, workdir=tmp_path / "work", report_dir=tmp_path / "report").result
    start = next(t for t, what in result.events if what.startswith("step 0"))
    end = next((t for t, what in result.events if what.startswith("rollout r:")), None)
    assert result.ok, (result.step_error, result.checks, result.events)
    assert end is not None
    # two stages, each waiting only for its devices' first inference (2/s) and the server's
    # tick: seconds, where a proof carried by the periodic batch would wait up to 60 s per device
    assert end - start < INTERVAL / 3, f"rollout took {end - start:.1f}s with a {INTERVAL:g}s interval"
    assert result.figures["rollout_devices"]["r"]["done"] == 4
