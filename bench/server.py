"""Fleet server benchmarks (issue 6).

1. Telemetry ingest end to end (devices -> Mosquitto -> server -> database):
   batches/s stored (decoded, deduped, aggregated, committed, then
   acknowledged) during a sustained window (default 60 s) into SQLite and into
   PostgreSQL, against a bare paho QoS 1 subscriber's receive rate under the
   same publishers in the same run. The broker is the production
   configuration (``start_secure_broker``: TLS everywhere, each device on its
   own connection with its own client certificate, the ACL); the server and
   the bare subscriber both come in on the server listener with the server's
   certificate, so TLS costs both sides alike. Target: ratio >= 0.6. The server ingests
   in its own worker processes, so the baseline subscriber runs in its own
   process too (in the publishers' process it would share their GIL, which
   made the ratio meaningless, > 1). The baseline is measured for half the
   window before the server runs and half after, and averaged: on a shared
   machine the load drifts during the run. Each server row also reports the
   MQTT disconnects of the server's clients (keepalive 5 s) and checks that
   the database holds exactly the batches counted.
2. One engine decision tick (``engine.decide``) for 10,000 devices in the
   middle of a rollout, every gate enabled. Target: <= 100 ms.
3. The admin console's device list: ``GET /api/v1/devices?limit=100`` with a
   selector (``hw=rpi4,site=lab``: one device in twelve) at 10,000 devices,
   over real HTTP, against the unfiltered first page in the same run, on
   SQLite and PostgreSQL; the same query as bare SQL is reported beside it.
4. Storing a rollout stage's deployment events (20,000 from 5,000 devices, and
   one reported snapshot per four events) through ``ingest_batch`` in flushes
   of the pipeline's size: CPU-seconds of the storing process (and, on
   PostgreSQL, of its backends), against the previous ORM ``_store`` kept here
   as ``_old_store``, interleaved in the same run.

``run(duration=5)`` gives a quick check; the default is what the issue asks.
PostgreSQL is taken from ``EDGEFLEET_BENCH_PG`` (default: the test server on
127.0.0.1:5432); without it the PostgreSQL row is skipped with a note.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import protocol
from device_agent.mqtt_security import MqttSecurity
from edgefleet.broker import (
    BrokerInfo,
    device_security,
    fleet_mqtt_keys,
    server_mqtt_settings,
    server_security,
    start_secure_broker,
)

PG_ADMIN = os.environ.get("EDGEFLEET_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SHA = "a" * 64
OLD = "b" * 64
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _template(device: str) -> bytes:
    """One device's telemetry batch as JSON with a batch-id placeholder (filled per message)."""
    stats = protocol.ModelStats(
        inferences=100,
        errors={"non_finite": 1},
        latency_buckets=[0] * 15 + [10, 50, 30, 9, 1] + [0] * 21,
        latency_sum_us=120_000.0,
        class_hist={str(i): 10 for i in range(10)},
        output_hist=[0] * 30 + [20, 60, 20] + [0] * 34,
        # ground truth and availability, as a device with labels and capture on sends them
        labels=20,
        labels_correct=18,
        confusion={"0:0": 9, "1:1": 9, "1:0": 2},
        label_delay_buckets=[0] * 10 + [5, 10, 5],
        requests=101,
        request_errors={"timeout": 1},
        input_checks={"input": [100, 1, 0, 2]},
        cpu_ms=85.0,
        captured=5,
    )
    batch = protocol.TelemetryBatch(
        device_id=device, batch_id="@ID@", window_start=NOW, window_end=NOW, models={SHA: stats},
        labels_unmatched={"unknown": 1},
    )  # fmt: skip
    return batch.model_dump_json().encode()


class Publishers:
    """Devices on ``threads`` threads, each device its own paho client (the ACL lets a device speak
    only for itself), publishing telemetry QoS 1 as fast as acks allow.

    A bounded window of unacknowledged publishes per thread (paho's message ids
    wrap, and an unbounded queue only measures memory). Every batch has a unique
    id, so the server's dedupe never drops one.
    """

    def __init__(self, broker: BrokerInfo, devices: list[str], threads: int = 2, window: int = 200) -> None:
        self.broker, self.devices, self.window = broker, devices, window
        self.stop = threading.Event()
        self.sent = 0
        self._lock = threading.Lock()
        fleet_mqtt_keys(broker, devices)  # issue the identities before the threads connect
        self._threads = [
            threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)
        ]
        self._templates = {d: _template(d) for d in devices}

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, index: int, of: int) -> None:
        mine = self.devices[index::of]
        clients: dict[str, mqtt.Client] = {}
        for d in mine:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=d, protocol=mqtt.MQTTv5)
            device_security(self.broker, d).apply(client)
            client.max_inflight_messages_set(self.window)
            client.connect(self.broker.host, self.broker.port)
            client.loop_start()
            clients[d] = client
        topics = {d: protocol.topic(d, "telemetry") for d in mine}
        run = uuid.uuid4().hex[:8]
        inflight: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        k = 0
        while not self.stop.is_set():
            device = mine[k % len(mine)]
            payload = zlib.compress(self._templates[device].replace(b"@ID@", f"{run}-{k}".encode()), 1)
            inflight.append(clients[device].publish(topics[device], payload, qos=1))
            k += 1
            if len(inflight) >= self.window:
                inflight.popleft().wait_for_publish(10)
        while inflight:
            inflight.popleft().wait_for_publish(10)
        with self._lock:
            self.sent += k
        for client in clients.values():
            client.disconnect()
            client.loop_stop()


