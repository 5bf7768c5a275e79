"""SLOs through the real server: create, list, status from real telemetry, alerts, and the budget policy."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from device_agent import protocol
from fleet_server.models import BudgetOverride
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.server.conftest import FakeDevice, make_bundle, register, upload, wait_for

SLO = {
    "name": "det-avail",
    "model": "det",
    "objectives": [{"sli": "availability", "target": 0.995, "window": "28d"}],
}


def batch(device_id: str, batch_id: str, sha: str, inferences: int, errors: int) -> bytes:
    stats = protocol.ModelStats(inferences=inferences, errors={"non_finite": errors} if errors else {})
    now = datetime.now(UTC)
    b = protocol.TelemetryBatch(
        device_id=device_id, batch_id=batch_id, window_start=now, window_end=now, models={sha: stats}
    )
    return protocol.encode_telemetry(b)


def test_slos_are_created_checked_listed_and_audited(client: httpx.Client) -> None:
    r = client.post("/api/v1/slos", json=SLO)
    assert r.status_code == 201, r.text
    out = r.json()
    # the defaults filled in: the guarded fast page tier, then the workbook's three
    assert [(x["factor"], x["long"], x.get("min_events")) for x in out["rules"]] == [
        (14.4, "5m", 300),
        (14.4, "1h", None),
        (6.0, "6h", None),
        (1.0, "3d", None),
    ]
    assert client.post("/api/v1/slos", json=SLO).json()["detail"]["code"] == "slo_exists"
    bad = client.post("/api/v1/slos", json={**SLO, "name": "x", "objectives": [{"sli": "latency_p95"}]})
    assert bad.status_code == 422 and bad.json()["detail"]["code"] == "invalid_slo"
    assert "threshold in ms" in bad.json()["detail"]["message"]
    for i in range(3):
        extra = {**SLO, "name": f"det-lat-{i}", "objectives": [{"sli": "latency_p99", "threshold": 20 + i}]}
        assert client.post("/api/v1/slos", json=extra).status_code == 201
    page = client.get("/api/v1/slos", params={"limit": 2}).json()
    assert [s["name"] for s in page["items"]] == ["det-avail", "det-lat-0"] and page["next"]
    rest = client.get("/api/v1/slos", params={"limit": 2, "cursor": page["next"]}).json()
    assert [s["name"] for s in rest["items"]] == ["det-lat-1", "det-lat-2"] and rest["next"] is None
    assert client.get("/api/v1/slos/nope").status_code == 404
    status = client.get("/api/v1/slos/det-avail/status").json()
    assert status["budget_spent"] is False and status["objectives"][0]["events"] == 0
    audit = client.get("/api/v1/audit", params={"path": "/api/v1/slos"}).json()["items"]
    assert audit[0]["result"] == "ok" and "slo det-avail" in audit[0]["detail"]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_server(request: pytest.FixtureRequest, make_server: Callable[..., ServerThread]) -> ServerThread:
    if request.param == "sqlite":
        return make_server()
    return make_server(database_url=request.getfixturevalue("fresh_pg"))


def test_a_spent_budget_blocks_new_rollouts_until_an_audited_override_and_lets_a_rollback_go(
    any_db_server: ServerThread,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    server = any_db_server
    client = httpx.Client(base_url=server.url, timeout=10)
    key = keydir.key("release")
    v1 = upload(client, make_bundle(tmp_path, key, version="1", release=1)).json()
    upload(client, make_bundle(tmp_path, key, version="2", release=2, content=b"v2" * 300))
    upload(client, make_bundle(tmp_path, key, version="3", release=3, content=b"v3" * 300))
    register(client, "slo-1")
    assert client.post("/api/v1/slos", json=SLO).status_code == 201
    ev = server.context.slo
    assert ev is not None
    t0 = datetime.now(UTC) + timedelta(minutes=1)  # after the runner's own first sample
    ev.evaluator.run(t0)
    dev = fake_device("slo-1")
    dev.publish("telemetry", batch("slo-1", "b1", v1["sha256"], 1000, 100))  # 10% errors
    wait_for(lambda: client.get("/api/v1/stats").json()["telemetry_batches"] >= 1)
    ev.evaluator.run(t0 + timedelta(minutes=1))
    status = client.get("/api/v1/slos/det-avail/status").json()
    avail = status["objectives"][0]
    assert avail["events"] == 1000 and avail["bad"] == 100 and avail["budget_remaining"] < 0
    assert status["budget_spent"] is True
    # a page: 20x over both windows of the 14.4x rule (the history is shorter than them)
    alerts = client.get("/api/v1/alerts").json()["items"]
    assert [(a["id"], a["state"]) for a in alerts if a["severity"] == "page"] == [("det/*/page", "firing")]

    r = client.post("/api/v1/rollouts", json={"model": "det:2", "stages": [100]})
    assert r.status_code == 409 and r.json()["detail"]["code"] == "error_budget_spent", r.text
    assert "det-avail (availability)" in r.json()["detail"]["message"]
    assert client.post("/api/v1/budget-overrides", json={"model": "det", "reason": ""}).status_code == 400
    assert client.post("/api/v1/budget-overrides", json={"model": "nope", "reason": "fix"}).status_code == 404
    o = client.post("/api/v1/budget-overrides", json={"model": "det", "reason": "fix for INC-7", "hours": 1})
    assert o.status_code == 201, o.text
    r = client.post("/api/v1/rollouts", json={"model": "det:3", "stages": [100]})
    assert r.status_code == 201, r.text
    entries = client.get("/api/v1/audit", params={"path": "/api/v1/rollouts"}).json()["items"]
    assert [e["result"] for e in entries] == ["error_budget_spent", "ok"]
    assert "fix for INC-7" in entries[-1]["detail"]
    overrides = client.get("/api/v1/audit", params={"path": "/api/v1/budget-overrides"}).json()
    assert "fix for INC-7" in overrides["items"][-1]["detail"]

    # once the override lapses, a new release is refused again but going back to an older one goes
    with Session(server.context.engine) as session:
        for row in session.exec(select(BudgetOverride)).all():
            row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
            session.add(row)
        session.commit()
    assert client.post(f"/api/v1/rollouts/{r.json()['id']}/abort").status_code == 200
    again = client.post("/api/v1/rollouts", json={"model": "det:3", "stages": [100]})
    assert again.json()["detail"]["code"] == "error_budget_spent"
    back = client.post("/api/v1/rollouts", json={"model": "det:1", "stages": [100]})
    assert back.status_code == 201, back.text
