"""Label ingest into PostgreSQL through ``POST /api/v1/labels`` against bare inserts of the same rows.

The server (``ServerThread``, real HTTP, PostgreSQL) takes ``n`` labels in batches of 7,000
(about 0.9 MB each, under the 1 MiB body limit), each item judged, stored idempotently
(``COPY`` in a savepoint, ``ON CONFLICT DO NOTHING`` when a key exists) and looked up
against the captures, with a per-item answer. The bodies are encoded before the clock
starts, so the figure is the server's. The baselines, in the same run and the same
database: the same rows by ``COPY`` into a bare copy of the table (the fastest way in),
and by psycopg's ``executemany`` (pipelined). Target: >= 50,000 labels/s through the API;
the ratio is against ``COPY``.

PostgreSQL is taken from ``EDGEFLEET_BENCH_PG`` (as ``bench.server``); without it the row says so.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.server import _pg_database
from edgefleet.broker import server_mqtt_settings, start_secure_broker

BATCH = 7_000  # ~130 bytes a label with its time: ~0.9 MB, under the 1 MiB body limit


def _uuid7(ms: int) -> str:
    """A UUIDv7 text at ``ms``, as devices mint them (time-ordered: the primary key grows at its end)."""
    r = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((r >> 62) & 0xFFF) << 64 | (0b10 << 62) | (r & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def _labels(n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    start = int(now.timestamp() * 1000) - n
    iso = now.isoformat()
    return [
        {"inference_id": _uuid7(start + i), "label": i % 10, "label_time": iso, "source": "bench"}
        for i in range(n)
    ]


def _bare(url: str, labels: list[dict[str, Any]]) -> dict[str, float]:
    """Labels/s of COPY and of executemany of the same rows into bare copies of the label table."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    rows = [
        (x["inference_id"], x["source"], json.dumps(x["label"]), x["label_time"], x["label_time"])
        for x in labels
    ]
    out: dict[str, float] = {}
    with psycopg.connect(dsn) as conn:
        for how in ("copy", "executemany"):
            table = f"label_{how}"
            conn.execute(f"CREATE TABLE {table} (LIKE label INCLUDING ALL)")
            conn.commit()
            start = time.perf_counter()
            with conn.cursor() as cur:
                if how == "copy":
                    cols = "inference_id, source, label, label_time, received_at"
                    with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                        for r in rows:
                            copy.write_row(r)
                else:
                    cur.executemany(
                        f"INSERT INTO {table} (inference_id, source, label, label_time, received_at)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        rows,
                    )
            conn.commit()
            out[how] = len(rows) / (time.perf_counter() - start)
    return out


def bench_label_ingest(n: int = 200_000, clients: int = 2) -> list[dict[str, object]]:
    import httpx

    from fleet_server.runner import ServerThread
    from fleet_server.settings import ServerSettings
    from signing.keyring import init_keys

    pg = _pg_database()
    if pg is None:
        return [{"bench": "label ingest -> PostgreSQL", "baseline": "skipped: no PostgreSQL", "ratio": None}]
    url, drop = pg
    labels = _labels(n)
    bodies = [
        json.dumps({"labels": labels[i : i + BATCH]}, separators=(",", ":")).encode()
        for i in range(0, n, BATCH)
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp, start_secure_broker(Path(tmp) / "mq") as broker:
            data = Path(tmp)
            init_keys(data / "keys")
            settings = ServerSettings(
                database_url=url, data_dir=data, keys_dir=data / "keys",
                **server_mqtt_settings(broker.info), auth_required=False,
            )  # fmt: skip
            srv = ServerThread(settings).start()
            try:
                with httpx.Client(base_url=srv.url, timeout=60) as http:
                    warm = json.dumps({"labels": _labels(100)}).encode()
                    http.post("/api/v1/labels", content=warm, headers={"Content-Type": "application/json"})

                    def send(body: bytes) -> int:
                        r = http.post(
                            "/api/v1/labels", content=body, headers={"Content-Type": "application/json"}
                        )
                        r.raise_for_status()
                        return int(r.json()["counts"]["accepted"])

                    start = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        accepted = sum(pool.map(send, bodies))
                    api_rate = n / (time.perf_counter() - start)
                assert accepted == n, f"{accepted} of {n} labels accepted"
                bare = _bare(url, labels)
            finally:
                srv.stop()
                srv.context.engine.dispose()
    finally:
        drop()
    return [
        {
            "bench": f"label ingest, POST /api/v1/labels ({n:,} labels, batches of {BATCH:,}) -> PostgreSQL",
            "baseline": "bare COPY of the same rows, same database",
            "baseline_us": round(1e6 / bare["copy"], 2),
            "edgefleet_us": round(1e6 / api_rate, 2),
            "ratio": round(api_rate / bare["copy"], 3),
            "target": ">= 50,000 labels/s",
            "rate_api": round(api_rate),
            "rate_copy": round(bare["copy"]),
            "rate_executemany": round(bare["executemany"]),
            "ratio_vs_executemany": round(api_rate / bare["executemany"], 3),
            "http_clients": clients,
        }
    ]


def run() -> list[dict[str, object]]:
    return bench_label_ingest()


if __name__ == "__main__":
    for row in run():
        print(row)