def _bare_subscriber(host: str, port: int, security: MqttSecurity, conn: Any) -> None:
    """A bare paho QoS 1 subscriber (auto-ack, counts and drops), in its own process like the server's
    ingest worker: the baseline is not slowed by sharing the GIL with the publishers. It has the
    server's identity and connection (TLS, the server listener): only the server may read every
    device's telemetry."""
    received = 0

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal received
        received += 1

    sub = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: conn.send("ready")
    security.apply(sub)
    sub.connect(host, port)
    sub.loop_start()
    sub.subscribe(protocol.shared_subscription("telemetry"), qos=1)
    while conn.recv() == "count":
        conn.send(received)
    sub.disconnect()
    sub.loop_stop()


def _bare_subscriber_rate(broker: BrokerInfo, devices: list[str], duration: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    mqtt_settings = server_mqtt_settings(broker)
    args = (broker.host, mqtt_settings["mqtt_port"], server_security(broker), child)
    proc = ctx.Process(target=_bare_subscriber, args=args, daemon=True)
    proc.start()
    if not conn.poll(30):
        raise RuntimeError("the baseline subscriber did not subscribe")
    conn.recv()
    pubs = Publishers(broker, devices)
    pubs.start()
    time.sleep(1.0)  # warm-up
    conn.send("count")
    start = conn.recv()
    t0 = time.perf_counter()
    time.sleep(duration)
    conn.send("count")
    got = conn.recv() - start
    elapsed = time.perf_counter() - t0
    pubs.join()
    conn.send("stop")
    proc.join(10)
    return got / elapsed


def _server_rate(
    broker: BrokerInfo,
    devices: list[str],
    duration: float,
    database_url: str | None,
    data_dir: Path,
    shared: bool = True,
) -> tuple[float, dict[str, Any]]:
    """Batches/s the server stored (decoded, deduped, aggregated, committed, then acknowledged) during
    ``duration``, and checks: unexpected MQTT disconnects (keepalive 5 s, so a starved network thread
    shows), the backlog at the end, and the stored rows counted in the database."""
    from fleet_server.counters import Counters
    from fleet_server.models import Device
    from fleet_server.mqtt_bridge import MqttBridge
    from fleet_server.settings import ServerSettings
    from fleet_server.store import make_engine, new_session

    settings = ServerSettings(
        database_url=database_url,
        data_dir=data_dir,
        **{**server_mqtt_settings(broker), "shared_subscriptions": shared and broker.shared_subscriptions},
        mqtt_keepalive=5,
    )
    engine = make_engine(settings)
    with new_session(engine) as session:
        for d in devices:
            if session.get(Device, d) is None:
                session.add(Device(id=d, hardware_id="bench"))
        session.commit()
    counters = Counters()
    bridge = MqttBridge(settings, engine, counters)
    bridge.start()
    deadline = time.monotonic() + 10
    while not bridge.subscribed.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    pubs = Publishers(broker, devices)
    pubs.start()
    time.sleep(1.0)
    start = counters.snapshot()["telemetry_batches"]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    time.sleep(duration)
    stored = counters.snapshot()["telemetry_batches"] - start
    elapsed = time.perf_counter() - t0
    backlog = bridge.backlog
    pubs.join()
    bridge.stop(discard_backlog=True)
    from sqlalchemy import func, select

    from fleet_server.models import TelemetryBatchRow

    with new_session(engine) as session:
        rows = session.execute(select(func.count()).select_from(TelemetryBatchRow)).scalar_one()
    total = counters.snapshot()
    engine.dispose()
    if rows != total["telemetry_batches"]:
        raise AssertionError(f"{rows} batch rows stored but {total['telemetry_batches']} counted")
    checks = {
        "load": f"{load0:.1f}->{os.getloadavg()[0]:.1f}",
        "disconnects": total["mqtt_disconnects"],
        "backlog_end": backlog,
        "rows": rows,
        "workers": len(bridge.telemetry_workers),
    }
    return stored / elapsed, checks


def _pg_database() -> tuple[str, Any] | None:
    try:
        import psycopg
    except ImportError:
        return None
    admin = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    name = f"efbench_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        return None

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", drop


def _ingest_row(
    name: str, base: float, mine: float, duration: float, checks: dict[str, Any]
) -> dict[str, object]:
    return {
        "bench": f"telemetry ingest {duration:g} s -> {name} (TLS broker, mTLS devices)",
        "baseline": "bare paho QoS 1 subscriber, same TLS broker",
        "baseline_us": round(1e6 / base, 1) if base else None,
        "edgefleet_us": round(1e6 / mine, 1) if mine else None,
        "ratio": round(mine / base, 3) if base else None,
        "target": ">= 0.6 (rate ratio)",
        "rate_baseline": round(base),
        "rate_edgefleet": round(mine),
        "ingest_workers": checks["workers"],
        "mqtt_disconnects": checks["disconnects"],
        "backlog_end": checks["backlog_end"],
        "load_1m": checks["load"],
    }


def bench_ingest(duration: float = 60.0, devices: int = 50) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    ids = [f"bench-{i:04d}" for i in range(devices)]
    with tempfile.TemporaryDirectory() as tmp, start_secure_broker(Path(tmp) / "mq") as broker:
        info = broker.info
        load_before = os.getloadavg()[0]
        before = _bare_subscriber_rate(info, ids, duration / 2)
        measured = [("SQLite", *_server_rate(info, ids, duration, None, Path(tmp) / "sqlite"))]
        # the defaults (a $share group splits telemetry over two workers), then what the shipped
        # single-replica configurations run (deploy/server.env.example): plain subscriptions, one
        pg_runs = [("PostgreSQL", True, "pg"), ("PostgreSQL, shipped settings (no $share)", False, "pg1")]
        for name, shared, where in pg_runs:
            pg = _pg_database()
            if pg is None:
                break
            url, drop = pg
            try:
                measured.append((name, *_server_rate(info, ids, duration, url, Path(tmp) / where, shared)))
            finally:
                drop()
        load_after = os.getloadavg()[0]
        after = _bare_subscriber_rate(info, ids, duration / 2)
    base = (before + after) / 2
    for name, rate, checks in measured:
        row = _ingest_row(name, base, rate, duration, checks)
        row["rate_baseline"] = (
            f"{round(base)} (before {round(before)} at load {load_before:.1f},"
            f" after {round(after)} at load {load_after:.1f})"
        )
        rows.append(row)
    if pg is None:
        rows.append({"bench": "telemetry ingest -> PostgreSQL", "baseline": "skipped: no PostgreSQL",
                     "ratio": None, "target": ">= 0.6"})  # fmt: skip
    return rows


def _fleet(n: int) -> tuple[Any, list[Any], dict[str, Any]]:
    from fleet_server.engine import DeviceSnapshot, RolloutSnapshot
    from fleet_server.gates import Histograms
    from fleet_server.lifecycle import DeviceRolloutState as DS
    from fleet_server.lifecycle import RolloutState as RS
    from fleet_server.policy import Policy

    now = NOW + timedelta(minutes=10)
    lat = tuple([0] * 15 + [10, 50, 30, 9, 1] + [0] * 21)
    out = tuple([0] * 30 + [20, 60, 20] + [0] * 34)
    policy = Policy(
        max_latency_ratio=1.5, max_output_psi=0.25, min_success_rate=0.5, max_failures=n,
        retry_limits={"timed_out": 1}, rate_per_minute=1000, rate_increment_factor=2.0,
        soak_seconds=60, device_timeout_seconds=3600, max_error_rate=0.05, min_inferences=100,
        max_failure_rate=0.2,
    )  # fmt: skip
    r = RolloutSnapshot(
        id="bench", state=RS.RUNNING, model_sha256=SHA, stages=(1.0, 10.0, 50.0, 100.0), current_stage=2,
        stage_ready_at=None, policy=policy, started_at=NOW,
    )  # fmt: skip
    devices = []
    for i in range(n):
        did = f"dev-{i:05d}"
        hw = ("rpi4", "jetson", "imx8")[i % 3]
        if i < n // 10:  # stages 1-2: done and serving
            d = DeviceSnapshot(
                did, DS.DONE, stage=1, seq=5, notified_at=NOW, running_sha256=SHA, served_ok=100,
                inferences=100, errors=1, hardware_id=hw, latency_buckets=lat, output_hist=out,
            )  # fmt: skip
        elif i < n // 2:  # stage 3: in flight, some reported
            d = DeviceSnapshot(
                did, DS.NOTIFIED if i % 2 else DS.INSTALLING, stage=2, seq=6, notified_at=now,
                running_sha256=SHA if i % 4 == 0 else OLD, reported_seq=6, reported_state="probation",
                hardware_id=hw,
            )  # fmt: skip
        else:
            d = DeviceSnapshot(did, DS.PENDING, running_sha256=OLD, hardware_id=hw)
        devices.append(d)
    baseline = {hw: Histograms(lat, out) for hw in ("rpi4", "jetson", "imx8")}
    return (r, now), devices, baseline


def bench_engine(n: int = 10_000, repeats: int = 15) -> list[dict[str, object]]:
    from fleet_server.engine import decide

    (r, now), devices, baseline = _fleet(n)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        plan = decide(r, devices, now, baseline)
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return [
        {
            "bench": f"engine decide, {n:,} devices",
            "baseline": "budget",
            "baseline_ms": 100.0,
            "edgefleet_ms": round(ms, 1),
            "ratio": round(ms / 100.0, 3),
            "target": "<= 1.0 (<= 100 ms)",
            "changes": len(plan.changes),
            "notified": len(plan.notify),
        }
    ]


def _reported(device_id: str, seq: int, state: str, running: str) -> dict[str, Any]:
    """A device's reported snapshot of about the size and shape the simulator's agents send (~1 kB)."""
    return {
        "v": 1, "device_id": device_id, "agent_version": "0.9.3", "hardware_id": "hw",
        "running": {"sha256": running, "name": "detector", "version": "3",
                    "loaded_at": "2026-01-01T00:00:00Z"},
        "slots": {"a": running, "b": OLD}, "active_slot": "a", "deployment_seq": seq,
        "deployment_state": state,
        "deployment_error": None, "served_ok": {running: 120}, "served_errors": {running: 1},
        "shadow_sha256": None, "last_rejection": None,
        "capabilities": {"accelerators": ["cpu"], "ram_mb": 4096, "disk_mb": 32000, "arch": "arm64"},
        "acceptance": {running: {"passed": True, "samples": 64, "latency_p95_ms": 12.5, "agreement": 0.99}},
        "timezone": "Europe/Berlin", "link": {"class": "wifi", "budget_bytes_per_day": None,
                                              "used_bytes_today": 123456},
        "waiting": None, "ts": "2026-01-01T00:00:00.123456Z",
    }  # fmt: skip


def bench_ticker(n: int = 10_000, repeats: int = 5) -> list[dict[str, object]]:
    """A whole ticker tick (snapshot from the store, decide, write) on SQLite and PostgreSQL:
    context for the decide row. A rollout in its second stage (10 %, 20 %, 100 %): a tenth of the
    fleet done, a tenth in flight, each device with a realistic reported snapshot and events.
    ``cpu_ms`` is the server process's own CPU per tick (the wall time includes the load of a
    shared machine, and PostgreSQL's work)."""
    import threading

    from sqlalchemy import insert

    from fleet_server.engine import assignment_order
    from fleet_server.models import Device, EventRow, Model, ModelAggregate, Rollout, RolloutDevice, utcnow
    from fleet_server.settings import ServerSettings
    from fleet_server.store import make_engine
    from fleet_server.ticker import Ticker
    from signing.keys import generate_keypair

    def one(name: str, url: str | None, where: Path) -> dict[str, object]:
        settings = ServerSettings(data_dir=where, database_url=url)
        engine = make_engine(settings)
        now = utcnow()
        ids = [f"d{i:05d}" for i in range(n)]
        done, flight = n // 10, n // 5  # devices [0, done) done, [done, flight) installing, the rest pending

        def kind(
            i: int,
        ) -> tuple[str, str, int, str]:  # rollout state, running, reported seq, deployment state
            if i < done:
                return "done", SHA, 2, "serving"
            return ("installing", OLD, 2, "downloading") if i < flight else ("pending", OLD, 1, "serving")

        with engine.begin() as c:
            c.execute(insert(Model.__table__), [{  # type: ignore[attr-defined]
                "id": 1, "name": "m", "version": "1", "release": 1, "target": "arm64-cpu",
                "hardware_ids": ["hw"], "sha256": SHA, "length": 1, "manifest": {}, "storage_path": "/x",
                "created_at": now}])  # fmt: skip
            c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
                "id": d, "hardware_id": "hw", "tags": {}, "registered_at": now, "online": True,
                "deployment_seq": seq, "deployment_state": state, "desired_seq": seq,
                "running_sha256": running, "reported": _reported(d, seq, state, running)}
                for d, (_, running, seq, state) in zip(ids, map(kind, range(n)), strict=True)])  # fmt: skip
            c.execute(insert(Rollout.__table__), [{  # type: ignore[attr-defined]
                "id": "r", "model_id": 1, "model_ref": "m:1", "model_sha256": SHA, "selector": {},
                "stages": [10, 20, 100], "soak_seconds": 0, "device_timeout_seconds": 3600,
                "max_error_rate": 0.05, "min_inferences": 20, "max_failure_rate": 0.2, "state": "running",
                "current_stage": 1, "stage_unit": "percent", "policy": {}, "approved_through": -1,
                "rollback_requested": False, "created_at": now, "updated_at": now}])  # fmt: skip
            c.execute(insert(RolloutDevice.__table__), [{  # type: ignore[attr-defined]
                "rollout_id": "r", "device_id": d, "order_key": assignment_order("r", d),
                "stage": (0 if i < done else 1) if i < flight else None, "state": kind(i)[0],
                "seq": 2 if i < flight else None, "notified_at": now if i < flight else None,
                "attempts": 1, "updated_at": now} for i, d in enumerate(ids)])  # fmt: skip
            c.execute(insert(ModelAggregate.__table__), [{  # type: ignore[attr-defined]
                "device_id": d, "sha256": kind(i)[1], "served_ok": 100, "inferences": 100, "errors": 1}
                for i, d in enumerate(ids)])  # fmt: skip
            c.execute(insert(EventRow.__table__), [{  # type: ignore[attr-defined]
                "device_id": d, "seq": seq, "state": state, "ts": now, "received_at": now}
                for i, d in enumerate(ids) for seq in (1, 2) if seq == 1 or i < flight
                for state in (("downloading",) if seq == 2 and i >= done else
                              ("downloading", "verifying", "serving"))])  # fmt: skip
        sent: list[str] = []
        ticker = Ticker(settings, engine, lambda d, _p: sent.append(d), generate_keypair(), threading.Lock())
        ticker.tick(now)
        idle, cpu = [], []
        for k in range(repeats):
            t, c0 = time.perf_counter(), time.process_time()
            ticker.tick(now + timedelta(seconds=k + 1))
            idle.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        engine.dispose()
        ms = statistics.median(idle)
        return {
            "bench": f"ticker tick (store + decide + write), {n:,} devices, second stage -> {name}",
            "baseline": "budget",
            "baseline_ms": 100.0,
            "edgefleet_ms": round(ms, 1),
            "ratio": round(ms / 100.0, 3),
            "target": "info (decide row is the target)",
            "cpu_ms": round(statistics.median(cpu), 1),
            "notified": len(sent),
        }

    return _on_each_store(one)[0]


