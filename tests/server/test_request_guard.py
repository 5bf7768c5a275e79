"""Hardened inputs over real HTTP: auth before the body, bounded bodies, bounded JSON, one error shape.

The byte counts are measured on both sides: the server's count is what its ASGI app pulled
from uvicorn (a counting layer outside everything else), the client's is what the request
generator yielded before the server hung up.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.broker import BrokerInfo
from fleet_server import devices
from fleet_server.context import BodyLimits
from fleet_server.routes import ROUTERS
from fleet_server.routes.guard import GuardedRoute
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import make_bundle, server_settings, upload

GIB = 1 << 30
MIB = 1 << 20


class PulledBytes:
    """Outermost ASGI layer: counts the request body bytes the app asked uvicorn for."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.total = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.total += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@pytest.fixture
def counted_server(
    tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo
) -> Iterator[tuple[ServerThread, PulledBytes]]:
    srv = ServerThread(server_settings(tmp_path, keydir, broker_info, auth_required=True))
    pulled: list[PulledBytes] = []

    def counting(app: Any) -> PulledBytes:
        pulled.append(PulledBytes(app))
        return pulled[0]

    srv.app.add_middleware(counting)  # added last: outermost, before the stack is built
    srv.start()
    try:
        yield srv, pulled[0]
    finally:
        srv.stop()


class Stream:
    """A request body of ``total`` bytes in 1 MiB chunks, counting what the client got to send."""

    def __init__(self, total: int, head: bytes = b"") -> None:
        self.total, self.head, self.sent = total, head, 0

    def __iter__(self) -> Iterator[bytes]:
        chunk = b"\0" * MIB
        yield self.head
        self.sent += len(self.head)
        while self.sent < self.total:
            yield chunk
            self.sent += len(chunk)


MULTIPART = {"Content-Type": "multipart/form-data; boundary=b0undary"}
PART = b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="model.onnx"\r\n\r\n'


def _error(r: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"detail"} and set(body["detail"]) == {"code", "message"}, body
    assert body["detail"]["code"] == code, body
    return dict(body["detail"])


def test_unauthenticated_multi_gb_upload_is_refused_before_the_body_is_read(
    counted_server: tuple[ServerThread, PulledBytes],
) -> None:
    srv, pulled = counted_server
    body = Stream(4 * GIB, PART)
    with httpx.Client(base_url=srv.url, timeout=30) as anon:
        r = anon.post("/api/v1/models", content=body, headers=MULTIPART)
    _error(r, 401, "unauthenticated")
    assert r.headers["connection"] == "close"  # hung up instead of draining the body
    assert pulled.total == 0
    # what the client pushed before the server hung up: socket buffers, nowhere near the 4 GiB
    assert body.sent < 64 * MIB, body.sent
    print(f"unauthenticated 4 GiB upload: client sent {body.sent} bytes, server pulled {pulled.total}")
    assert not any(Path(srv.settings.upload_tmp_dir).glob("*"))
    with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": "Bearer ef_nope"}) as wrong:
        _error(
            wrong.post("/api/v1/models", content=Stream(GIB, PART), headers=MULTIPART), 401, "invalid_token"
        )
    assert pulled.total == 0


