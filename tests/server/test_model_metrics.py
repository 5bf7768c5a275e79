"""Field metrics of a model version per hardware cohort and rollout stage: the pure figures from
counts, then ``GET /api/v1/models/{name}/{version}/metrics`` and ``edgefleet models metrics`` on a
real server whose aggregates came through the real ingest."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from device_agent import protocol
from edgefleet.cli import app
from edgefleet.client import ApiClient
from fleet_server import model_metrics as mm
from fleet_server.counters import Counters
from fleet_server.ingest import Inbound, ingest_batch
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import make_bundle

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _agg(**over: object) -> SimpleNamespace:
    values: dict[str, object] = {
        "inferences": 100,
        "errors": 0,
        "labels": 10,
        "labels_correct": 8,
        "confusion": {"0:0": 5, "1:1": 3, "1:0": 2},
        "label_delay_buckets": [0, 4, 6],
        "label_abs_error_sum": 0.0,
        "requests": 50,
        "request_errors": {"timeout": 1, "bad_input": 1},
        "input_checks": {"image": [100, 1, 2, 3]},
        "input_buckets": {"image": [5, 10, 10, 10, 10, 10, 10, 10, 10, 10, 0, 5]},
        "cpu_ms": 25.0,
        "captured": 4,
    }
    values.update(over)
    return SimpleNamespace(**values)


def test_figures_from_counts() -> None:
    c = mm.Counts()
    c.add(_agg())
    c.add(_agg())
    m = mm.metrics(c)
    assert m["devices"] == 2 and m["inferences"] == 200
    acc = m["accuracy"]
    assert (acc["labels"], acc["correct"], acc["value"]) == (20, 16, 0.8)
    lo, hi = acc["interval"]
    assert lo == pytest.approx(0.584, abs=0.001) and hi == pytest.approx(0.919, abs=0.001)  # Wilson, 95%
    # class 0: TP 10, predicted 14 (4 of them true 1), support 10; negatives (true 1) 10
    assert m["classes"]["0"] == {
        "support": 10,
        "predicted": 14,
        "precision": 10 / 14,
        "recall": 1.0,
        "fpr": 0.4,
    }
    assert m["classes"]["1"] == {"support": 10, "predicted": 6, "precision": 1.0, "recall": 0.6, "fpr": 0.0}
    assert m["label_coverage"] == 0.1
    bounds = protocol.LABEL_DELAY_BOUNDS_S
    assert (m["label_delay_p50_s"], m["label_delay_p95_s"]) == (bounds[2], bounds[2])  # 8 of 20 in bucket 1
    assert m["feature_availability"]["image"] == {
        "checked": 200,
        "nan_share": 0.01,
        "missing_share": 0.02,
        "out_of_range_share": 0.03,
        "available": 0.94,
    }
    dist = m["input_distribution"]["image"]  # two devices' counts summed, then shares of 200 values
    assert dist["values"] == 200 and list(dist["shares"]) == list(protocol.INPUT_BUCKETS)
    assert (dist["shares"]["00 <min"], dist["shares"]["01 0-10%"], dist["shares"]["10 90-100%"]) == (
        0.05,
        0.1,
        0.0,
    )
    assert sum(dist["shares"].values()) == pytest.approx(1.0)
    assert mm.input_distribution({"x": [0] * 12}) == {}  # no values counted: no distribution
    assert m["prediction_availability"] == {
        "requests": 100,
        "failed": 4,
        "by_kind": {"bad_input": 2, "timeout": 2},
        "value": 0.96,
    }
    assert m["cpu_ms_per_inference"] == 0.25
    assert m["energy_mj_per_inference"] is None and "null" in m["energy_note"]


def test_nothing_counted_gives_nulls_not_zeros() -> None:
    m = mm.metrics(mm.Counts())
    assert m["accuracy"]["value"] is None and m["accuracy"]["interval"] is None
    assert m["label_coverage"] is None and m["label_delay_p50_s"] is None
    assert m["prediction_availability"]["value"] is None and m["cpu_ms_per_inference"] is None


def test_a_regressor_reports_its_mean_absolute_error() -> None:
    c = mm.Counts()
    c.add(_agg(labels=4, labels_correct=0, confusion={}, label_abs_error_sum=2.0))
    m = mm.metrics(c)
    assert m["accuracy"] is None and m["mean_abs_error"] == 0.5 and m["classes"] == {}


def test_server_labels_are_scored_against_the_captured_top1() -> None:
    got = mm.joined_accuracy(
        [(3, "3"), ("3", "3"), ([2, 5], "2"), (1, "0"), (1, None), (True, "1"), (0.5, "0")]
    )
    assert (got["labels"], got["correct"]) == (4, 3)


def _telemetry(device: str, sha: str, batch: str, **over: object) -> Inbound:
    stats = {k: v for k, v in vars(_agg(**over)).items() if k != "errors"}
    doc = protocol.TelemetryBatch.model_validate(
        {
            "device_id": device,
            "batch_id": batch,
            "window_start": NOW,
            "window_end": NOW,
            "models": {sha: protocol.ModelStats.model_validate(stats)},
        }
    )
    topic = protocol.topic(device, protocol.Channel.TELEMETRY)
    return Inbound(topic, protocol.encode_telemetry(doc), time.time())


def test_metrics_per_cohort_and_stage_over_http_and_the_cli(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, tmp_path: Path
) -> None:
    with ApiClient(server.url) as api:
        model = api.push_bundle(
            make_bundle(tmp_path / "b", keydir.key("release"), name="digits", version="2")
        )
        for d, hw in (("m-1", "rpi4"), ("m-2", "rpi4"), ("m-3", "jetson")):
            api.register_device(d, hw)
    sha = model["sha256"]
    ingest_batch(
        server.context.engine,
        [
            _telemetry("m-1", sha, "a"),
            _telemetry("m-2", sha, "a", labels=30, labels_correct=30, confusion={"0:0": 30}),
            _telemetry("m-3", sha, "a", cpu_ms=100.0),
        ],
        Counters(),
    )
    r = client.get("/api/v1/models/digits/2/metrics")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "digits:2" and out["sha256"] == sha and out["rollout_id"] is None
    groups = {(g["hardware_id"], g["stage"]): g for g in out["groups"]}
    assert set(groups) == {("jetson", None), ("rpi4", None)}
    assert groups[("rpi4", None)]["accuracy"]["labels"] == 40 and groups[("rpi4", None)]["devices"] == 2
    assert groups[("jetson", None)]["cpu_ms_per_inference"] == 1.0
    assert out["total"]["accuracy"]["correct"] == 8 + 30 + 8 and out["total"]["devices"] == 3
    missing = client.get("/api/v1/models/digits/9/metrics")
    assert (missing.status_code, missing.json()["detail"]["code"]) == (404, "model_not_found")

    runner = CliRunner()
    as_json = runner.invoke(app, ["models", "metrics", "digits:2", "--server", server.url, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == out
    table = runner.invoke(
        app, ["models", "metrics", "digits:2", "--server", server.url], env={"COLUMNS": "220"}
    )
    assert table.exit_code == 0, table.output
    assert "rpi4" in table.output and "jetson" in table.output and "energy" in table.output
    bad = runner.invoke(app, ["models", "metrics", "digits:9", "--server", server.url])
    assert (
        bad.exit_code == 1 and "model_not_found" in bad.output and len(bad.output.strip().splitlines()) == 1
    )
