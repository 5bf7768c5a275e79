"""Admin API auth: 401 without a token, 403 for the wrong role, on every admin route; the audit log."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlmodel import select
from typer.testing import CliRunner

from edgefleet.cli import app as cli
from edgefleet.client import ApiClient, ApiError
from fleet_server.models import ApiToken
from fleet_server.runner import ServerThread
from fleet_server.store import new_session
from signing.keyring import KeyDir

from .conftest import make_bundle, register, upload

DEVICE_FACING = re.compile(
    r"^/api/v1/artifacts/|^/tuf/|^/api/v1/captures/\{device_id\}"
)  # uploads: device-signed


def _admin_routes(srv: ServerThread) -> list[tuple[str, str]]:
    """Every /api/v1 operation the app documents (the OpenAPI schema lists them all), minus device routes."""
    paths = srv.app.openapi()["paths"]
    return [
        (method.upper(), path)
        for path, ops in paths.items()
        if path.startswith("/api/v1") and not DEVICE_FACING.match(path)
        for method in ops
    ]


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def _client(srv: ServerThread, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=srv.url, timeout=10, headers=headers)


def test_every_admin_route_needs_a_token_when_auth_is_required(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(auth_required=True)
    routes = _admin_routes(srv)
    assert len(routes) >= 20 and ("GET", "/api/v1/audit") in routes and ("POST", "/api/v1/tokens") in routes
    with _client(srv) as anon, _client(srv, "ef_not-a-real-token") as wrong:
        for method, path in routes:
            for c, code in ((anon, "unauthenticated"), (wrong, "invalid_token")):
                r = c.request(method, _fill(path))
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.json()["detail"]["code"] == code and r.headers["www-authenticate"] == "Bearer"


def test_roles_viewer_operator_admin(
    make_server: Callable[..., ServerThread], keydir: KeyDir, tmp_path: Path
) -> None:
    srv = make_server(auth_required=True)
    with ApiClient(srv.url, token=srv.admin_token) as admin:
        viewer = admin.create_token("dashboards", "viewer")
        operator = admin.create_token("ci", "operator")
    assert viewer["token"].startswith("ef_") and viewer["role"] == "viewer"
    with _client(srv, viewer["token"]) as v, _client(srv, operator["token"]) as o:
        assert v.get("/api/v1/devices").status_code == 200
        assert v.get("/api/v1/audit").status_code == 200
        r = v.post("/api/v1/devices", json={"device_id": "d1", "hardware_id": "rpi4", "tags": {}})
        assert r.status_code == 403 and r.json()["detail"]["code"] == "forbidden"
        assert upload(v, make_bundle(tmp_path / "b", keydir.key("release"))).status_code == 403
        assert register(o, "d1")["device_id"] == "d1"
        assert o.get("/api/v1/tokens").status_code == 403  # tokens are the admin's
        assert o.post("/api/v1/tokens", json={"name": "x", "role": "admin"}).status_code == 403
        # device-facing routes need no admin token: their own rules apply
        assert v.get("/tuf/metadata/1.root.json").status_code == 200
        with _client(srv) as anon:
            assert anon.get("/tuf/metadata/root.json").status_code == 200
            assert anon.get(f"/api/v1/artifacts/{'0' * 64}").json()["detail"]["code"] == "artifact_not_found"
    # revocation takes effect at once
    with ApiClient(srv.url, token=srv.admin_token) as admin:
        admin.revoke_token(operator["id"])
        listed = {t["id"]: t for t in admin.tokens()}
    assert listed[operator["id"]]["revoked_at"] is not None
    assert all(t["token"] is None for t in listed.values())  # secrets are shown once, at creation
    with ApiClient(srv.url, token=operator["token"]) as gone, pytest.raises(ApiError) as exc:
        gone.devices()
    assert (exc.value.status, exc.value.code) == (401, "invalid_token")
    # only hashes are stored
    with new_session(srv.context.engine) as session:
        rows = session.exec(select(ApiToken)).all()
    assert {r.token_hash for r in rows}.isdisjoint({viewer["token"], operator["token"]})
    assert all(len(r.token_hash) == 64 for r in rows)


def test_audit_log_records_every_mutating_call(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(auth_required=True)
    with ApiClient(srv.url, token=srv.admin_token) as admin:
        viewer = admin.create_token("eyes", "viewer")
        admin.register_device("aud-1", "rpi4")
        with pytest.raises(ApiError):
            admin.create_rollout(model="nope:1", selector={}, stages=[100])
    with _client(srv, viewer["token"]) as v, _client(srv) as anon:
        v.put("/api/v1/devices/aud-1/tags", json={"tags": {"a": "b"}})
        anon.post("/api/v1/devices", json={"device_id": "x", "hardware_id": "rpi4", "tags": {}})
        v.get("/api/v1/devices")  # reads are not audited
        log = v.get("/api/v1/audit").json()["items"]
    got = [(e["actor"], e["method"], e["path"], e["status"], e["result"]) for e in log]
    assert got == [
        ("bootstrap-admin", "POST", "/api/v1/tokens", 201, "ok"),
        ("bootstrap-admin", "POST", "/api/v1/devices", 201, "ok"),
        ("bootstrap-admin", "POST", "/api/v1/rollouts", 404, "model_not_found"),
        (f"{viewer['id']}:eyes", "PUT", "/api/v1/devices/aud-1/tags", 403, "forbidden"),
        ("unauthenticated", "POST", "/api/v1/devices", 401, "unauthenticated"),
    ]
    assert all(e["ts"] for e in log) and [e["id"] for e in log] == sorted(e["id"] for e in log)
    # CLI: audit list --json, paged by id
    out = CliRunner().invoke(
        cli,
        [
            "audit",
            "list",
            "--json",
            "--server",
            srv.url,
            "--token",
            srv.admin_token,
            "--after-id",
            str(log[1]["id"]),
        ],
    )
    assert out.exit_code == 0, out.output
    import json

    assert [e["id"] for e in json.loads(out.stdout)] == [e["id"] for e in log[2:]]


def test_auth_off_lets_tokenless_calls_through_but_still_checks_tokens(server: ServerThread) -> None:
    assert server.settings.auth_required is False
    with _client(server) as anon, _client(server, "ef_wrong") as wrong:
        assert anon.get("/api/v1/devices").status_code == 200
        assert register(anon, "open-1")["device_id"] == "open-1"
        assert wrong.get("/api/v1/devices").status_code == 401
        assert anon.get("/api/v1/audit").json()["items"][-1]["actor"] == "anonymous"


def test_bootstrap_token_file_and_setting(make_server: Callable[..., ServerThread], tmp_path: Path) -> None:
    srv = make_server()
    path = Path(srv.settings.data_dir) / "admin.token"
    assert path.read_text().strip() == srv.admin_token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    srv.stop()
    again = make_server()  # the same data dir: the same token
    assert again.admin_token == srv.admin_token
    again.stop()
    fixed = make_server(
        admin_token="ef_from-the-environment", data_dir=tmp_path / "other", auth_required=True
    )
    assert (
        fixed.admin_token == "ef_from-the-environment" and not (tmp_path / "other" / "admin.token").exists()
    )
    with ApiClient(fixed.url, token="ef_from-the-environment") as c:
        assert c.devices() == []


def test_cli_tokens_and_env_token(
    make_server: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = make_server(auth_required=True)
    runner = CliRunner()
    monkeypatch.setenv("EDGEFLEET_TOKEN", srv.admin_token)
    import json

    made = runner.invoke(
        cli, ["tokens", "create", "--name", "ops", "--role", "operator", "--server", srv.url, "--json"]
    )
    assert made.exit_code == 0, made.output
    token = json.loads(made.stdout)
    listed = runner.invoke(cli, ["tokens", "list", "--server", srv.url, "--json"])
    assert [t["name"] for t in json.loads(listed.stdout)] == ["ops"]
    assert runner.invoke(cli, ["tokens", "revoke", token["id"], "--server", srv.url]).exit_code == 0
    monkeypatch.setenv("EDGEFLEET_TOKEN", token["token"])
    refused = runner.invoke(cli, ["devices", "list", "--server", srv.url])
    assert refused.exit_code == 1 and "invalid_token" in refused.output
    bad_role = runner.invoke(
        cli,
        [
            "tokens",
            "create",
            "--name",
            "x",
            "--role",
            "root",
            "--server",
            srv.url,
            "--token",
            srv.admin_token,
        ],
    )
    assert bad_role.exit_code == 1 and "invalid_request" in bad_role.output


def test_auth_is_on_by_default() -> None:
    """A server started with no settings at all refuses anonymous admin calls."""
    from fleet_server.settings import ServerSettings

    assert ServerSettings().auth_required is True
