"""SLO figures at fleet scale: a /metrics scrape at 10,000 devices (time and series) and the cost of
one SLO evaluation pass (sample, evaluate, step alerts, store) at 10,000 devices and 20 SLOs."""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert

LATENCY = [0] * 10 + [50, 30, 10, 5, 3, 2]
HARDWARE = ("rpi4", "jetson", "x86", "imx8")


def _fleet(n: int, slos: int) -> tuple[Any, Any]:
    """A SQLite store with ``n`` devices on 4 cohorts running 3 versions of 5 models, and ``slos`` SLOs."""
    from fleet_server.models import Device, Model, ModelAggregate, Slo, utcnow
    from fleet_server.settings import ServerSettings
    from fleet_server.slo.spec import spec_as_dict, spec_from
    from fleet_server.store import make_engine

    tmp = tempfile.mkdtemp(prefix="ef-slo-bench-")
    settings = ServerSettings(data_dir=Path(tmp))
    engine = make_engine(settings)
    now = utcnow()
    models = [(f"m{m}", str(v), f"{m:02d}{v:02d}".ljust(64, "a")) for m in range(5) for v in (1, 2, 3)]
    with engine.begin() as c:
        c.execute(insert(Model.__table__), [{  # type: ignore[attr-defined]
            "name": name, "version": v, "release": int(v), "target": "arm64-cpu", "hardware_ids": [],
            "sha256": sha, "length": 1, "manifest": {}, "storage_path": "/x", "created_at": now}
            for name, v, sha in models])  # fmt: skip
        c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
            "id": f"d{i:05d}", "hardware_id": HARDWARE[i % 4], "tags": {}, "registered_at": now,
            "online": i % 7 != 0, "deployment_seq": 1, "desired_seq": 1, "running_sha256": models[i % 15][2],
            "deployment_state": "running"} for i in range(n)])  # fmt: skip
        c.execute(insert(ModelAggregate.__table__), [{  # type: ignore[attr-defined]
            "device_id": f"d{i:05d}", "sha256": models[i % 15][2], "served_ok": 1, "inferences": 1000,
            "errors": i % 5, "latency_buckets": LATENCY, "output_hist": [0, 10, 20, 10], "class_hist": {},
            "shadow_samples": 0, "shadow_agree": 0, "labels": 10, "labels_correct": 9, "confusion": {},
            "label_delay_buckets": [], "label_abs_error_sum": 0.0, "requests": 1000,
            "request_errors": {"timeout": 1},
            "input_checks": {"x": [10, 0, 1, 0]}, "cpu_ms": 12.5, "captured": 0, "updated_at": now,
            "input_buckets": {"x": [1, 2, 5, 10, 20, 20, 20, 10, 5, 2, 1, 4]}}
            for i in range(n)])  # fmt: skip
        for k in range(slos):
            objectives: list[dict[str, Any]] = [{"sli": "availability", "target": 0.995}]
            if k % 2:
                objectives.append({"sli": "latency_p99", "threshold": 5})
            spec = spec_from(
                {"name": f"s{k}", "model": f"m{k % 5}", "hardware_id": HARDWARE[k % 4] if k >= 5 else None,
                 "objectives": objectives}
            )  # fmt: skip
            c.execute(insert(Slo.__table__), [{  # type: ignore[attr-defined]
                "name": spec.name, "model": spec.model, "hardware_id": spec.hardware_id,
                "spec": spec_as_dict(spec), "created_at": now, "created_by": "bench"}])  # fmt: skip
    return settings, engine


def bench_slo(n: int = 10_000, slos: int = 20, passes: int = 30) -> list[dict[str, object]]:
    from fleet_server.context import ServerContext
    from fleet_server.metrics import exposition, make_registry
    from fleet_server.models import utcnow
    from fleet_server.slo_runner import SloRunner

    settings, engine = _fleet(n, slos)
    runner = SloRunner(engine, settings, lambda: True)
    start = utcnow()
    costs = []
    for k in range(passes):  # a pass a minute of simulated time, samples piling up as in a server
        t = time.perf_counter()
        runner.evaluator.run(start + timedelta(minutes=k))
        costs.append((time.perf_counter() - t) * 1e3)
    context = ServerContext(settings=settings, engine=engine, trust=None)  # type: ignore[arg-type]  # unused here
    context.slo = runner  # the collector reads its last pass; no ticker: this process counts as leader
    registry = make_registry(context)
    scrapes, body = [], b""
    for _ in range(20):
        t = time.perf_counter()
        body = exposition(registry)
        scrapes.append((time.perf_counter() - t) * 1e3)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    engine.dispose()
    http_ms = _http_scrape_ms(settings)
    scrape_ms, eval_ms = statistics.median(scrapes), statistics.median(costs[1:])
    return [
        {
            "bench": f"GET /metrics over HTTP, {n:,} devices, {slos} SLOs (a running server, SQLite)",
            "baseline": "budget",
            "baseline_ms": 200.0,
            "edgefleet_ms": round(http_ms, 1),
            "ratio": round(http_ms / 200.0, 3),
            "target": "<= 1 (200 ms)",
        },
        {
            "bench": f"/metrics body at {n:,} devices, {slos} SLOs (SQLite; no HTTP)",
            "baseline": "budget",
            "baseline_ms": 200.0,
            "edgefleet_ms": round(scrape_ms, 1),
            "ratio": round(scrape_ms / 200.0, 3),
            "target": "<= 1 (200 ms) and <= 2,000 series",
            "series": series,
        },
        {
            "bench": f"SLO pass (sample, evaluate, alerts, store), {n:,} devices, {slos} SLOs, SQLite",
            "baseline": "budget: one engine tick",
            "baseline_ms": 1000.0,
            "edgefleet_ms": round(eval_ms, 1),
            "ratio": round(eval_ms / 1000.0, 3),
            "target": "<= 1 (runs once a minute on its own thread)",
            "first_pass_ms": round(costs[0], 1),
            "max_ms": round(max(costs), 1),
        },
    ]


