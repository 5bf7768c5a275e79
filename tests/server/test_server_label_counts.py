"""Labels posted to the server feed the accuracy SLI: scored against their captured predictions
whichever arrives first, counted once per stored label, per model hash and hardware cohort, and
added to the labels devices matched themselves; on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from fleet_server import captures, labels
from fleet_server.models import CaptureItem, Device, Model, ModelAggregate, ServerLabelCount, Slo
from fleet_server.server_label_counts import tally, verdict
from fleet_server.settings import ServerSettings
from fleet_server.slo.series import events
from fleet_server.slo.spec import Sli, spec_as_dict, spec_from
from fleet_server.slo_runner import SloEvaluator
from fleet_server.slo_store import cohort_totals
from fleet_server.store import make_engine
from tests.server.test_labels import new_id

SHA = "c" * 64
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_a_label_is_scored_on_the_first_row_and_only_when_it_names_a_class() -> None:
    assert verdict(3, "3") is True and verdict("3", "3") is True and verdict(2, "3") is False
    assert verdict([1, 0], "1") is True and verdict([0, 1], "1") is False
    assert verdict(3, None) is None  # no prediction captured
    assert verdict(True, "1") is None and verdict(0.5, "0") is None and verdict([], "0") is None
    rows = [(SHA, "rpi4", 3, "3"), (SHA, "rpi4", 1, "3"), (SHA, "jetson", 2, "2"), (SHA, "rpi4", 0.5, "0")]
    assert tally(rows) == {(SHA, "rpi4"): (2, 1), (SHA, "jetson"): (1, 1)}


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = str(request.getfixturevalue("fresh_pg")) if request.param == "postgresql" else None
    engine = make_engine(ServerSettings(data_dir=tmp_path, database_url=url))
    with Session(engine) as session:
        session.add(Device(id="d1", hardware_id="rpi4", tags={}, registered_at=NOW))
        session.add(
            Model(name="det", version="1", release=1, target="arm64-cpu", hardware_ids=[], sha256=SHA,
                  length=1, manifest={}, storage_path="/x", created_at=NOW)
        )  # fmt: skip
        session.add(ModelAggregate(device_id="d1", sha256=SHA, inferences=1000, labels=10, labels_correct=9))
        session.commit()
    yield engine
    engine.dispose()


def output(top: int) -> dict[str, Any]:
    """A float32 [1, 4] output whose top-1 is ``top``, as the agent captures it."""
    values = [0.1] * 4
    values[top] = 0.9
    return {
        "dtype": "float32",
        "shape": [1, 4],
        "data": base64.b64encode(struct.pack("<4f", *values)).decode(),
    }


def upload(engine: Engine, tmp_path: Path, batch_id: str, predicted: dict[str, int]) -> captures.Stored:
    body = {
        "device_id": "d1",
        "batch_id": batch_id,
        "model_sha256": SHA,
        "items": [
            {"inference_id": iid, "ts": NOW.isoformat(), "outputs": [output(top)]}
            for iid, top in predicted.items()
        ],
    }
    return captures.store(engine, tmp_path / "captures", "d1", batch_id, json.dumps(body).encode(), 1 << 20)


def counted(engine: Engine) -> dict[tuple[str, str], tuple[int, int]]:
    with Session(engine) as session:
        rows = session.exec(select(ServerLabelCount)).all()
        return {(r.model_sha256, r.hardware_id): (r.labels, r.labels_correct) for r in rows}


def test_server_labels_count_whichever_of_label_and_capture_comes_first(
    engine: Engine, tmp_path: Path
) -> None:
    a, b, c, d, e, f = (new_id() for _ in range(6))
    # the capture first: a predicted 3, b predicted 1
    upload(engine, tmp_path, "b1", {a: 3, b: 1})
    out = labels.store(engine, [{"inference_id": i, "label": 3, "source": "app"} for i in (a, b, c)], NOW)
    assert [(o.status, o.matched) for o in out] == [
        ("accepted", True),
        ("accepted", True),
        ("accepted", False),
    ]
    assert counted(engine) == {(SHA, "rpi4"): (2, 1)}  # c has no capture yet: not counted
    # a repeat changes nothing; another source's label of a is a label of its own
    labels.store(engine, [{"inference_id": a, "label": 3, "source": "app"}], NOW)
    labels.store(engine, [{"inference_id": a, "label": 0, "source": "reviewer"}], NOW)
    assert counted(engine) == {(SHA, "rpi4"): (3, 1)}
    # the label first: d and e labelled, then their captures arrive (e wrongly predicted), with c's
    labels.store(engine, [{"inference_id": d, "label": [2, 2], "source": "app"},
                          {"inference_id": e, "label": "1", "source": "app"}], NOW)  # fmt: skip
    assert counted(engine) == {(SHA, "rpi4"): (3, 1)}
    upload(engine, tmp_path, "b2", {d: 2, e: 0, c: 3, f: 1})  # f: never labelled
    assert counted(engine) == {(SHA, "rpi4"): (6, 3)}
    again = upload(engine, tmp_path, "b2", {d: 2, e: 0, c: 3, f: 1})  # the same body resent
    assert not again.created and counted(engine) == {(SHA, "rpi4"): (6, 3)}
    # an inference id captured twice (a device bug) keeps its first capture and is not counted again
    upload(engine, tmp_path, "b3", {d: 1})
    with Session(engine) as session:
        assert session.get(CaptureItem, d) is not None and session.get(CaptureItem, d).predicted == "2"  # type: ignore[union-attr]
    assert counted(engine) == {(SHA, "rpi4"): (6, 3)}

    # the accuracy SLI reads them next to the devices' own 10 labels (9 right)
    with Session(engine) as session:
        assert cohort_totals(session)[(SHA, "rpi4")].labels == 16
        assert cohort_totals(session)[(SHA, "rpi4")].labels_correct == 12
        spec = spec_from(
            {"name": "det-acc", "model": "det", "objectives": [{"sli": "accuracy", "target": 0.9}]}
        )
        session.add(
            Slo(name=spec.name, model=spec.model, spec=spec_as_dict(spec), created_at=NOW, created_by="t")
        )
        session.commit()
    evaluator = SloEvaluator(engine, ServerSettings(data_dir=tmp_path))
    evaluator.run(NOW + timedelta(minutes=1))
    objective = spec.objective(Sli.ACCURACY)
    assert objective is not None
    assert events(objective, evaluator.samples("det-acc")[-1]) == (4, 16)  # (wrong, labelled)
