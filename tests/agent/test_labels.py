"""Labels on the device: the prediction ring, what a label is worth, and the local API's ``/v1/labels``.

The rules are pure (:func:`device_agent.labels.judge`) and tested first by themselves; then a real
agent serving a real onnxruntime model takes labels through ``Agent.label`` and over real HTTP,
and its telemetry batches (decoded as the server decodes them) carry what they proved.
"""

from __future__ import annotations

import bisect
import http.client
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import wire
from device_agent.ids import IdMinter, format_id, id_millis, id_time
from device_agent.labels import LabelStatus, Matched, Prediction, PredictionRing, Unmatched, class_key, judge
from device_agent.local_api import MAX_LABELS
from signing.keyring import KeyDir

from .field_device import FieldDevice, start_device
from .harness import LoopThread, make_bundle

HOUR_MS = 3_600_000
T0 = 1_800_000_000_000  # ms


def _id(ms: int = T0) -> int:
    return IdMinter(lambda: ms / 1000)()


def _judge(p: Prediction | None, label: Any, *, id128: int | None = None, **kw: Any) -> Matched | Unmatched:
    iid = id128 if id128 is not None else (p.id128 if p else _id())
    made = id_millis(iid)
    args: dict[str, Any] = {
        "labelled_before": False,
        "label_ms": made + 1500,
        "now_ms": made + 2000,
        "max_age_ms": HOUR_MS,
        "oldest": None,
    }
    args.update(kw)
    return judge(
        p,
        args["labelled_before"],
        iid,
        label,
        args["label_ms"],
        args["now_ms"],
        args["max_age_ms"],
        args["oldest"],
    )


def test_a_classifier_label_counts_right_or_wrong_with_its_delay_and_confusion() -> None:
    p = Prediction(_id(), "sha", [3], 0.9, 10)
    right, wrong = _judge(p, 3), _judge(p, "7")
    assert right == Matched("sha", 1, 1, ["3:3"], 1.5, 0.0)
    assert wrong == Matched("sha", 1, 0, ["7:3"], 1.5, 0.0)


def test_confusion_keeps_the_first_classes_and_counts_the_rest_as_other() -> None:
    big = wire.MAX_LABEL_CLASSES + 5
    p = Prediction(_id(), "sha", [big], 0.9, big + 1)
    got = _judge(p, 2)
    assert isinstance(got, Matched) and got.confusion == [f"2:{wire.OTHER_CLASS}"]
    assert class_key(wire.MAX_LABEL_CLASSES - 1) == str(wire.MAX_LABEL_CLASSES - 1)


def test_a_batch_inference_takes_one_label_per_row() -> None:
    p = Prediction(_id(), "sha", [1, 2, 3], None, 10)
    assert _judge(p, [1, 2, 0]) == Matched("sha", 3, 2, ["1:1", "2:2", "0:3"], 1.5, 0.0)
    assert isinstance(short := _judge(p, [1, 2]), Unmatched) and short.status == LabelStatus.INVALID


def test_a_regressor_label_counts_its_absolute_error() -> None:
    p = Prediction(_id(), "sha", [0], 2.5, 1)
    assert _judge(p, 4.0) == Matched("sha", 1, 0, [], 1.5, 1.5)
    assert _judge(p, "4").status == LabelStatus.INVALID  # type: ignore[union-attr]
    assert _judge(p, float("nan")).status == LabelStatus.INVALID  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("label", "why"),
    [
        (-1, "negative class"),
        (True, "a bool"),
        (None, "none"),
        ("cat", "a name"),
        (2.5, "a fraction"),
        ({}, "obj"),
    ],
)
def test_what_is_not_a_class_is_invalid(label: Any, why: str) -> None:
    got = _judge(Prediction(_id(), "sha", [3], 0.9, 10), label)
    assert isinstance(got, Unmatched) and got.status == LabelStatus.INVALID, why