LIST_SELECTOR = "hw=rpi4,site=lab"


def _device_list_ms(database_url: str | None, data_dir: Path, n: int, repeats: int) -> dict[str, float]:
    """Median ms of the filtered first page, the unfiltered first page (HTTP), and the filtered
    query as bare SQL, on a server holding ``n`` devices."""
    import httpx
    from sqlalchemy import insert, text

    from fleet_server.models import Device, utcnow
    from fleet_server.runner import ServerThread
    from fleet_server.settings import ServerSettings
    from signing.keyring import init_keys

    init_keys(data_dir / "keys")
    with start_secure_broker(data_dir / "mq") as broker:
        settings = ServerSettings(
            database_url=database_url, data_dir=data_dir, keys_dir=data_dir / "keys",
            **server_mqtt_settings(broker.info), auth_required=False,
        )  # fmt: skip
        srv = ServerThread(settings).start()
        try:
            now = utcnow()
            with srv.context.engine.begin() as c:
                c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
                    "id": f"dev-{i:05d}", "hardware_id": ("rpi4", "jetson", "imx8")[i % 3],
                    "tags": {"site": ("lab", "berlin", "austin", "oslo")[i % 4], "line": str(i % 7)},
                    "registered_at": now, "online": i % 2 == 0} for i in range(n)])  # fmt: skip
            pg = srv.context.engine.dialect.name == "postgresql"
            tag = "tags ->> 'site' = 'lab'" if pg else "json_extract(tags, '$.site') = 'lab'"
            bare = text(f"SELECT * FROM device WHERE hardware_id = 'rpi4' AND {tag} ORDER BY id LIMIT 101")

            def timed(call: Any) -> float:
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t)
                return statistics.median(times) * 1e3

            with httpx.Client(base_url=srv.url, timeout=30) as http:
                first = http.get("/api/v1/devices", params={"limit": 100, "selector": LIST_SELECTOR}).json()
                assert len(first["items"]) == 100 and first["next"], "the bench fleet has > 100 matches"

                def filtered() -> None:
                    http.get(
                        "/api/v1/devices", params={"limit": 100, "selector": LIST_SELECTOR}
                    ).raise_for_status()

                def unfiltered() -> None:
                    http.get("/api/v1/devices", params={"limit": 100}).raise_for_status()

                def sql() -> None:
                    with srv.context.engine.connect() as c:
                        c.execute(bare).all()

                filtered_ms, unfiltered_ms, sql_ms = timed(filtered), timed(unfiltered), timed(sql)
        finally:
            srv.stop()
            srv.context.engine.dispose()
    return {"filtered": filtered_ms, "unfiltered": unfiltered_ms, "sql": sql_ms}


