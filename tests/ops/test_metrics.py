"""/metrics (bounded cardinality), /healthz and /readyz, and the JSON request log, on a real server."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from device_agent.protocol import INPUT_BUCKETS
from fleet_server.logs import JsonFormatter
from fleet_server.metrics import MAX_MODEL_GROUPS, model_groups
from fleet_server.models import Device, ModelAggregate
from fleet_server.runner import ServerThread
from fleet_server.slo.series import Totals
from fleet_server.slo_store import VersionName
from signing.keyring import KeyDir
from tests.ops.test_slo_api import SLO
from tests.server.conftest import make_bundle, upload, wait_for

LATENCY = [0] * 10 + [50, 30, 10, 5, 3, 2]


def series(client: httpx.Client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return out


def add_devices(server: ServerThread, start: int, n: int, shas: list[str]) -> None:
    """Devices as the ingest leaves them: registered, some online, running a model, with totals."""
    with Session(server.context.engine) as session:
        for i in range(start, start + n):
            device_id = f"m-{i:05d}"
            sha = shas[i % len(shas)]
            session.add(
                Device(
                    id=device_id,
                    hardware_id=("rpi4", "jetson")[i % 2],
                    online=i % 3 != 0,
                    running_sha256=sha,
                    deployment_state=("running", "failed")[i % 5 == 0],
                )
            )
            session.add(
                ModelAggregate(
                    device_id=device_id,
                    sha256=sha,
                    inferences=1000,
                    errors=i % 7,
                    latency_buckets=LATENCY,
                    input_checks={"x": [100, 1, 2, 3], "y": [100, 0, 5, 0]},
                    input_buckets={"x": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]},  # y: no calibration range
                    # 15 classes predicted: past the debug bound of 10, the rest summed as other
                    class_hist={str(c): 100 + 10 * c for c in range(15)},
                    confusion={"3:3": 4, "3:5": 1, "5:5": 2, "14:3": 1},
                )
            )
        session.commit()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_metrics_series_do_not_grow_with_the_fleet(
    db: str,
    request: pytest.FixtureRequest,
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
) -> None:
    over = {} if db == "sqlite" else {"database_url": request.getfixturevalue("fresh_pg")}
    server = make_server(**over)
    client = httpx.Client(base_url=server.url, timeout=10)
    assert server.context.ticker is not None
    wait_for(lambda: server.context.ticker is not None and server.context.ticker.is_leader)
    key = keydir.key("release")
    shas = [
        upload(client, make_bundle(tmp_path, key, version=str(v), release=v, content=b"%d" % v * 500)).json()[
            "sha256"
        ]
        for v in (1, 2)
    ]
    assert client.post("/api/v1/slos", json=SLO).status_code == 201
    assert server.context.slo is not None
    evaluator = server.context.slo.evaluator
    t0 = datetime.now(UTC) + timedelta(minutes=1)
    add_devices(server, 0, 20, shas)
    evaluator.run(t0)
    # The SLO loop empties the evaluator's sample cache when it starts leading, about a second after
    # the server starts (here, or at any change of leader), and refills it at its next evaluation:
    # a scrape in between still shows the last evaluation's series.
    evaluator.reset()
    small = series(client)
    add_devices(server, 20, 400, shas)
    evaluator.run(t0 + timedelta(minutes=1))
    large = series(client)
    assert set(large) == set(small), set(large) ^ set(small)
    assert len(large) < 2000
    assert not [k for k in large if "m-0" in k]  # no device id anywhere
    # the figures themselves follow the fleet
    running_online = 'edgefleet_devices{"online": "true", "state": "running"}'
    assert large[running_online] > small[running_online]
    v1 = '{"cohort": "rpi4", "model": "det", "version": "1"}'
    assert large["edgefleet_model_inferences_total" + v1] == 1000 * 210  # the even of 420 devices: v1 on rpi4
    bucket = '{"cohort": "rpi4", "le": "+Inf", "model": "det", "version": "1"}'
    assert large["edgefleet_model_latency_seconds_bucket" + bucket] == 100 * 210
    checks = '{"cohort": "rpi4", "model": "det", "result": "missing", "version": "1"}'
    assert large["edgefleet_model_input_checks_total" + checks] == 7 * 210  # summed over the inputs
    slo = '{"cohort": "all", "model": "det", "sli": "availability", "slo": "det-avail"}'
    assert (
        large["edgefleet_slo_events_total" + slo] == 420_000 and large["edgefleet_slo_target" + slo] == 0.995
    )
    assert any(k.startswith("edgefleet_slo_burn_rate") and '"window": "1h"' in k for k in large)
    # per input and per class (the debug dashboard), bounded: 10 classes by name, the rest as other
    y = '{"cohort": "rpi4", "input": "y", "model": "det", "result": "missing", "version": "1"}'
    assert large["edgefleet_model_input_checks_by_input_total" + y] == 5 * 210
    # each input's values per bucket of its calibration range, summed over the devices
    x_buckets = {
        json.loads(k[k.index("{") :])["bucket"]: v
        for k, v in large.items()
        if k.startswith("edgefleet_model_input_bucket_total")
        and '"cohort": "rpi4"' in k
        and '"version": "1"' in k
        and '"input": "x"' in k
    }
    assert x_buckets == {b: (i + 1) * 210 for i, b in enumerate(INPUT_BUCKETS)}, x_buckets
    assert not [k for k in large if k.startswith("edgefleet_model_input_bucket") and '"input": "y"' in k]
    v1_classes = {
        json.loads(k[k.index("{") :])["class"]
        for k in large
        if k.startswith("edgefleet_model_class_total") and '"cohort": "rpi4"' in k and '"version": "1"' in k
    }
    assert v1_classes == {str(c) for c in range(5, 15)} | {"other"}, v1_classes
    cls = '{"class": "%s", "cohort": "rpi4", "kind": "%s", "model": "det", "version": "1"}'
    assert large["edgefleet_model_class_total" + cls % ("14", "predictions")] == 240 * 210
    assert (
        large["edgefleet_model_class_total" + cls % ("other", "predictions")]
        == (100 + 110 + 120 + 130 + 140) * 210
    )
    # class 3 is folded into other: its labels count there (truth 3: 5, predicted 3: 5, right: 4)
    assert large["edgefleet_model_class_total" + cls % ("other", "true")] == 5 * 210
    assert large["edgefleet_model_class_total" + cls % ("5", "correct")] == 2 * 210
    assert large["edgefleet_model_class_total" + cls % ("5", "predicted")] == 3 * 210


def test_healthz_and_readyz(server: ServerThread, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"] == {"ok": True, "detail": "sqlite", "required": True}
    assert checks["broker"]["ok"] and not checks["ingest_lag"]["required"]
    assert checks["leader"]["detail"] == "leader"
    assert server.context.bridge is not None
    server.context.bridge.client.disconnect()  # the broker connection is gone: not ready
    try:
        down = client.get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["broker"] == {
            "ok": False,
            "detail": "not connected",
            "required": True,
        }
    finally:
        server.context.bridge.client.reconnect()


def test_every_api_call_logs_one_json_line_with_its_request_id(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edgefleet.access"):
        given = client.get("/api/v1/devices", headers={"X-Request-ID": "trace-42"})
        made = client.get("/api/v1/nope")
        bad = client.get("/healthz", headers={"X-Request-ID": "no spaces allowed"})
        # the line is written once the answer has gone: the client may hold it a moment before
        wait_for(lambda: sum(r.name == "edgefleet.access" for r in caplog.records) >= 3, 5)
    assert given.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 32 and bad.headers["x-request-id"] != "no spaces allowed"
    # one line per call, written when its answer has gone (so not necessarily in the calls' order)
    found = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "edgefleet.access"]
    lines = sorted(found, key=lambda x: {"/api/v1/devices": 0, "/api/v1/nope": 1, "/healthz": 2}[x["path"]])
    assert [(x["path"], x["status"]) for x in lines] == [
        ("/api/v1/devices", 200),
        ("/api/v1/nope", 404),
        ("/healthz", 200),
    ]
    assert lines[0]["request_id"] == "trace-42" and lines[0]["method"] == "GET"
    assert lines[1]["request_id"] == made.headers["x-request-id"] and lines[0]["duration_ms"] >= 0


def test_model_groups_beyond_the_bound_are_summed_as_one() -> None:
    names = {f"{i:064d}": VersionName("m", str(i)) for i in range(MAX_MODEL_GROUPS + 10)}
    cohorts = {(sha, "rpi4"): Totals(inferences=1000 - i) for i, sha in enumerate(names)}
    groups = model_groups(cohorts, names)
    assert len(groups) == MAX_MODEL_GROUPS + 1
    assert groups[("other", "other", "other")].inferences == sum(
        1000 - i for i in range(MAX_MODEL_GROUPS, MAX_MODEL_GROUPS + 10)
    )
    assert ("m", "0", "rpi4") in groups  # the busiest kept by name


def test_a_metrics_token_guards_metrics(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(metrics_token="scrape-secret")
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/metrics").status_code == 401
        assert (
            c.get("/metrics", headers={"Authorization": "Bearer wrong"}).json()["detail"]["code"]
            == "unauthenticated"
        )
        ok = c.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert ok.status_code == 200 and "edgefleet_devices" in ok.text
        assert c.get("/healthz").status_code == 200  # health stays open


def test_the_server_log_config_writes_json_lines_with_the_request_id() -> None:
    """As `edgefleet server` configures logging (fleet_server.runner.main), in a process of its own."""
    script = """
import logging, logging.config, threading
from fleet_server.logs import request_id, uvicorn_log_config
logging.config.dictConfig(uvicorn_log_config("json"))
request_id.set("req-7")
logging.getLogger("fleet_server.x").warning("stored %d batches", 3)
t = threading.Thread(target=lambda: logging.getLogger("y").info("outside any call"))
t.start(); t.join()
logging.getLogger("uvicorn.access").warning("never: the access log is ours")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(x["logger"], x["msg"], x.get("request_id")) for x in lines] == [
        ("fleet_server.x", "stored 3 batches", "req-7"),
        ("y", "outside any call", None),
    ]
    assert lines[0]["level"] == "warning" and lines[0]["ts"].endswith("+00:00")