def test_a_viewer_cannot_push_a_body_either(
    counted_server: tuple[ServerThread, PulledBytes],
) -> None:
    srv, pulled = counted_server
    with httpx.Client(base_url=srv.url, timeout=30, headers=_bearer(srv.admin_token)) as admin:
        viewer = admin.post("/api/v1/tokens", json={"name": "eyes", "role": "viewer"}).json()["token"]
    before = pulled.total
    with httpx.Client(base_url=srv.url, timeout=30, headers=_bearer(viewer)) as v:
        _error(v.post("/api/v1/models", content=Stream(GIB, PART), headers=MULTIPART), 403, "forbidden")
    assert pulled.total == before


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_body_limits_content_length_up_front_and_counted_while_streaming(
    counted_server: tuple[ServerThread, PulledBytes],
) -> None:
    srv, pulled = counted_server
    srv.context.limits = BodyLimits(request=64 * 1024, upload=2 * MIB)
    with httpx.Client(base_url=srv.url, timeout=30, headers=_bearer(srv.admin_token)) as admin:
        # announced too large: refused before a byte is read
        announced = {**MULTIPART, "Content-Length": str(5 * GIB)}
        r = admin.post("/api/v1/models", content=Stream(5 * GIB, PART), headers=announced)
        _error(r, 413, "body_too_large")
        assert pulled.total == 0
        # chunked (no length announced): cut off once the count passes the limit
        body = Stream(GIB, PART)
        r = admin.post("/api/v1/models", content=body, headers=MULTIPART)
        _error(r, 413, "body_too_large")
        assert 2 * MIB < pulled.total <= 2 * MIB + 2 * MIB, pulled.total
        assert body.sent < 64 * MIB
        assert not any(Path(srv.settings.upload_tmp_dir).glob("*"))
        # JSON bodies have their own, smaller limit, enforced the same way
        before = pulled.total
        big = b'{"device_id": "d", "hardware_id": "rpi4", "tags": {"k": "' + b"v" * (128 * 1024) + b'"}}'
        _error(admin.post("/api/v1/devices", content=iter([big])), 413, "body_too_large")
        assert pulled.total - before <= 64 * 1024 + 128 * 1024
        # under the limits everything still works
        assert (
            admin.post("/api/v1/devices", json={"device_id": "d", "hardware_id": "rpi4"}).status_code == 201
        )


@pytest.fixture
def admin(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers=_bearer(server.admin_token)) as c:
        yield c


DEEP = b"[" * 100_000 + b"]" * 100_000


def test_untrusted_json_is_bounded(admin: httpx.Client) -> None:
    for body in (DEEP, b'{"device_id": ' + DEEP + b"}", b"{not json", b"[1, 2"):
        r = admin.post("/api/v1/devices", content=body, headers={"Content-Type": "application/json"})
        _error(r, 400, "invalid_request")
    # numbers a database column or JSON itself cannot hold
    for value in (b"9223372036854775808", b"-9223372036854775809", b"NaN", b"Infinity", b"1" * 5000):
        r = admin.post(
            "/api/v1/rollouts",
            content=b'{"model": "m:1", "min_inferences": ' + value + b"}",
            headers={"Content-Type": "application/json"},
        )
        _error(r, 400, "invalid_request")
    ok = b'{"model": "nope:1", "min_inferences": 9223372036854775807}'
    r = admin.post("/api/v1/rollouts", content=ok, headers={"Content-Type": "application/json"})
    _error(r, 404, "model_not_found")  # in range: it got past parsing to the service


def test_deep_targets_metadata_is_refused_not_crashed(admin: httpx.Client) -> None:
    r = admin.post("/api/v1/tuf/targets", files=[("targets", ("targets.json", DEEP, "application/json"))])
    _error(r, 400, "metadata_invalid")


def test_deep_envelope_upload_is_a_4xx(admin: httpx.Client) -> None:
    r = admin.post(
        "/api/v1/models",
        files=[("envelope", ("bundle.dsse.json", DEEP, "application/json")), ("files", ("m.onnx", b"x"))],
    )
    assert 400 <= r.status_code < 500, r.text[:300]
    _error(r, r.status_code, r.json()["detail"]["code"])


def test_integers_are_range_checked(admin: httpx.Client) -> None:
    assert admin.get("/api/v1/audit", params={"after_id": 2**63 - 1}).json()["items"] == []
    for value in (2**63, 10**40, -1):
        _error(admin.get("/api/v1/audit", params={"after_id": value}), 400, "invalid_request")
    _error(admin.get("/api/v1/audit", params={"limit": 10**6}), 400, "invalid_request")