def _on_each_store(
    run: Callable[[str, str | None, Path], dict[str, object]],
) -> tuple[list[dict[str, object]], bool]:
    """``run(name, database_url, directory)`` on SQLite and, where it is reachable, on a fresh
    PostgreSQL database (dropped afterwards); the rows, and whether PostgreSQL was there."""
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        targets: list[tuple[str, str | None]] = [("SQLite", None)]
        pg = _pg_database()
        if pg is not None:
            targets.append(("PostgreSQL", pg[0]))
        try:
            for name, url in targets:
                rows.append(run(name, url, Path(tmp) / name))
        finally:
            if pg is not None:
                pg[1]()
    return rows, pg is not None


def bench_device_list(n: int = 10_000, repeats: int = 30) -> list[dict[str, object]]:
    def one(name: str, url: str | None, where: Path) -> dict[str, object]:
        ms = _device_list_ms(url, where, n, repeats)
        return {
            "bench": f"GET /devices?limit=100&selector={LIST_SELECTOR}, {n:,} devices -> {name}",
            "baseline": "unfiltered first page (limit=100), same server",
            "baseline_ms": round(ms["unfiltered"], 2),
            "edgefleet_ms": round(ms["filtered"], 2),
            "ratio": round(ms["filtered"] / ms["unfiltered"], 3),
            "target": "<= 2.0 (a filter costs at most one more page)",
            "bare_sql_ms": round(ms["sql"], 2),
        }

    rows, had_pg = _on_each_store(one)
    if not had_pg:
        rows.append(
            {"bench": "device list -> PostgreSQL", "baseline": "skipped: no PostgreSQL", "ratio": None}
        )
    return rows


