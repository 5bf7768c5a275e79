"""The engine does not count the time the server's ingest was behind against a device (or a soak).

Pure rule and decide-level tests first, then the ticker on a real store (SQLite and PostgreSQL):
a device whose success report reaches the store late, while the ticker is told ingest is behind,
is not timed out, and the same device with ingest keeping up is.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, update
from sqlmodel import select

from fleet_server.engine import DeviceSnapshot, Plan, RolloutSnapshot, apply_plan, decide, heard_for
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.models import Device, Model, ModelAggregate, Rollout, RolloutDevice, utcnow
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from fleet_server.store import new_session
from fleet_server.ticker import Ticker
from signing.keys import generate_keypair

from .conftest import wait_for
from .test_engine import OLD, SHA, T0, first_stage, rollout, serving

pytestmark = pytest.mark.ingest_workers  # the engine reading the workers' lag


def test_heard_for_counts_only_the_time_whose_reports_are_stored() -> None:
    assert heard_for(T0, T0 + timedelta(seconds=100), 0.0) == 100.0
    assert heard_for(T0, T0 + timedelta(seconds=100), 30.0) == 70.0
    assert heard_for(T0, T0 + timedelta(seconds=100), 250.0) == 0.0  # never below zero
    assert heard_for(T0, T0 + timedelta(seconds=100), -5.0) == 100.0  # a bad reading adds nothing


def _notified_one(timeout: float = 30.0) -> tuple[RolloutSnapshot, list[DeviceSnapshot]]:
    r = rollout(stages=(100.0,), device_timeout_seconds=timeout, max_failure_rate=1.0)
    return r, first_stage(r, 1)  # notified at T0


def test_a_device_is_not_timed_out_for_the_time_ingest_is_behind() -> None:
    r, devices = _notified_one(timeout=30)
    now = T0 + timedelta(seconds=50)
    plan = decide(r, devices, now, ingest_lag=25.0)  # heard 25 s of the 30
    assert [c.state for c in plan.changes] == []
    plan = decide(r, devices, now)  # ingest keeping up: 50 s heard, timed out
    assert [c.state for c in plan.changes] == [DS.TIMED_OUT]
    assert "ingest" not in (plan.changes[0].reason or "")
    # Still nothing after the lag is forgiven: it times out, and the reason says the lag was counted.
    plan = decide(r, devices, now + timedelta(seconds=10), ingest_lag=25.0)
    assert [c.state for c in plan.changes] == [DS.TIMED_OUT]
    assert "(ingest 25s behind)" in (plan.changes[0].reason or "")


def test_a_late_success_after_a_lag_finishes_the_device() -> None:
    r, devices = _notified_one(timeout=30)
    plan = decide(r, devices, T0 + timedelta(seconds=60), ingest_lag=40.0)
    assert plan.changes == []
    # The lag drained: the success the device sent at T0+20 is stored now, after its timeout.
    late = [serving(devices[0])]
    plan = decide(r, late, T0 + timedelta(seconds=65), ingest_lag=0.0)
    assert [c.state for c in plan.changes] == [DS.DONE]


def test_the_wait_limit_counts_heard_time_only() -> None:
    r, devices = _notified_one(timeout=30)
    r = dataclasses.replace(r, policy=r.policy.model_copy(update={"max_wait_seconds": 100.0}))
    waiting = [dataclasses.replace(devices[0], state=DS.WAITING, waiting="window", timeout_from=T0)]
    assert decide(r, waiting, T0 + timedelta(seconds=150), ingest_lag=60.0).changes == []
    plan = decide(r, waiting, T0 + timedelta(seconds=150))
    assert [c.state for c in plan.changes] == [DS.TIMED_OUT]


def test_the_soak_waits_while_ingest_is_behind() -> None:
    r = rollout(stages=(50.0, 100.0), soak_seconds=60)
    devices = [serving(d) for d in first_stage(r, 2)]
    r, devices, _ = _step(r, devices, T0 + timedelta(seconds=2))  # done, stage finished: soak starts
    assert r.stage_ready_at == T0 + timedelta(seconds=2)
    later = T0 + timedelta(seconds=70)  # 68 s soaked by the clock
    plan = decide(r, devices, later, ingest_lag=30.0)  # 38 s of it heard: keep soaking
    assert plan.current_stage == 0 and plan.state == RS.RUNNING
    plan = decide(r, devices, later)
    assert plan.current_stage == 1


def _step(
    r: RolloutSnapshot, devices: list[DeviceSnapshot], now: datetime
) -> tuple[RolloutSnapshot, list[DeviceSnapshot], Plan]:
    plan = decide(r, devices, now)
    r2, d2 = apply_plan(r, devices, plan, now)
    return r2, d2, plan


# The ticker on a real store.


class Lag:
    """What the ticker is told ingest lags by (the bridge's measurement in a real server)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def _seed(store: Engine, now: datetime) -> None:
    """One device notified at ``now`` of a one-stage rollout with a 60 s device timeout, no retries."""
    with store.begin() as c:
        c.execute(insert(Model.__table__), [{  # type: ignore[attr-defined]
            "id": 1, "name": "m", "version": "1", "release": 1, "target": "arm64-cpu",
            "hardware_ids": ["hw"], "sha256": SHA, "length": 1, "manifest": {}, "storage_path": "/x",
            "created_at": now}])  # fmt: skip
        c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
            "id": "d1", "hardware_id": "hw", "tags": {}, "registered_at": now, "online": True,
            "deployment_seq": 0, "desired_seq": 1, "running_sha256": OLD}])  # fmt: skip
        c.execute(insert(Rollout.__table__), [{  # type: ignore[attr-defined]
            "id": "r", "model_id": 1, "model_ref": "m:1", "model_sha256": SHA, "selector": {},
            "stages": [100], "soak_seconds": 0, "device_timeout_seconds": 60, "max_error_rate": 0.05,
            "min_inferences": 1, "max_failure_rate": 1.0, "state": "running", "current_stage": 0,
            "stage_unit": "percent", "policy": {}, "approved_through": -1, "rollback_requested": False,
            "created_at": now, "updated_at": now}])  # fmt: skip
        c.execute(insert(RolloutDevice.__table__), [{  # type: ignore[attr-defined]
            "rollout_id": "r", "device_id": "d1", "order_key": "0", "stage": 0, "state": "notified",
            "seq": 1, "notified_at": now, "attempts": 1, "updated_at": now}])  # fmt: skip


