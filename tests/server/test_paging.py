"""Paging and filters of the admin API's lists, over real HTTP, on SQLite and PostgreSQL.

A fleet is written straight into the server's database (the state ingest would have
written: online, deployment state, running model, agent version, runtimes), then read
back through the API page by page; the expected answers are computed here from the
same generation rules, independently of the server's selector code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from edgefleet.client import ApiClient
from fleet_server.models import Device, utcnow
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import make_bundle, register, upload

SHA1, SHA2 = "1" * 64, "2" * 64
HARDWARE = ("rpi4", "jetson", "imx8")
SITES = ("lab", "berlin")
VERSIONS = ("0.2.9", "0.3.0", "0.10.1", None)  # PEP 440 order differs from string order
# keys a JSON path cannot spell on SQLite, and a value with every special character
ODD_TAGS = {'we"ird.key': "x", "straße": "ja", "a,b": "=,"}


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, make_server: Callable[..., ServerThread]) -> ServerThread:
    if request.param == "postgresql":
        return make_server(database_url=request.getfixturevalue("fresh_pg"))
    return make_server()


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def device_row(i: int, device_id: str | None = None) -> dict[str, Any]:
    """Device ``i`` of the generated fleet, as the ingest would have stored it."""
    runtimes: Any = {"onnxruntime": "1.32"} if i % 2 else ["litert"]
    running = (SHA1, "det", "1") if i % 5 == 0 else (SHA2, "det", "2") if i % 5 == 1 else (None, None, None)
    return {
        "id": device_id or f"dev-{i:05d}",
        "hardware_id": HARDWARE[i % 3],
        "tags": {"site": SITES[i % 2], **(ODD_TAGS if i % 7 == 0 else {})},
        "registered_at": utcnow(),
        "online": i % 4 == 0,
        "deployment_state": "serving" if i % 6 == 0 else "failed",
        "deployment_seq": 0,
        "desired_seq": 0,
        "running_sha256": running[0],
        "running_name": running[1],
        "running_version": running[2],
        "agent_version": VERSIONS[i % 4],
        "reported": {"capabilities": {"runtimes": runtimes}},
    }


def insert_devices(srv: ServerThread, rows: list[dict[str, Any]]) -> None:
    with srv.context.engine.begin() as conn:
        conn.execute(insert(Device.__table__), rows)  # type: ignore[attr-defined]


def all_pages(api: httpx.Client, path: str, limit: int, /, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every entry of a list, following ``next``, and how many pages that took."""
    items: list[dict[str, Any]] = []
    cursor, pages = None, 0
    while True:
        r = api.get(path, params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "next"} and len(body["items"]) <= limit
        items += body["items"]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            return items, pages
        assert len(body["items"]) == limit, "only the last page may be short"


def error(r: httpx.Response, code: str) -> str:
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"detail"} and set(body["detail"]) == {"code", "message"}, body
    assert body["detail"]["code"] == code, body
    return str(body["detail"]["message"])