def _old_create_rollout(session: Any, body: Any) -> Any:
    """Rollout creation as the server did it before (the baseline): every device loaded as an ORM
    object and tested in Python (twice: once for the deltas' bases, once for the targets), the
    busy check as an IN list of every targeted id, and one ORM object per rollout device."""
    import uuid as _uuid

    from sqlmodel import select

    from fleet_server import deltas, policy
    from fleet_server.engine import assignment_order
    from fleet_server.models import Device, Model, Rollout, RolloutDecision, RolloutDevice, utcnow
    from fleet_server.rollouts import busy_devices
    from fleet_server.selector import matches

    name, version = body.model.split(":", 1)
    model = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    selector = body.selector.model_dump()
    running = {
        d.running_sha256
        for d in session.exec(select(Device)).all()
        if matches(d, selector, model.hardware_ids)
    }
    deltas._stored(session, model, running)
    targeted = [d for d in session.exec(select(Device)).all() if matches(d, selector, model.hardware_ids)]
    busy = busy_devices(session, [d.id for d in targeted])
    assert not busy
    now = utcnow()
    rollout = Rollout(
        id=_uuid.uuid4().hex[:12], model_id=model.id, model_ref=f"{model.name}:{model.version}",
        model_sha256=model.sha256, selector=selector, stages=list(body.stages), stage_unit=body.stage_unit,
        **policy.to_row(body.policy()), created_at=now, updated_at=now,
    )  # fmt: skip
    session.add(rollout)
    session.flush()
    for d in targeted:
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=d.id,
                order_key=assignment_order(rollout.id, d.id),
                updated_at=now,
            )
        )
    session.add(RolloutDecision(rollout_id=rollout.id, ts=now, action="created", reason="", figures={}))
    session.commit()
    return rollout