def _success_stored(store: Engine) -> None:
    """The device's serving report and first served inference reach the store (as ingest writes them)."""
    with store.begin() as c:
        c.execute(
            update(Device)
            .where(Device.id == "d1")  # type: ignore[arg-type]
            .values(running_sha256=SHA, deployment_seq=1, deployment_state="serving")
        )
        c.execute(insert(ModelAggregate.__table__), [{  # type: ignore[attr-defined]
            "device_id": "d1", "sha256": SHA, "served_ok": 5, "inferences": 5, "errors": 0}])  # fmt: skip


def _device_state(store: Engine) -> tuple[str, str | None]:
    with new_session(store) as session:
        rd = session.exec(select(RolloutDevice).where(RolloutDevice.device_id == "d1")).one()
        return rd.state, rd.reason


def _ticker(store: Engine, tmp_path: Path, lag: Lag) -> Ticker:
    settings = ServerSettings(data_dir=tmp_path)
    return Ticker(settings, store, lambda _d, _p: None, generate_keypair(), threading.Lock(), ingest_lag=lag)


def test_ticker_does_not_time_out_a_device_whose_success_is_late_in_ingest(
    store: Engine, tmp_path: Path
) -> None:
    t0 = utcnow().replace(microsecond=0)
    _seed(store, t0)
    lag = Lag()
    ticker = _ticker(store, tmp_path, lag)
    lag.seconds = 45.0  # the device's success is in the broker's queue, ingest 45 s behind
    ticker.tick(t0 + timedelta(seconds=90))  # 90 s by the clock, 45 s heard: within the 60 s
    assert _device_state(store)[0] == DS.NOTIFIED
    _success_stored(store)  # ingest catches up
    lag.seconds = 0.0
    ticker.tick(t0 + timedelta(seconds=95))
    assert _device_state(store)[0] == DS.DONE
    ticker.tick(t0 + timedelta(seconds=96))
    with new_session(store) as session:
        assert session.get_one(Rollout, "r").state == RS.COMPLETED


def test_ticker_times_out_the_same_device_when_ingest_keeps_up(store: Engine, tmp_path: Path) -> None:
    t0 = utcnow().replace(microsecond=0)
    _seed(store, t0)
    ticker = _ticker(store, tmp_path, Lag())
    ticker.tick(t0 + timedelta(seconds=90))
    state, reason = _device_state(store)
    assert state == DS.TIMED_OUT and "no success within 60s" in (reason or ""), reason


def test_ticker_survives_a_failing_lag_reading(store: Engine, tmp_path: Path) -> None:
    t0 = utcnow().replace(microsecond=0)
    _seed(store, t0)

    def broken() -> float:
        raise ValueError("no ingest links yet")

    settings = ServerSettings(data_dir=tmp_path)
    ticker = Ticker(
        settings, store, lambda _d, _p: None, generate_keypair(), threading.Lock(), ingest_lag=broken
    )
    ticker.tick(t0 + timedelta(seconds=90))  # judged as with no lag
    assert _device_state(store)[0] == DS.TIMED_OUT


def test_a_real_server_ticks_with_its_measured_ingest_lag(make_server: Callable[..., ServerThread]) -> None:
    """The server's ticker reads the bridge's lag: a stalled ingest worker shows in what the engine
    is told (the probes queue behind it at the broker)."""
    srv = make_server(shared_subscriptions=False)
    bridge, ticker = srv.context.bridge, srv.context.ticker
    assert bridge is not None and ticker is not None and len(bridge.telemetry_workers) == 1
    wait_for(lambda: ticker.ingest_lag() < 2.0, timeout=15)
    pid = bridge.telemetry_workers[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: ticker.ingest_lag() >= 3.0, timeout=20)
        assert abs(ticker.ingest_lag() - bridge.ingest_lag) < 1.0
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: ticker.ingest_lag() < 2.0, timeout=30)
