"""The ingest lag a replica reports counts what waits in the broker's queue for its ingest workers.

A worker that falls behind (starved of CPU, here stopped outright with SIGSTOP) leaves the
backlog at the broker: its pipeline takes a bounded number of messages and stops reading. The
lag must still show it (the metric, ``/api/v1/stats``, ``/readyz``), and the worker must catch up
with nothing lost once it runs again.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from fleet_server.ingest_lag import LagProbe, probe_topic
from fleet_server.runner import ServerThread
from simulator.runner import ScenarioRun
from simulator.scenario import parse_scenario

from .conftest import FakeDevice, register, stats, wait_for
from .test_mqtt import telemetry

pytestmark = pytest.mark.ingest_workers  # each worker's lag probe

SHA = "cd" * 32
# The drain test's quiet period: a stalled worker shows as lag above DRAIN_LAG within about
# ingest_lag.PROBE_INTERVAL + DRAIN_LAG s, well inside it, so only the lag keeps the runner waiting.
QUIET = 6.0


def lag_metric(api: httpx.Client) -> float:
    found = re.search(r"^edgefleet_ingest_lag_seconds (\S+)$", api.get("/metrics").text, re.M)
    assert found, "no edgefleet_ingest_lag_seconds in /metrics"
    return float(found.group(1))


def test_a_stalled_ingest_worker_shows_as_lag_and_catches_up(
    make_server: Callable[..., ServerThread], fake_device: Callable[[str], FakeDevice]
) -> None:
    # one ingest worker takes the whole telemetry stream (plain subscriptions), as the scenarios run it
    srv = make_server(shared_subscriptions=False, ready_max_ingest_lag_seconds=3.0)
    bridge = srv.context.bridge
    assert bridge is not None and len(bridge.telemetry_workers) == 1
    with httpx.Client(base_url=srv.url, timeout=10) as api:
        register(api, "lag-1")
        dev = fake_device("lag-1")
        dev.publish("telemetry", telemetry("lag-1", "b0", SHA, 1))
        wait_for(lambda: stats(api)["telemetry_batches"] == 1, timeout=15)
        wait_for(lambda: lag_metric(api) < 2.0, timeout=15)
        assert api.get("/readyz").status_code == 200
        pid = bridge.telemetry_workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(1, 21):  # the broker acknowledges them: queued for the stalled worker
                dev.publish("telemetry", telemetry("lag-1", f"b{i}", SHA, 1))
            # nothing stored, and the worker reports nothing: the lag must grow all the same
            wait_for(lambda: lag_metric(api) >= 4.0, timeout=20)
            assert stats(api)["telemetry_batches"] == 1
            assert float(stats(api)["ingest_lag_seconds"]) >= 4.0
            ready = api.get("/readyz")
            # advisory: the replica still serves the API and the downloads, and says it is behind
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "degraded" and not ready.json()["checks"]["ingest_lag"]["ok"]
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: stats(api)["telemetry_batches"] == 21, timeout=30)
        wait_for(lambda: lag_metric(api) < 2.0, timeout=30)  # caught up: the next probe comes back at once
        assert api.get("/readyz").json()["status"] == "ready"


def test_the_scenario_telemetry_check_waits_for_a_server_that_is_behind(
    make_server: Callable[..., ServerThread], fake_device: Callable[[str], FakeDevice], tmp_path: Path
) -> None:
    """The scenario runner counts stored batches once the fleet stopped. A server still behind then
    (its worker stalled longer than the runner's quiet period) is waited for, not counted short.
    The quiet period is the runner's argument, shorter here than a scenario's ``DRAIN_QUIET``: the
    worker stays stalled for it plus 3 s either way, and a suite pays that stall in wall time."""
    srv = make_server(shared_subscriptions=False)
    bridge = srv.context.bridge
    assert bridge is not None
    scenario = parse_scenario(
        {
            "name": "drain",
            "fleet": {"devices": 1, "classes": [{"name": "rpi4"}]},
            "models": {"v1": {"version": "1"}},
            "steps": [{"action": "sleep", "seconds": 0}],
            "expect": [{"check": "telemetry_lost", "at_most": 0}],
        }
    )
    token = (tmp_path / "server-data" / "admin.token").read_text().strip()  # the server's bootstrap token
    run = ScenarioRun(scenario, SimpleNamespace(server_url=srv.url, admin_token=token), tmp_path)
    with httpx.Client(base_url=srv.url, timeout=10) as api:
        register(api, "drain-1")
        dev = fake_device("drain-1")
        dev.publish("telemetry", telemetry("drain-1", "d0", SHA, 1))
        wait_for(lambda: stats(api)["telemetry_batches"] == 1, timeout=15)
    pid = bridge.telemetry_workers[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(QUIET + 3.0, os.kill, (pid, signal.SIGCONT))
    try:
        for i in range(1, 21):
            dev.publish("telemetry", telemetry("drain-1", f"d{i}", SHA, 1))
        resume.start()
        settled = run._stats_settled(21, quiet=QUIET)
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT)
    assert settled["telemetry_batches"] == 21, settled
    assert run.result.figures["telemetry_stored_when_fleet_stopped"] == 1
    assert run.result.figures["telemetry_drain_s"] >= QUIET


def test_a_lag_probe_measures_the_one_on_its_way_and_forgets_one_lost_with_a_session() -> None:
    now = [100.0]
    probe = LagProbe(probe_topic("fleet-server-x-ingest0"), interval=1.0, clock=lambda: now[0])
    assert probe.due() and probe.lag == 0.0
    probe.sent("a")
    assert not probe.due()  # one at a time
    now[0] += 7.0
    assert probe.lag == 7.0  # still on its way: the lag grows with it
    probe.stored("stale")  # a probe queued for an earlier session of the worker
    assert probe.lag == 7.0 and not probe.due()
    probe.stored("a")
    assert probe.lag == 7.0 and probe.due()  # its round trip, until the next one is back
    probe.sent("b")
    now[0] += 0.5
    probe.stored("b")
    assert probe.lag == 0.5
    now[0] += 1.0
    probe.sent("c")
    probe.reset()  # the worker reconnected with a clean session: "c" is gone with it
    now[0] += 60.0
    assert probe.due() and probe.lag == 0.5


def test_a_dropped_probe_gets_a_successor_and_stops_counting_once_it_is_back() -> None:
    """A probe the broker dropped (a full session queue) must not read as a lag that grows for ever:
    after ``resend`` a successor goes out, and when it is stored the first one is known lost."""
    now = [100.0]
    probe = LagProbe(probe_topic("fleet-server-x-ingest0"), interval=1.0, clock=lambda: now[0], resend=15.0)
    probe.sent("a")  # dropped by the broker
    now[0] += 14.0
    assert not probe.due() and probe.lag == 14.0
    now[0] += 1.0
    assert probe.due()  # on its way for 15 s: send a successor
    probe.sent("b")
    assert not probe.due()
    now[0] += 2.0
    assert probe.lag == 17.0  # the oldest still counts until we know it is lost
    probe.stored("b")  # FIFO: "a" would have come first, so it was lost
    assert probe.lag == 2.0 and probe.due()
    probe.stored("a")  # too late to matter (if it ever comes): nothing changes
    assert probe.lag == 2.0


def test_a_probe_stored_before_its_sender_marked_it_is_still_counted() -> None:
    """The bridge marks a probe on its way before publishing it: on a loaded machine the worker can
    store and report it before the publishing thread runs again, and a report of a probe that is
    not on its way is ignored, which left the lag growing (and a rollout's soak waiting)."""
    now = [100.0]
    probe = LagProbe(probe_topic("fleet-server-x-ingest0"), interval=1.0, clock=lambda: now[0])
    probe.sent("a")  # marked first, then published
    now[0] += 0.2
    probe.stored("a")  # the report came back before anything else happened in the sender
    assert probe.lag == pytest.approx(0.2) and not probe.due()
    now[0] += 1.0
    assert probe.due()
    probe.sent("b")
    probe.forget("b")  # the publish failed: never on its way, nothing to wait for
    assert probe.due() and probe.lag == pytest.approx(0.2)