def _rollout_create_s(database_url: str | None, data_dir: Path, n: int, repeats: int) -> dict[str, float]:
    """Median seconds to create an n-device rollout: ``POST /api/v1/rollouts`` over HTTP (the status
    it answers included), the same creation in process without HTTP, and the old ORM path in process.
    The engine's ticker is stopped: these rows time the creation alone."""
    import httpx
    from sqlalchemy import insert, text

    from fleet_server.models import Device, Model, utcnow
    from fleet_server.rollouts import create_rollout, rollout_status
    from fleet_server.runner import ServerThread
    from fleet_server.schemas import RolloutIn
    from fleet_server.settings import ServerSettings
    from fleet_server.store import new_session
    from signing.keyring import init_keys

    init_keys(data_dir / "keys")
    request = {
        "model": "m:1",
        "selector": {"hardware_id": "rpi4"},
        "stages": [1, 10, 50, 100],
        "soak_seconds": 0,
    }
    body = RolloutIn.model_validate(request)
    with start_secure_broker(data_dir / "mq") as broker:
        settings = ServerSettings(
            database_url=database_url, data_dir=data_dir, keys_dir=data_dir / "keys",
            **server_mqtt_settings(broker.info), auth_required=False,
        )  # fmt: skip
        srv = ServerThread(settings).start()
        try:
            if srv.context.ticker is not None:
                srv.context.ticker.stop()
            now = utcnow()
            with srv.context.engine.begin() as c:
                c.execute(insert(Model.__table__), [{  # type: ignore[attr-defined]
                    "id": 1, "name": "m", "version": "1", "release": 1, "target": "arm64-cpu",
                    "hardware_ids": ["rpi4"], "sha256": SHA, "length": 1, "manifest": {},
                    "storage_path": str(data_dir / "none"), "created_at": now}])  # fmt: skip
                c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
                    "id": f"dev-{i:05d}", "hardware_id": "rpi4", "tags": {"site": "lab"},
                    "registered_at": now, "online": True, "running_sha256": OLD, "agent_version": "0.1.0",
                    "reported": {"capabilities": {"runtimes": {"onnxruntime": "1"}}, "served_ok": {OLD: 5}},
                    } for i in range(n)])  # fmt: skip

            def forget() -> None:
                with srv.context.engine.begin() as c:
                    for table in ("rolloutdecision", "rolloutdevice", "rollout"):
                        c.execute(text(f"DELETE FROM {table}"))

            def old() -> None:
                with new_session(srv.context.engine) as session:
                    rollout_status(session, _old_create_rollout(session, body))

            def new() -> None:
                with new_session(srv.context.engine) as session:
                    rollout = create_rollout(session, body)
                    session.commit()
                    rollout_status(session, rollout)

            times: dict[str, list[float]] = {"old": [], "new": [], "http": []}
            with httpx.Client(base_url=srv.url, timeout=600) as http:

                def post() -> None:
                    resp = http.post("/api/v1/rollouts", json=request)
                    assert resp.status_code == 201, resp.text
                    assert len(resp.json()["devices"]) == n

                for _ in range(repeats):  # interleaved: the machine's load drifts
                    for name, call in (("old", old), ("new", new), ("http", post)):
                        t = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - t)
                        forget()
        finally:
            srv.stop()
            srv.context.engine.dispose()
    return {k: statistics.median(v) for k, v in times.items()}


def bench_rollout_create(n: int = 10_000, repeats: int = 3) -> list[dict[str, object]]:
    """Creating a rollout of ``n`` registered devices, against the way it was created before."""

    def one(name: str, url: str | None, where: Path) -> dict[str, object]:
        s = _rollout_create_s(url, where, n, repeats)
        return {
            "bench": f"create a {n:,}-device rollout -> {name}",
            "baseline": "ORM per device (the code before), in process",
            "baseline_s": round(s["old"], 3),
            "edgefleet_s": round(s["new"], 3),
            "ratio": round(s["new"] / s["old"], 3),
            "target": "info (the harness gave it 10 s)",
            "http_post_s": round(s["http"], 3),
        }

    return _on_each_store(one)[0]