def test_unknown_expired_duplicate_and_too_early_are_told_apart() -> None:
    p = Prediction(_id(), "sha", [3], 0.9, 10)
    made = id_millis(p.id128)
    assert _judge(None, 3).status == LabelStatus.UNKNOWN  # type: ignore[union-attr]
    # Not held, and older than the ring's oldest prediction: pushed out, not unknown.
    assert _judge(None, 3, id128=p.id128, oldest=p.id128 + 1).status == LabelStatus.EXPIRED  # type: ignore[union-attr]
    # Not held, and older than the age limit.
    late = {"now_ms": made + 2 * HOUR_MS, "label_ms": made + 2 * HOUR_MS}
    assert _judge(None, 3, id128=p.id128, **late).status == LabelStatus.EXPIRED  # type: ignore[union-attr]
    # Held, but older than the age limit.
    assert _judge(p, 3, **late).status == LabelStatus.EXPIRED  # type: ignore[union-attr]
    assert _judge(p, 3, labelled_before=True).status == LabelStatus.DUPLICATE  # type: ignore[union-attr]
    early = _judge(p, 3, label_ms=made - 1)
    assert isinstance(early, Unmatched) and early.status == LabelStatus.INVALID
    failed = _judge(Prediction(p.id128, "sha", [], None, 1), 3)
    assert isinstance(failed, Unmatched) and failed.status == LabelStatus.INVALID


def test_the_ring_keeps_the_last_predictions_and_marks_each_labelled_once() -> None:
    ring = PredictionRing(4)
    mint = IdMinter()
    ids = [mint() for _ in range(6)]
    for i in ids:
        ring.add((i, "sha", [0], 1.0, 2))
    assert len(ring) == 4
    assert ring.find(ids[0]) == (None, False) and ring.find(ids[1]) == (None, False)
    assert ring.oldest() == ids[2]
    p, labelled = ring.find(ids[5])
    assert p is not None and p.id128 == ids[5] and not labelled
    assert ring.mark(ids[5]) and not ring.mark(ids[5])
    assert ring.find(ids[5])[1]
    for _ in range(4):  # the labelled prediction is pushed out: its mark goes with it
        ring.add((mint(), "sha", [0], 1.0, 2))
    assert ring.find(ids[5]) == (None, False)


# -- a real agent ----------------------------------------------------------------------


@pytest.fixture
def field(keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread) -> Iterator[FieldDevice]:
    dev = start_device(keydir, tmp_path / "dev", loop_thread, api_listen="127.0.0.1:0", label_ring_size=64)
    yield dev
    loop_thread.run(dev.agent.stop())


