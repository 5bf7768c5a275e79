"""``POST /api/v1/labels`` on a real server over HTTP, on SQLite and PostgreSQL: every item gets a
status, the valid rest of a batch is kept, a repeat changes nothing, a malformed or oversized batch
is refused whole, and the ``labeler`` role may post labels and do nothing else."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session, col, select

from fleet_server.models import CaptureItem, Label
from fleet_server.runner import ServerThread

LABELS = "/api/v1/labels"


def new_id() -> str:
    """A canonical UUIDv7 text, as a device mints (uuid7 is Python 3.14+; the shape is what counts)."""
    ms = int(datetime.now(UTC).timestamp() * 1000)
    rand = uuid.uuid4().int
    value = (ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def label(iid: str | None = None, **over: Any) -> dict[str, Any]:
    return {"inference_id": iid or new_id(), "label": 3, "source": "app", **over}


def stored(srv: ServerThread) -> list[tuple[str, str, Any]]:
    with Session(srv.context.engine) as session:
        rows = session.exec(select(Label).order_by(col(Label.inference_id), col(Label.source))).all()
        return [(r.inference_id, r.source, r.label) for r in rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None: the server's own SQLite; else an empty PostgreSQL database (set up before the server,
    so it is dropped after the server stopped)."""
    return str(request.getfixturevalue("fresh_pg")) if request.param == "postgresql" else None


@pytest.fixture
def labels_server(database_url: str | None, make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server(database_url=database_url)


def test_each_label_gets_a_status_and_the_valid_rest_is_kept(labels_server: ServerThread) -> None:
    a, b, c = new_id(), new_id(), new_id()
    batch = [
        label(a, label_time="2026-12-01T10:00:00Z"),
        label(a),  # the same (inference, source) again in the batch
        label(a, source="reviewer", label="cat"),  # another source may disagree: kept too
        label("not-a-uuid"),
        label(b, label=True),
        label(b, label=float("nan")) | {"label": [1, [2]]},
        {"inference_id": b, "label": 1},  # no source
        label(b, extra=1),
        label(b, label_time="yesterday"),
        label(b, label_time="2026-12-01T10:00:00"),  # no offset
        "not an object",
        label(c, label=[0, 1, 2], label_time="2026-12-01T10:00:00+02:00"),
    ]
    with httpx.Client(base_url=labels_server.url, timeout=10) as client:
        r = client.post(LABELS, json={"labels": batch})
        assert r.status_code == 200, r.text
        out = r.json()
        statuses = [x["status"] for x in out["results"]]
        assert statuses == ["accepted", "duplicate", "accepted"] + ["invalid"] * 8 + ["accepted"]
        details = [x["detail"] for x in out["results"][3:11]]
        assert "inference_id" in details[0] and "boolean" in details[1] and "list" in details[2]
        assert "source" in details[3] and "unknown field" in details[4] and "ISO 8601" in details[5]
        assert "offset" in details[6] and "object" in details[7]
        assert out["counts"] == {"accepted": 3, "duplicate": 1, "invalid": 8, "matched": 0}
        assert not any(x["matched"] for x in out["results"])  # no capture of these: accepted, unmatched
        assert stored(labels_server) == sorted([(a, "app", 3), (a, "reviewer", "cat"), (c, "app", [0, 1, 2])])

        again = client.post(LABELS, json={"labels": [label(a, label=9), label(b)]}).json()
        assert [x["status"] for x in again["results"]] == ["duplicate", "accepted"]
        assert (a, "app", 3) in stored(labels_server)  # the first label stands
        assert len(stored(labels_server)) == 4


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"[1, 2]", 400, "invalid_request"),
        (b'{"labels": 5}', 400, "invalid_request"),
        (b'{"labels": [], "more": 1}', 400, "invalid_request"),
        (b'{"labels": [' + b"[" * 5000 + b"]" * 5000 + b"]}", 400, "invalid_request"),
        (b'{"labels": [{"inference_id": "x", "label": 1e999, "source": "a"}]}', 400, "invalid_request"),
        (b"{not json", 400, "invalid_request"),
    ],
)
def test_a_malformed_batch_is_refused_whole(
    server: ServerThread, client: httpx.Client, body: bytes, status: int, code: str
) -> None:
    r = client.post(LABELS, content=body, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["detail"]["code"]) == (status, code), r.text
    assert stored(server) == []


def test_an_oversized_batch_is_refused_whole(server: ServerThread, client: httpx.Client) -> None:
    small = [{"inference_id": new_id(), "label": 1, "source": "a"} for _ in range(10_001)]
    r = client.post(LABELS, json={"labels": small})
    assert r.status_code == 413, r.text  # ~720 KB: under the body limit, over the item limit
    assert r.json()["detail"]["code"] == "too_many_labels"
    r = client.post(LABELS, json={"labels": [label(label="x" * 200) for _ in range(5000)]})
    assert r.status_code == 413 and r.json()["detail"]["code"] == "body_too_large"
    assert stored(server) == []