def test_framework_errors_keep_the_contract_shape(admin: httpx.Client) -> None:
    _error(admin.get("/api/v1/nothing-here"), 404, "not_found")
    for method in ("OPTIONS", "PATCH", "DELETE"):
        r = admin.request(method, "/api/v1/devices")
        _error(r, 405, "method_not_allowed")
        assert r.headers["allow"] == "GET, POST", r.headers["allow"]
    assert admin.options("/api/v1/tokens/abc").headers["allow"] == "DELETE"
    bad_multipart = [
        ({"Content-Type": "multipart/form-data"}, b"no boundary"),
        ({"Content-Type": "multipart/form-data; boundary=xx"}, b"--xx\r\n-1.5--xx--\r\n"),
        ({"Content-Type": "application/json"}, b'{"envelope": 1}'),
    ]
    for headers, content in bad_multipart:
        _error(admin.post("/api/v1/models", content=content, headers=headers), 400, "invalid_request")
    # a refused, unparseable request: a 400 with a reason, never FastAPI's bare string
    message = _error(admin.post("/api/v1/tokens", json={"name": "", "role": "root"}), 400, "invalid_request")
    assert "role" in message["message"] and "name" in message["message"]


def test_an_unexpected_failure_is_a_500_in_the_contract_shape(
    admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> list[Any]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(devices, "list_devices", broken)
    message = _error(admin.get("/api/v1/devices"), 500, "internal_error")
    assert "fire" not in message["message"]  # internals stay in the server log


def test_artifacts_and_delivery_metadata_are_public_reads(
    make_server: Callable[..., ServerThread], keydir: KeyDir, tmp_path: Path
) -> None:
    srv = make_server(auth_required=True)
    release = keydir.key("release")
    with httpx.Client(base_url=srv.url, timeout=30, headers=_bearer(srv.admin_token)) as admin:
        sha = upload(admin, make_bundle(tmp_path, release)).json()["sha256"]
    with httpx.Client(base_url=srv.url, timeout=30) as anon:
        assert anon.get(f"/api/v1/artifacts/{sha}").status_code == 200
        assert json.loads(anon.get(f"/api/v1/artifacts/{sha}/envelope").content)["signatures"]
        assert anon.get("/tuf/metadata/1.root.json").status_code == 200
        # the server's local mirror (static delivery): the same files, published
        mirrored = anon.get(f"/mirror/bundles/{sha}/model")
        assert mirrored.status_code == 200 and "immutable" in mirrored.headers["cache-control"]
        assert anon.get("/mirror/%2e%2e/tuf/metadata/1.root.json").status_code == 404  # never out of it
        _error(anon.get("/api/v1/artifacts/not-a-sha"), 400, "invalid_request")
        _error(anon.get("/api/v1/models"), 401, "unauthenticated")
    spec = srv.app.openapi()
    public = {p for p, ops in spec["paths"].items() for op in ops.values() if "security" not in op}
    assert public == {
        "/healthz",
        "/readyz",  # probes carry no token; it names no device, model or secret
        "/metrics",  # scrapers: open unless metrics_token is set; nginx keeps it off the public side
        "/api/v1/artifacts/{sha256}",
        "/api/v1/artifacts/{sha256}/envelope",
        "/api/v1/artifacts/{sha256}/files/{name}",  # a bundle's other signed files (the golden set)
        "/tuf/metadata/{name}",
        "/tuf/targets/{target}",
        "/mirror/{key}",  # the published tree, if this server is listed as a mirror
        "/api/v1/captures/{device_id}/{batch_id}",  # no bearer: the device signs it
    }


def test_every_route_is_guarded() -> None:
    routes = [r for router in ROUTERS for r in router.routes]
    assert len(routes) >= 29 and all(isinstance(r, GuardedRoute) for r in routes)
    kinds = {
        (method, r.path): r.body_kind
        for r in routes
        if isinstance(r, GuardedRoute)
        for method in r.methods or ()
    }
    assert kinds[("POST", "/api/v1/models")] == kinds[("POST", "/api/v1/tuf/targets")] == "upload"
    assert kinds[("POST", "/api/v1/devices")] == kinds[("POST", "/api/v1/rollouts")] == "json"
    assert kinds[("GET", "/api/v1/devices")] == "none"