def _http_scrape_ms(settings: Any, repeats: int = 20) -> float:
    """A real server on the same store (no broker: its MQTT client keeps retrying, the API serves)."""
    import httpx

    from fleet_server.runner import ServerThread
    from signing.keyring import init_keys

    keys = Path(settings.data_dir) / "keys"
    init_keys(keys)
    server = ServerThread(settings.model_copy(update={"keys_dir": keys, "mqtt_port": 1}), port=0).start()
    try:
        assert server.context.slo is not None
        deadline = time.monotonic() + 60
        while server.context.slo.evaluator.last.at == 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # its own first SLO pass, a second after start
        times = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(repeats):
                t = time.perf_counter()
                client.get("/metrics").raise_for_status()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    finally:
        server.stop()


def bench_detection() -> list[dict[str, object]]:
    """The measured cases under a fast-forward clock (bench/slo_drill.py), a 99.5% availability SLO."""
    from bench.slo_drill import drill
    from fleet_server.slo.spec import WORKBOOK_RULES, Objective, Severity, Sli, SloSpec

    avail = (Objective(Sli.AVAILABILITY, 0.995),)
    defaults = SloSpec("a", "m", None, avail)  # the fast page tier, then the workbook's three
    workbook = SloSpec("a", "m", None, avail, WORKBOOK_RULES)
    day = 86400.0

    def jump(t: float) -> float:
        return 0.1 if t >= 0 else 0.001

    def pages(r: Any) -> int:
        return sum(1 for _, n in r.notifications if n.alert.key.severity == Severity.PAGE)

    rows: list[dict[str, object]] = []
    for name, spec in (("defaults (fast tier + workbook)", defaults), ("workbook rules only", workbook)):
        r = drill(spec, jump, duration_s=7200, step_s=30, warmup_s=day)
        paged = r.first("firing", "page")
        rows.append(
            {
                "bench": f"10% errors on a 99.5% SLO -> page, {name}, 20 inferences/s",
                "baseline": "target",
                "baseline_s": 300.0,
                "edgefleet_s": paged,
                "ratio": round(paged / 300.0, 2) if paged is not None else None,
                "target": "<= 1 (page within 5 min)",
            }
        )
    quiet = drill(
        defaults, lambda t: 0.1 if 0 <= t < 600 else 0.001, duration_s=7200, step_s=30, rate=3, warmup_s=day
    )
    rows.append(
        {
            "bench": "10 min of 10% errors at 3 inferences/s (under the fast tier's 300 a minute), defaults",
            "baseline": "-",
            "ratio": None,
            "target": "0 pages (min-events guard)",
            "pages": pages(quiet),
        }
    )
    slow = drill(
        defaults,
        lambda t: 0.01 if t >= 0 else 0.001,
        duration_s=4 * day,
        step_s=300,
        rate=5,
        warmup_s=3 * day,
    )
    ticket = slow.first("firing", "ticket")
    rows.append(
        {
            "bench": "2x slow burn (1% errors, 5 inferences/s: fast tier armed) -> ticket, no page, defaults",
            "baseline": "-",
            "ratio": None,
            "ticket_after_h": round(ticket / 3600, 1) if ticket is not None else None,
            "target": "a ticket, 0 pages",
            "pages": pages(slow),
        }
    )
    for rate in (2.0, 20.0):
        t = time.perf_counter()
        steady = drill(defaults, lambda t: 0.005, duration_s=28 * day, step_s=60, rate=rate)
        rows.append(
            {
                "bench": f"28 days steady at the SLO (0.5% errors, {rate:g}/s, binomial), defaults",
                "baseline": "-",
                "ratio": None,
                "target": "0 pages",
                "pages": pages(steady),
                "tickets": sum(1 for _, n in steady.notifications if n.status == "firing"),
                "budget_left": round(steady.budget_remaining, 3),
                "drill_s": round(time.perf_counter() - t, 1),
            }
        )
    return rows


def run() -> list[dict[str, object]]:
    return bench_detection() + bench_slo()


if __name__ == "__main__":
    for row in run():
        print(row)
