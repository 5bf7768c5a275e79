"""The retrain webhook: when it fires (pure), how it is delivered (retries against a real local HTTP
receiver), and a real server firing it once a model's field accuracy falls under the threshold."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from edgefleet.client import ApiClient
from fleet_server.counters import Counters
from fleet_server.ingest import ingest_batch
from fleet_server.retrain import Figures, Thresholds, decide, deliver, payload
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.support.webhook import Receiver

from .conftest import make_bundle, wait_for
from .test_model_metrics import _telemetry


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


T = Thresholds(min_accuracy=0.9, max_psi=0.2, min_labels=100, min_samples=1000)


def test_a_crossing_fires_once_and_again_only_after_coming_back() -> None:
    bad = Figures("digits:2", "a" * 64, labels=200, correct=150)
    fires, fired = decide([bad], T, frozenset())
    assert [(f.model, f.reason) for f in fires] == [("digits:2", "accuracy")]
    assert fires[0].figures == {"accuracy": 0.75, "labels": 200, "correct": 150}
    assert decide([bad], T, fired)[0] == []  # still across: no second webhook
    good = Figures("digits:2", "a" * 64, labels=400, correct=390)
    fires, fired = decide([good], T, fired)
    assert fires == [] and fired == frozenset()
    assert [f.reason for f in decide([bad], T, fired)[0]] == ["accuracy"]  # crossed again
    few = Figures("digits:2", "a" * 64, labels=99, correct=0)  # under the minimum sample: no verdict
    assert decide([few], T, frozenset())[0] == []
    drifted = Figures("digits:3", "b" * 64, labels=0, psi=0.5, samples=5000)
    assert [f.reason for f in decide([drifted], T, frozenset())[0]] == ["drift"]
    assert decide([drifted], Thresholds(min_accuracy=0.9), frozenset())[0] == []  # drift not configured


def test_the_payload_names_the_dataset_to_retrain_on() -> None:
    fire = decide([Figures("digits:2", "a" * 64, labels=200, correct=150)], T, frozenset())[0][0]
    since, until = datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 8, tzinfo=UTC)
    body = payload(fire, T, since, until)
    assert body["model"] == "digits:2" and body["reason"] == "accuracy"
    assert body["window"] == {"since": since.isoformat(), "until": until.isoformat()}
    query = parse_qs(urlsplit(body["dataset"]["path"]).query)
    assert query == {
        "model": ["digits:2"],
        "since": [since.isoformat()],
        "until": [until.isoformat()],
        "labeled": ["true"],
    }


def test_delivery_retries_until_a_2xx(receiver: Receiver, refused_port: Callable[[], int]) -> None:
    receiver.script = [503, 500]
    assert deliver(receiver.url, {"x": 1}, attempts=5, base_s=0.05)
    assert receiver.statuses == [503, 500, 200] and receiver.bodies == [{"x": 1}] * 3
    receiver.script = [503] * 10
    assert not deliver(receiver.url, {"x": 2}, attempts=3, base_s=0.01)
    assert receiver.statuses[3:] == [503] * 3
    nobody = f"http://127.0.0.1:{refused_port()}/hook"  # connection refused: retried, then given up
    started = time.monotonic()
    assert not deliver(nobody, {"x": 3}, attempts=3, base_s=0.01)
    assert time.monotonic() - started < 5


def test_a_server_fires_the_webhook_when_field_accuracy_falls(
    make_server: Any, receiver: Receiver, keydir: KeyDir, tmp_path: Path
) -> None:
    receiver.script = [503]  # the first delivery fails: retried
    srv: ServerThread = make_server(
        retrain_webhook_url=receiver.url,
        retrain_min_accuracy=0.9,
        retrain_min_labels=100,
        retrain_check_seconds=0.2,
    )
    with ApiClient(srv.url) as api:
        model = api.push_bundle(
            make_bundle(tmp_path / "b", keydir.key("release"), name="digits", version="2")
        )
        api.register_device("rw-1", "rpi4")
    ingest_batch(
        srv.context.engine,
        [_telemetry("rw-1", model["sha256"], "a", labels=60, labels_correct=58, confusion={"0:0": 58})],
        Counters(),
    )
    time.sleep(1.0)
    assert receiver.bodies == []  # 60 labels: under the minimum sample, no verdict yet
    ingest_batch(
        srv.context.engine,
        [_telemetry("rw-1", model["sha256"], "b", labels=140, labels_correct=90, confusion={"0:0": 90})],
        Counters(),
    )
    wait_for(lambda: receiver.statuses == [503, 200], 15)
    body = receiver.bodies[-1]
    assert (body["model"], body["reason"], body["sha256"]) == ("digits:2", "accuracy", model["sha256"])
    assert body["figures"] == {"accuracy": 148 / 200, "labels": 200, "correct": 148}
    time.sleep(1.0)
    assert len(receiver.bodies) == 2  # still across: fired once
    with httpx.Client(base_url=srv.url, timeout=10) as client:  # the dataset query it names works
        r = client.get(body["dataset"]["path"])
        assert r.status_code == 200 and r.json() == {"items": [], "next": None}
