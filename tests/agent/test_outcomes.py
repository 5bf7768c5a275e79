"""App outcomes on the device: ``POST /v1/outcomes`` joins a value to the model that made the
prediction, once per (inference, metric), and the model's telemetry carries count, sum and sum of
squares, which the server adds up per (device, model, metric)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from device_agent import protocol
from device_agent.ids import IdMinter, format_id
from device_agent.outcomes import MAX_METRICS, OutcomeBook, check
from fleet_server.outcomes import tally
from signing.keyring import KeyDir

from .field_device import FieldDevice, start_device
from .harness import LoopThread, make_bundle
from .test_labels import _post


@pytest.fixture
def field(keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread) -> Iterator[FieldDevice]:
    dev = start_device(keydir, tmp_path / "dev", loop_thread, api_listen="127.0.0.1:0", label_ring_size=64)
    yield dev
    loop_thread.run(dev.agent.stop())


@pytest.mark.parametrize(
    ("metric", "value"),
    [
        ("Clicks", 1),
        ("", 1),
        ("x" * 65, 1),
        (3, 1),
        ("clicks", True),
        ("clicks", "1"),
        ("clicks", float("nan")),
        ("clicks", 1e13),
    ],
)
def test_what_is_not_an_outcome(metric: object, value: object) -> None:
    assert check(metric, value)


def test_the_book_counts_each_pair_once_and_forgets_the_oldest() -> None:
    book = OutcomeBook(2)
    assert book.mark(1, "a") and book.mark(1, "b") and not book.mark(1, "a")
    assert book.mark(2, "a")  # pushes (1, "a") out
    assert book.mark(1, "a")


def test_outcomes_over_the_local_api_reach_the_models_telemetry(field: FieldDevice, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", field.keydir.key("release"), seed=1)
    field.serve(bundle)
    ids = []
    for i in range(3):
        status, doc = _post(field, "/v1/infer", json.dumps({"inputs": [[float(i)] * 64]}).encode())
        assert status == 200
        ids.append(doc["inference_id"])
    status, doc = _post(
        field, "/v1/outcomes", json.dumps({"inference_id": ids[0], "metric": "clicks", "value": 2}).encode()
    )
    assert status == 200 and doc["results"][0]["status"] == "matched"
    batch = {
        "outcomes": [
            {"inference_id": ids[1], "metric": "clicks", "value": 4.0},
            {
                "inference_id": ids[1],
                "metric": "seconds",
                "value": 1.5,
            },  # another metric of the same inference
            {"inference_id": ids[0], "metric": "clicks", "value": 9},  # a repeat: counted once
            {"inference_id": format_id(IdMinter()()), "metric": "clicks", "value": 1},
            {"inference_id": ids[2], "metric": "clicks"},
            "nonsense",
        ]
    }
    status, doc = _post(field, "/v1/outcomes", json.dumps(batch).encode())
    assert status == 200, doc
    assert [r["status"] for r in doc["results"]] == [
        "matched",
        "matched",
        "duplicate",
        "unknown",
        "invalid",
        "invalid",
    ]
    assert all(r["detail"] for r in doc["results"] if r["status"] != "matched")
    for body, code in [
        (b"{not json", "bad_json"),
        (b'{"outcomes": 1}', "missing_outcomes"),
        (b"[]", "missing_outcomes"),
    ]:
        status, doc = _post(field, "/v1/outcomes", body)
        assert (status, doc["error"]["code"]) == (400, code)
    stats = field.stats(bundle.sha256)
    assert stats["outcomes"] == {"clicks": [2.0, 6.0, 20.0], "seconds": [1.0, 1.5, 2.25]}


def test_a_model_counts_at_most_max_metrics_outcome_metrics(field: FieldDevice, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", field.keydir.key("release"), seed=1)
    field.serve(bundle)
    r = field.agent.infer(np.zeros((1, 64), np.float32))
    got = [field.agent.outcome(r.inference_id, f"m{i}", 1).status.value for i in range(MAX_METRICS + 1)]
    assert got == ["matched"] * MAX_METRICS + ["invalid"]


def test_the_server_sums_valid_outcomes_and_drops_the_rest() -> None:
    now = datetime.now(UTC)
    stats = protocol.ModelStats(
        inferences=1,
        outcomes={
            "clicks": [2, 3.0, 5.0],
            "Bad": [1, 1.0, 1.0],
            "neg": [-1, 1.0, 1.0],
            "inf": [1, float("inf"), 1.0],
            "short": [1, 1.0],
        },
    )
    b = protocol.TelemetryBatch(
        device_id="d1", batch_id="b", window_start=now, window_end=now, models={"s" * 64: stats}
    )
    assert tally([b, b.model_copy(update={"batch_id": "c"})]) == {("d1", "s" * 64, "clicks"): (4, 6.0, 10.0)}