@pytest.mark.slow
def test_paging_2500_devices_returns_each_once_while_devices_are_added(
    server: ServerThread, api: httpx.Client
) -> None:
    # even numbers exist; odd ones are added during the walk, behind and ahead of the cursor
    insert_devices(server, [device_row(i) for i in range(0, 5000, 2)])
    seen: list[str] = []
    added_behind: set[str] = set()
    added_ahead: set[str] = set()
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        body = api.get("/api/v1/devices", params=params).json()
        seen += [d["device_id"] for d in body["items"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
        position = int(seen[-1].removeprefix("dev-"))
        if position > 2:
            behind = f"dev-{position - 1:05d}"
            register(api, behind, "rpi4")
            added_behind.add(behind)
        if position + 101 < 5000:
            ahead = f"dev-{position + 101:05d}"
            register(api, ahead, "rpi4")
            added_ahead.add(ahead)
    original = {f"dev-{i:05d}" for i in range(0, 5000, 2)}
    assert len(seen) == len(set(seen)), "a device came twice"
    assert original <= set(seen), f"{len(original - set(seen))} devices were skipped"
    assert added_ahead <= set(seen), "a device added ahead of the cursor must show on a later page"
    assert not added_behind & set(seen), "a device added behind the cursor cannot show"
    assert set(seen) == original | added_ahead and seen == sorted(seen)
    assert pages >= 25
    # the client follows the cursors: every device, in order, whatever the page size
    with ApiClient(server.url) as client:
        assert [d["device_id"] for d in client.devices()] == sorted(original | added_ahead | added_behind)
        assert len(client.devices(limit=1500)) == 1500


def test_filters_select_in_the_database_across_pages(server: ServerThread, api: httpx.Client) -> None:
    n = 300
    insert_devices(server, [device_row(i) for i in range(n)])
    ids = {i: f"dev-{i:05d}" for i in range(n)}

    def expect(keep: Callable[[int], bool]) -> list[str]:
        return [ids[i] for i in range(n) if keep(i)]

    def agent_at_least_0_3(i: int) -> bool:
        return VERSIONS[i % 4] in ("0.3.0", "0.10.1")  # "0.10.1" < "0.3" as strings, not as versions

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"selector": "hw=rpi4,site=lab"}, expect(lambda i: i % 3 == 0 and i % 2 == 0)),
        ({"selector": "hardware_id=jetson"}, expect(lambda i: i % 3 == 1)),
        ({"selector": 'we"ird.key=x'}, expect(lambda i: i % 7 == 0)),
        ({"selector": "straße=ja,site=berlin"}, expect(lambda i: i % 7 == 0 and i % 2 == 1)),
        ({"selector": "site=nowhere"}, []),
        ({"selector": "runtime=litert"}, expect(lambda i: i % 2 == 0)),
        ({"selector": "runtime=onnxruntime,hw=imx8"}, expect(lambda i: i % 2 == 1 and i % 3 == 2)),
        ({"selector": "agent=>=0.3"}, expect(agent_at_least_0_3)),
        ({"selector": "agent=>=0.3,hw=rpi4", "online": "true"}, expect(
            lambda i: agent_at_least_0_3(i) and i % 3 == 0 and i % 4 == 0)),
        ({"online": "false"}, expect(lambda i: i % 4 != 0)),
        ({"state": "serving"}, expect(lambda i: i % 6 == 0)),
        ({"model": "det:1"}, expect(lambda i: i % 5 == 0)),
        ({"model": "det"}, expect(lambda i: i % 5 in (0, 1))),
        ({"model": SHA2}, expect(lambda i: i % 5 == 1)),
        ({"model": "det:1", "state": "serving", "selector": "site=lab"}, expect(
            lambda i: i % 5 == 0 and i % 6 == 0 and i % 2 == 0)),
        ({"selector": ""}, expect(lambda i: True)),
    ]  # fmt: skip
    for params, expected in cases:
        got, pages = all_pages(api, "/api/v1/devices", 7, **params)
        assert [d["device_id"] for d in got] == expected, params
        assert pages == max(1, -(-len(expected) // 7)), (params, pages)  # the last page is never empty
    with ApiClient(server.url) as client:
        assert [d["device_id"] for d in client.devices(selector="hw=rpi4,site=lab", online=True)] == expect(
            lambda i: i % 3 == 0 and i % 2 == 0 and i % 4 == 0
        )


def test_malformed_cursors_selectors_and_limits_are_400_naming_the_problem(api: httpx.Client) -> None:
    register(api, "dev-1")

    def cursor_of(*parts: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")

    def devices(**params: Any) -> httpx.Response:
        return api.get("/api/v1/devices", params=params)

    assert "not base64 of JSON" in error(devices(cursor="abc"), "invalid_cursor")
    assert "not a cursor" in error(devices(cursor=cursor_of({"devices": 1})), "invalid_cursor")
    assert "'models' list" in error(devices(cursor=cursor_of("models", "det", 1)), "invalid_cursor")
    assert "is not a str" in error(devices(cursor=cursor_of("devices", 5)), "invalid_cursor")
    assert "this list's key has 1" in error(devices(cursor=cursor_of("devices", "a", "b")), "invalid_cursor")
    naive = cursor_of("rollouts", "2026-01-01T00:00:00", "x")
    assert "timezone-aware" in error(api.get("/api/v1/rollouts", params={"cursor": naive}), "invalid_cursor")
    far = cursor_of("tokens", "0001-01-01T00:00:00+14:00", "x")
    assert "out of range" in error(api.get("/api/v1/tokens", params={"cursor": far}), "invalid_cursor")
    assert "cursor" in error(devices(cursor="not base64!"), "invalid_request")

    assert "'hw' is not key=value" in error(devices(selector="hw"), "invalid_selector")
    assert "'site' is given twice" in error(devices(selector="site=a,site=b"), "invalid_selector")
    assert "the hardware id is given twice" in error(
        devices(selector="hw=a,hardware_id=b"), "invalid_selector"
    )
    assert "PEP 440" in error(devices(selector="agent=>>1"), "invalid_selector")
    assert "at most 64" in error(devices(selector="k" * 65 + "=v"), "invalid_selector")
    assert "'=x' is not key=value" in error(devices(selector="=x"), "invalid_selector")

    for path in (
        "/api/v1/devices",
        "/api/v1/models",
        "/api/v1/rollouts",
        "/api/v1/audit",
        "/api/v1/telemetry",
    ):
        for bad in (0, -1, 1001, "x"):
            assert "limit" in error(api.get(path, params={"limit": bad}), "invalid_request"), (path, bad)
    assert len(devices(limit=1000).json()["items"]) == 1
    assert "state" in error(devices(state="sleeping"), "invalid_request")
    assert "online" in error(devices(online="maybe"), "invalid_request")
    assert "since" in error(
        api.get("/api/v1/audit", params={"since": "2026-01-01T00:00:00"}), "invalid_request"
    )
    assert "state" in error(api.get("/api/v1/rollouts", params={"state": "done"}), "invalid_request")


def test_every_list_pages_and_filters(
    make_server: Callable[..., ServerThread], keydir: KeyDir, tmp_path: Path
) -> None:
    srv = make_server(auth_required=True)
    admin = httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {srv.admin_token}"})
    release = keydir.key("release")
    for version, hw in (("1", "rpi4"), ("2", "jetson"), ("3", "imx8")):
        r = upload(admin, make_bundle(tmp_path / version, release, version=version, hardware_ids=(hw,)))
        assert r.status_code == 201, r.text
        for k in range(3):
            register(admin, f"{hw}-{k}", hw)
    upload(admin, make_bundle(tmp_path / "other", release, name="cls", hardware_ids=("rpi4",)))
    for version in ("1", "2", "3"):
        assert (
            admin.post("/api/v1/rollouts", json={"model": f"det:{version}", "stages": [50, 100]}).status_code
            == 201
        )
    for k in range(5):
        admin.post("/api/v1/tokens", json={"name": f"t{k}", "role": ("viewer", "operator")[k % 2]})

    models, pages = all_pages(admin, "/api/v1/models", 1)
    assert [f"{m['name']}:{m['version']}" for m in models] == [
        "cls:1",
        "det:1",
        "det:2",
        "det:3",
    ] and pages == 4
    assert [m["version"] for m in all_pages(admin, "/api/v1/models", 2, name="det")[0]] == ["1", "2", "3"]

    rollouts, pages = all_pages(admin, "/api/v1/rollouts", 2)
    assert [r["model"] for r in rollouts] == ["det:1", "det:2", "det:3"] and pages == 2
    first = rollouts[0]["id"]
    assert admin.post(f"/api/v1/rollouts/{first}/abort").status_code == 200
    assert [r["id"] for r in all_pages(admin, "/api/v1/rollouts", 5, state="aborted")[0]] == [first]
    assert [r["model"] for r in all_pages(admin, "/api/v1/rollouts", 5, model="det:2")[0]] == ["det:2"]

    devices, pages = all_pages(admin, f"/api/v1/rollouts/{first}/devices", 1)
    assert [d["device_id"] for d in devices] == ["rpi4-0", "rpi4-1", "rpi4-2"] and pages == 3
    assert all(set(d) == {"device_id", "state", "stage", "attempts", "reason", "updated_at"} for d in devices)
    by_state = all_pages(admin, f"/api/v1/rollouts/{first}/devices", 5, state="pending")[0]
    assert {d["device_id"] for d in by_state} == {d["device_id"] for d in devices if d["state"] == "pending"}
    decisions = all_pages(admin, f"/api/v1/rollouts/{first}/decisions", 1)[0]
    assert decisions[0]["action"] == "created" and decisions[-1]["action"] == "abort"
    assert [
        d["action"] for d in all_pages(admin, f"/api/v1/rollouts/{first}/decisions", 5, action="abort")[0]
    ] == ["abort"]
    assert admin.get("/api/v1/rollouts/nope/devices").status_code == 404

    tokens, pages = all_pages(admin, "/api/v1/tokens", 2)
    assert [t["name"] for t in tokens] == [f"t{k}" for k in range(5)] and pages == 3
    assert all(t["token"] is None for t in tokens)
    assert [t["name"] for t in all_pages(admin, "/api/v1/tokens", 5, role="operator")[0]] == ["t1", "t3"]

    audit, _ = all_pages(admin, "/api/v1/audit", 3)
    assert [e["id"] for e in audit] == sorted(e["id"] for e in audit) and len(audit) >= 16
    token_calls = all_pages(admin, "/api/v1/audit", 2, path="/api/v1/tokens", method="POST", result="ok")[0]
    assert len(token_calls) == 5 and all(e["path"] == "/api/v1/tokens" for e in token_calls)
    assert all_pages(admin, "/api/v1/audit", 5, path="/api/v1/t%", method="POST")[0] == []  # not a wildcard
    aborts = all_pages(admin, "/api/v1/audit", 5, path=f"/api/v1/rollouts/{first}/")[0]
    assert [e["path"] for e in aborts] == [f"/api/v1/rollouts/{first}/abort"]
    assert all_pages(admin, "/api/v1/audit", 5, actor="someone-else")[0] == []
    at = datetime.fromisoformat(token_calls[2]["ts"])
    since = all_pages(admin, "/api/v1/audit", 50, since=at.isoformat(), path="/api/v1/tokens")[0]
    until = all_pages(admin, "/api/v1/audit", 50, until=at.isoformat(), path="/api/v1/tokens")[0]
    assert [e["id"] for e in until + since] == [e["id"] for e in token_calls]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert all_pages(admin, "/api/v1/audit", 5, since=future)[0] == []
    after = all_pages(admin, "/api/v1/audit", 2, after_id=token_calls[2]["id"], path="/api/v1/tokens")[0]
    assert [e["id"] for e in after] == [e["id"] for e in token_calls[3:]]
    with ApiClient(srv.url, token=srv.admin_token) as client:
        assert [e["id"] for e in client.audit(limit=None)] == [e["id"] for e in audit] + [
            e["id"] for e in client.audit(limit=None, after_id=audit[-1]["id"])
        ]
        assert len(client.audit(limit=4)) == 4
        assert len(client.tokens()) == 5 and len(client.rollout_devices(first)) == 3

    empty, pages = all_pages(admin, "/api/v1/telemetry", 1)
    assert empty == [] and pages == 1
    assert admin.get("/api/v1/telemetry", params={"model": "nope:1"}).status_code == 404
    admin.close()