def test_the_labeler_role_posts_labels_and_nothing_else(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(auth_required=True)
    admin = {"Authorization": f"Bearer {srv.admin_token}"}
    with httpx.Client(base_url=srv.url, timeout=10) as client:
        tokens = {}
        for role in ("labeler", "viewer", "operator"):
            r = client.post("/api/v1/tokens", json={"name": role, "role": role}, headers=admin)
            assert r.status_code == 201, r.text
            tokens[role] = {"Authorization": f"Bearer {r.json()['token']}"}
        assert client.post(LABELS, json={"labels": [label()]}, headers=tokens["labeler"]).status_code == 200
        assert client.post(LABELS, json={"labels": [label()]}, headers=tokens["operator"]).status_code == 200
        refused = client.post(LABELS, json={"labels": [label()]}, headers=tokens["viewer"])
        assert refused.status_code == 403 and refused.json()["detail"]["code"] == "forbidden"
        assert client.post(LABELS, json={"labels": [label()]}).status_code == 401
        for path in ("/api/v1/devices", "/api/v1/models", "/api/v1/telemetry"):
            assert client.get(path, headers=tokens["labeler"]).status_code == 403, path
        r = client.post(
            "/api/v1/devices", json={"device_id": "d", "hardware_id": "x"}, headers=tokens["labeler"]
        )
        assert r.status_code == 403
        listed = client.get("/api/v1/tokens", params={"role": "labeler"}, headers=admin).json()["items"]
        assert [t["role"] for t in listed] == ["labeler"]
        audit = client.get("/api/v1/audit", params={"path": LABELS}, headers=admin).json()["items"]
        assert [e["status"] for e in audit] == [200, 200, 403, 401]
        assert audit[0]["detail"] == "1 accepted, 0 duplicate, 0 invalid, 0 matched"


def test_a_label_of_a_captured_inference_is_matched(labels_server: ServerThread) -> None:
    captured, other = new_id(), new_id()
    with Session(labels_server.context.engine) as session:
        session.add(
            CaptureItem(
                inference_id=captured,
                device_id="d",
                batch_id="b",
                position=0,
                model_sha256="a" * 64,
                hardware_id="rpi4",
                ts=datetime.now(UTC),
            )
        )
        session.commit()
    with httpx.Client(base_url=labels_server.url, timeout=10) as client:
        first = client.post(LABELS, json={"labels": [label(captured), label(other)]}).json()
        again = client.post(LABELS, json={"labels": [label(captured)]}).json()
    assert [(r["status"], r["matched"]) for r in first["results"]] == [
        ("accepted", True),
        ("accepted", False),
    ]
    assert [(r["status"], r["matched"]) for r in again["results"]] == [("duplicate", True)]
    assert first["counts"]["matched"] == 1


def test_a_batch_racing_another_for_a_key_keeps_the_first_label_and_the_rest(
    fresh_pg: str, tmp_path: Path
) -> None:
    """On PostgreSQL a batch is copied in optimistically; a key another transaction holds makes the
    copy wait for it, fail on the unique key once it commits, and the batch go through the exact
    path: that key is a duplicate, every other label of the batch is stored, nothing twice."""
    from fleet_server import labels
    from fleet_server.settings import ServerSettings
    from fleet_server.store import make_engine

    engine = make_engine(ServerSettings(data_dir=tmp_path, database_url=fresh_pg))
    held, mine = new_id(), [new_id() for _ in range(50)]
    now = datetime.now(UTC)
    try:
        with engine.connect() as other:
            other.execute(  # another batch, not yet committed, took ``held`` first
                text(
                    "INSERT INTO label (inference_id, source, label, label_time, received_at)"
                    " VALUES (:i, 'app', '7', :t, :t)"
                ),
                {"i": held, "t": now},
            )
            with ThreadPoolExecutor(1) as pool:
                racing = pool.submit(
                    labels.store, engine, [label(i) for i in [*mine[:25], held, *mine[25:]]], now
                )
                time.sleep(0.5)
                assert not racing.done()  # the copy waits on the other transaction's key
                other.commit()
                outcomes = racing.result(timeout=30)
        assert [o.status for o in outcomes] == ["accepted"] * 25 + ["duplicate"] + ["accepted"] * 25
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT inference_id, label FROM label")).all()
        assert sorted(rows) == sorted([(held, 7)] + [(i, 3) for i in mine])  # the first label stands
    finally:
        engine.dispose()


def test_the_answer_is_the_json_of_every_outcome_and_their_counts() -> None:
    from fleet_server.labels import Outcome, answer

    outcomes = [
        Outcome("accepted", True),
        Outcome("invalid", detail='label "x\\y" is bad'),
        Outcome("accepted", False),
        Outcome("duplicate", True, "this source labelled it before"),
        Outcome("accepted", True),
    ]
    data, counts = answer(outcomes)
    assert json.loads(data) == {
        "results": [{"status": o.status, "matched": o.matched, "detail": o.detail} for o in outcomes],
        "counts": {"accepted": 3, "duplicate": 1, "invalid": 1, "matched": 3},
    }
    assert counts == json.loads(data)["counts"]
    assert json.loads(answer([])[0]) == {
        "results": [],
        "counts": {"accepted": 0, "duplicate": 0, "invalid": 0, "matched": 0},
    }


def test_labels_come_back_as_posted_through_copy(fresh_pg: str, tmp_path: Path) -> None:
    """Text that COPY's format escapes (backslash, tab, newline, quotes) and non-ASCII, stored by the
    optimistic COPY on PostgreSQL, reads back exactly as posted."""
    from fleet_server import labels
    from fleet_server.settings import ServerSettings
    from fleet_server.store import make_engine

    engine = make_engine(ServerSettings(data_dir=tmp_path, database_url=fresh_pg))
    posted = {new_id(): 'a\\b\t"c"\nd é ✓', new_id(): ["\\N", "x\ty", 2, 1.5], new_id(): 7}
    try:
        out = labels.store(engine, [label(i, label=v) for i, v in posted.items()], datetime.now(UTC))
        assert [o.status for o in out] == ["accepted"] * 3
        with Session(engine) as session:
            assert {r.inference_id: r.label for r in session.exec(select(Label)).all()} == posted
    finally:
        engine.dispose()