def _old_store(engine: Any, items: Any, counters: Any) -> list[Any]:
    """``fleet_server.ingest._store`` as it was before (the baseline): every sender of an event or a
    snapshot loaded as a full ``Device`` ORM row, one ORM ``EventRow`` per event, ``session.add``
    of the device per message, and one ``session.get`` per served model hash of a snapshot."""
    from sqlalchemy import or_, update
    from sqlmodel import col, select

    from fleet_server import reconcile
    from fleet_server.counters import Counters
    from fleet_server.ingest import (
        LAST_SEEN_RESOLUTION,
        _clock_offset,
        _reported_view,
        _sqlite_writer,
    )
    from fleet_server.models import Device, EventRow, ModelAggregate, utcnow
    from fleet_server.store import new_session
    from fleet_server.telemetry_store import SHA256_RE, prepare, store_prepared

    def aggregate(session: Any, device_id: str, sha: str) -> Any:
        cache: dict[tuple[str, str], Any] = session.info.setdefault("aggregates", {})
        key = (device_id, sha)
        agg = cache.get(key) or session.get(ModelAggregate, key)
        if agg is None:
            agg = ModelAggregate(device_id=device_id, sha256=sha)
            session.add(agg)
        cache[key] = agg
        return agg

    def apply_reported(session: Any, device: Any, msg: Any, now: datetime) -> None:
        device.reported = msg.model_dump(mode="json")
        device.online = True
        device.agent_version = msg.agent_version
        device.deployment_state = msg.deployment_state.value
        device.deployment_seq = msg.deployment_seq
        running = msg.running
        device.running_sha256 = running.sha256 if running else None
        device.running_name = running.name if running else None
        device.running_version = running.version if running else None
        for sha, served in msg.served_ok.items():
            if not SHA256_RE.match(sha):
                continue
            agg = aggregate(session, device.id, sha)
            agg.served_ok = max(agg.served_ok, served)
            agg.updated_at = now
            session.add(agg)

    pending = Counters()
    observed: list[Any] = []
    telemetry = [msg for _, msg, _ in items if isinstance(msg, protocol.TelemetryBatch)]
    prepared = prepare(engine.dialect.name, telemetry) if telemetry else None
    with _sqlite_writer(engine), new_session(engine) as session:
        now = utcnow()
        ids = sorted({device_id for device_id, _, _ in items})
        conn = session.connection()
        conn.execute(
            update(Device)
            .where(col(Device.id).in_(ids))
            .where(or_(col(Device.last_seen).is_(None), col(Device.last_seen) < now - LAST_SEEN_RESOLUTION))
            .values(last_seen=now)
        )
        snapshot_ids = sorted({d for d, msg, _ in items if not isinstance(msg, protocol.TelemetryBatch)})
        devices: dict[str, Any] = {}
        if snapshot_ids:
            devices = {
                d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(snapshot_ids))).all()
            }
        query = select(col(Device.id), col(Device.hardware_id)).where(col(Device.id).in_(ids))
        hardware: dict[str, str] = {device_id: hw for device_id, hw in conn.execute(query)}
        known = set(devices) | set(hardware)
        registered_telemetry = 0
        for device_id, msg, inbound in items:
            if device_id not in known:
                pending.add("unregistered_messages")
                continue
            if isinstance(msg, protocol.TelemetryBatch):
                registered_telemetry += 1
                continue
            device = devices[device_id]
            received = datetime.fromtimestamp(inbound.received_at, UTC) if inbound.received_at else now
            if isinstance(msg, protocol.Reported):
                apply_reported(session, device, msg, now)
                _clock_offset(device, msg.ts, received, inbound)
                pending.add("reported")
                if not inbound.retain:
                    observed.append(reconcile.Observation(device_id, device.desired_seq, _reported_view(msg)))
            elif isinstance(msg, protocol.Event):
                session.add(
                    EventRow(
                        device_id=msg.device_id, seq=msg.seq, state=msg.state.value, reason=msg.reason,
                        detail=(msg.detail or None) and msg.detail[:2000], model_sha256=msg.model_sha256,
                        ts=msg.ts, received_at=received, bytes_fetched=msg.bytes_fetched,
                    )
                )  # fmt: skip
                pending.add("events")
            else:
                device.online = msg.state == "online"
                if device.online:
                    _clock_offset(device, msg.ts, received, inbound)
                pending.add("status")
            session.add(device)
        session.flush()
        stored = store_prepared(session, prepared, now, hardware) if prepared is not None else 0
        pending.add("telemetry_batches", stored)
        pending.add("duplicate_batches", registered_telemetry - stored)
        session.commit()
    for name, value in pending.snapshot().items():
        if value:
            counters.add(name, value)
    return observed


ROLLOUT_EVENTS = ("downloading", "verifying", "swapping", "serving")


def _rollout_messages(devices: list[str], events: int) -> list[Any]:
    """What a stage of a rollout sends: each device's deployment events in turn, and after every
    fourth event the sender's reported snapshot (each device reports once per four events)."""
    from fleet_server.ingest import Inbound

    base = time.time()
    out: list[Any] = []
    k = 0
    while k < events:
        step, i = divmod(k, len(devices))
        d = devices[i]
        state = ROLLOUT_EVENTS[step % len(ROLLOUT_EVENTS)]
        event = protocol.Event(
            device_id=d, seq=2, state=protocol.DeploymentState(state), model_sha256=SHA,
            bytes_fetched=4_000_000 if state == "verifying" else None, ts=NOW, event_id=f"{d}-{k}",
        )  # fmt: skip
        received = base + len(out) * 1e-4
        out.append(Inbound(protocol.topic(d, protocol.Channel.EVENTS), protocol.encode(event), received))
        if (i + step) % 4 == 3:
            snap = _reported(d, 2, state, SHA)
            snap["ts"] = datetime.fromtimestamp(received, UTC).isoformat()
            payload = json.dumps(snap).encode()
            out.append(Inbound(protocol.topic(d, protocol.Channel.REPORTED), payload, received))
        k += 1
    return out