def _post(dev: FieldDevice, path: str, body: bytes, claimed_length: int | None = None) -> tuple[int, Any]:
    """POST ``body``; with ``claimed_length`` only the headers go, announcing that many bytes
    (the API must refuse an oversized body before reading it)."""
    addr = dev.agent.api.address.removeprefix("http://")
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        if claimed_length is None:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        else:
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(claimed_length))
            conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_labels_through_the_agent_reach_the_models_telemetry(field: FieldDevice, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", field.keydir.key("release"), seed=1)
    field.serve(bundle)
    rng = np.random.default_rng(0)
    results = [field.agent.infer(rng.standard_normal((1, 64)).astype(np.float32)) for _ in range(10)]
    ids = [r.inference_id for r in results]
    assert len(set(ids)) == 10 and ids == sorted(ids)  # unique, time-ordered
    top = [int(np.argmax(r.outputs[0])) for r in results]
    delay = timedelta(seconds=90)
    statuses = []
    for i, r in enumerate(results):
        truth = top[i] if i < 7 else (top[i] + 1) % 10  # 7 right, 3 wrong
        statuses.append(field.agent.label(r.inference_id, truth, (id_time(r.id128) + delay).isoformat()))
    assert [s.status for s in statuses] == [LabelStatus.MATCHED] * 10
    again = field.agent.label(ids[0], top[0])
    assert again.status == LabelStatus.DUPLICATE and again.detail
    assert field.agent.label(format_id(IdMinter()()), 1).status == LabelStatus.UNKNOWN
    assert field.agent.label("nonsense", 1).status == LabelStatus.INVALID
    assert field.agent.label(ids[1], 1, "yesterday").status == LabelStatus.INVALID

    stats = field.stats(bundle.sha256)
    assert stats["labels"] == 10 and stats["labels_correct"] == 7
    assert sum(stats["confusion"].values()) == 10
    assert sum(v for k, v in stats["confusion"].items() if k.split(":")[0] == k.split(":")[1]) == 7
    bucket = bisect.bisect_left(wire.LABEL_DELAY_BOUNDS_S, 90.0)
    assert len(stats["label_delay_buckets"]) == wire.LABEL_DELAY_BUCKETS
    assert stats["label_delay_buckets"][bucket] == 10 and sum(stats["label_delay_buckets"]) == 10
    assert field.unmatched() == {"duplicate": 1, "unknown": 1, "invalid": 2}


def test_a_label_for_a_prediction_pushed_out_of_the_ring_is_expired(
    field: FieldDevice, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "b", field.keydir.key("release"), seed=1)
    field.serve(bundle)
    x = np.zeros((1, 64), np.float32)
    first = field.agent.infer(x)
    for _ in range(64):  # the ring holds 64
        field.agent.infer(x)
    assert field.agent.label(first.inference_id, 0).status == LabelStatus.EXPIRED


def test_the_local_api_returns_ids_and_takes_label_batches_item_by_item(
    field: FieldDevice, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "b", field.keydir.key("release"), seed=1)
    field.serve(bundle)
    answers = []
    for i in range(3):
        status, doc = _post(field, "/v1/infer", json.dumps({"inputs": [[float(i)] * 64]}).encode())
        assert status == 200 and doc["ok"]
        answers.append(doc)
    ids = [a["inference_id"] for a in answers]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    top = [int(np.argmax(a["outputs"][0])) for a in answers]
    batch = {
        "labels": [
            {"inference_id": ids[0], "label": top[0]},
            {"inference_id": ids[1], "label": (top[1] + 1) % 10, "label_time": "2999-01-01T00:00:00Z"},
            {"inference_id": ids[0], "label": top[0]},  # the same again
            {"inference_id": format_id(IdMinter()()), "label": 1},
            {"inference_id": ids[2]},  # no label
            "not an object",
            {"inference_id": 7, "label": 1},
            {"inference_id": ids[2], "label": top[2]},  # the valid rest is kept
        ]
    }
    status, doc = _post(field, "/v1/labels", json.dumps(batch).encode())
    assert status == 200, doc
    assert [r["status"] for r in doc["results"]] == [
        "matched",
        "matched",
        "duplicate",
        "unknown",
        "invalid",
        "invalid",
        "invalid",
        "matched",
    ]
    assert doc["counts"] == {"matched": 3, "duplicate": 1, "unknown": 1, "invalid": 3}
    assert all(r["detail"] for r in doc["results"] if r["status"] != "matched")
    stats = field.stats(bundle.sha256)
    assert stats["labels"] == 3 and stats["labels_correct"] == 2
    assert field.unmatched() == {"duplicate": 1, "unknown": 1, "invalid": 3}


def test_the_local_api_refuses_unusable_label_batches_clearly(field: FieldDevice, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", field.keydir.key("release"), seed=1)
    field.serve(bundle)
    for body, code in [
        (b"{not json", "bad_json"),
        (b'{"labels": 3}', "missing_labels"),
        (b"[]", "missing_labels"),
        (b"[" * 5000 + b"]" * 5000, "bad_json"),
    ]:
        status, doc = _post(field, "/v1/labels", body)
        assert (status, doc["error"]["code"]) == (400, code)
    many = {"labels": [{"inference_id": "x", "label": 1}] * (MAX_LABELS + 1)}
    status, doc = _post(field, "/v1/labels", json.dumps(many).encode())
    assert (status, doc["error"]["code"]) == (413, "too_many_labels")
    status, doc = _post(field, "/v1/labels", b"", claimed_length=(1 << 20) + 1)
    assert (status, doc["error"]["code"]) == (413, "too_large")
    # Nothing above reached the ring or the counts; the API still answers.
    assert field.unmatched() == {}
    status, doc = _post(field, "/v1/labels", b'{"labels": []}')
    assert status == 200 and doc == {"results": [], "counts": {}}