def _pg_backends_cpu(engine: Any) -> float:
    """CPU-seconds (user + system) the PostgreSQL backends of this database have used so far, read
    from /proc (the server runs on this machine); 0 when they cannot be read."""
    from sqlalchemy import text

    with engine.connect() as c:
        pids = [
            r[0]
            for r in c.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))
        ]
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _event_ingest_cpu(
    database_url: str | None, data_dir: Path, devices: int, events: int, repeats: int
) -> dict[str, Any]:
    """CPU-seconds of this process (and, on PostgreSQL, of its backends) to store a rollout's
    events and snapshots through ``ingest_batch`` in flushes of the pipeline's size, the old
    ``_store`` and the new one interleaved on the same database, reset between runs."""
    from unittest import mock

    from sqlalchemy import func, insert, select, text

    from fleet_server import ingest
    from fleet_server.counters import Counters
    from fleet_server.models import Device, EventRow, utcnow
    from fleet_server.settings import ServerSettings
    from fleet_server.store import make_engine

    settings = ServerSettings(database_url=database_url, data_dir=data_dir)
    engine = make_engine(settings)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    now = utcnow()
    with engine.begin() as c:
        c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
            "id": d, "hardware_id": "hw", "tags": {}, "registered_at": now, "online": True,
            "deployment_seq": 1, "deployment_state": "serving", "desired_seq": 2,
            "running_sha256": OLD, "reported": _reported(d, 1, "serving", OLD)} for d in ids])  # fmt: skip
    messages = _rollout_messages(ids, events)
    batch = settings.ingest_max_batch
    pg = engine.dialect.name == "postgresql"

    def reset() -> None:
        with engine.begin() as c:
            c.execute(text("DELETE FROM eventrow"))
            c.execute(text("DELETE FROM modelaggregate"))
            c.execute(text("UPDATE device SET last_seen = NULL"))

    def once(old: bool) -> tuple[float, float, float, Counters]:
        counters = Counters()
        patch = mock.patch.object(ingest, "_store", _old_store) if old else contextlib.nullcontext()
        with patch:
            backend0 = _pg_backends_cpu(engine) if pg else 0.0
            t, c0 = time.perf_counter(), time.process_time()
            for k in range(0, len(messages), batch):
                ingest.ingest_batch(engine, messages[k : k + batch], counters)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t
            backend = _pg_backends_cpu(engine) - backend0 if pg else 0.0
        with engine.connect() as c:
            stored = c.execute(select(func.count()).select_from(EventRow)).scalar_one()
        got = counters.snapshot()
        if stored != events or got["events"] != events or got["reported"] != len(messages) - events:
            raise AssertionError(f"{stored} event rows stored of {events} sent; counted {got}")
        reset()
        return cpu, wall, backend, counters

    runs: dict[str, list[tuple[float, float, float]]] = {"old": [], "new": []}
    load0 = os.getloadavg()[0]
    once(False)  # warm-up: statement caches, the first connections
    for _ in range(repeats):  # interleaved: the machine's load drifts
        for name in ("old", "new"):
            cpu, wall, backend, _counters = once(name == "old")
            runs[name].append((cpu, wall, backend))
    engine.dispose()

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in runs[name])

    return {
        "messages": len(messages),
        "load": f"{load0:.1f}->{os.getloadavg()[0]:.1f}",
        **{f"{n}_{what}": med(n, i) for n in runs for i, what in enumerate(("cpu", "wall", "backend"))},
    }


def bench_event_ingest(
    devices: int = 5_000, events: int = 20_000, repeats: int = 3
) -> list[dict[str, object]]:
    """Server CPU to store a rollout stage's deployment events (and one reported snapshot per four
    events), against the ORM path stored them with before."""

    def one(name: str, url: str | None, where: Path) -> dict[str, object]:
        m = _event_ingest_cpu(url, where, devices, events, repeats)
        row: dict[str, object] = {
            "bench": f"store {events:,} events + {m['messages'] - events:,} snapshots of {devices:,} devices"
            f" -> {name} (CPU)",
            "baseline": "ORM rows per event and per sender (the code before)",
            "baseline_s": round(m["old_cpu"], 2),
            "edgefleet_s": round(m["new_cpu"], 2),
            "ratio": round(m["new_cpu"] / m["old_cpu"], 3),
            "target": "info (CPU per stored message)",
            "us_per_message": "->".join(f"{m[k] / m['messages'] * 1e6:.0f}" for k in ("old_cpu", "new_cpu")),
            "wall_s": f"{m['old_wall']:.2f}->{m['new_wall']:.2f}",
            "load_1m": m["load"],
        }
        if m["old_backend"]:
            row["pg_backend_cpu_s"] = f"{m['old_backend']:.2f}->{m['new_backend']:.2f}"
        return row

    return _on_each_store(one)[0]


def run(duration: float = 60.0) -> list[dict[str, object]]:
    return (
        bench_engine()
        + bench_ticker()
        + bench_rollout_create()
        + bench_event_ingest()
        + bench_device_list()
        + bench_ingest(duration)
    )


if __name__ == "__main__":
    import sys

    for row in run(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0):
        print(row)
