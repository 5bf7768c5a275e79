"""``/openapi.json`` is a reference a user can read, and ``/docs`` works without the internet.

Read from a running server over HTTP: every schema, property, parameter and operation is
described; request bodies and the main responses carry examples that the API itself accepts;
every tag is described; the bearer scheme is declared; lists take the same paging parameters.
"""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from edgefleet.broker import BrokerInfo
from fleet_server import config_schemas, experiment_schemas, schemas, slo_schemas
from fleet_server.paging import DEFAULT_LIMIT, MAX_LIMIT
from fleet_server.runner import ServerThread
from fleet_server.tls_context import default_verify_context
from signing.keyring import KeyDir

from .conftest import server_settings

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def document(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return dict(r.json())


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        if method in METHODS
    ]


def test_every_schema_and_property_is_described(document: dict[str, Any]) -> None:
    missing = []
    for name, schema in document["components"]["schemas"].items():
        if not schema.get("description", "").strip():
            missing.append(name)
        for prop, spec in schema.get("properties", {}).items():
            if not spec.get("description", "").strip():
                missing.append(f"{name}.{prop}")
    assert missing == [], f"schemas and properties without a description: {missing}"
    assert len(document["components"]["schemas"]) >= 30


def test_every_operation_has_a_summary_a_description_and_described_parameters(
    document: dict[str, Any],
) -> None:
    missing = []
    for method, path, op in operations(document):
        if not op.get("summary", "").strip():
            missing.append(f"{method} {path}: summary")
        if not op.get("description", "").strip():
            missing.append(f"{method} {path}: description")
        for param in op.get("parameters", []):
            if not param.get("description", "").strip():
                missing.append(f"{method} {path}: parameter {param['name']}")
    assert missing == [], missing
    # a summary is written for people, not derived from the function's name ("List Devices")
    summaries = [op["summary"] for _, _, op in operations(document)]
    assert len(set(summaries)) == len(summaries)
    assert not [s for s in summaries if s.istitle() and " " in s]


def test_tags_are_declared_with_descriptions(document: dict[str, Any]) -> None:
    declared = {t["name"]: t.get("description", "") for t in document["tags"]}
    used = {tag for _, _, op in operations(document) for tag in op.get("tags", [])}
    assert used == set(declared), (used, set(declared))
    assert all(text.strip() for text in declared.values())
    assert "Lists" in document["info"]["description"] and "Bearer" in document["info"]["description"]


def test_bearer_scheme_is_declared_and_required_by_admin_routes(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": schemes["HTTPBearer"]["description"],
        }
    }
    for method, path, op in operations(document):
        # artifacts are public; capture uploads are signed by the device itself, not a bearer
        if path.startswith("/api/v1/") and not path.startswith(("/api/v1/artifacts/", "/api/v1/captures/")):
            assert op.get("security") == [{"HTTPBearer": []}], (method, path)


def _model(name: str) -> type[BaseModel] | None:
    found = (
        getattr(schemas, name, None)
        or getattr(slo_schemas, name, None)
        or getattr(config_schemas, name, None)
        or getattr(experiment_schemas, name, None)
    )
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def test_examples_are_given_and_valid(document: dict[str, Any]) -> None:
    components = document["components"]["schemas"]
    bodies = {
        "DeviceIn",
        "TagsIn",
        "RolloutIn",
        "TokenIn",
        "SloIn",
        "PlannedWindowIn",
        "OverrideIn",
        "LabelsIn",
        "CaptureBatchIn",
        "ApplyIn",
        "ExperimentIn",
        "StopIn",
    }
    responses = {"DeviceOut", "ModelOut", "RolloutOut", "AggregateOut", "TokenOut", "AuditOut", "ErrorOut"}
    pages = {"DevicePage", "ModelPage", "RolloutPage", "AggregatePage"}
    for name in bodies | responses | pages:
        examples = components[name].get("examples")
        assert examples, f"{name} has no example"
        model = _model(name)
        assert model is not None
        for example in examples:
            model.model_validate(example)  # an example that does not validate would mislead
    for method, path, op in operations(document):
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            assert body["schema"]["$ref"].rsplit("/", 1)[-1] in bodies, (method, path)


def test_the_request_body_examples_are_accepted(client: httpx.Client, document: dict[str, Any]) -> None:
    components = document["components"]["schemas"]
    device = components["DeviceIn"]["examples"][0]
    assert client.post("/api/v1/devices", json=device).status_code == 201
    tags = components["TagsIn"]["examples"][0]
    assert client.put(f"/api/v1/devices/{device['device_id']}/tags", json=tags).status_code == 200
    token = client.post("/api/v1/tokens", json=components["TokenIn"]["examples"][0])
    assert token.status_code == 201, token.text
    rollout = client.post("/api/v1/rollouts", json=components["RolloutIn"]["examples"][0])
    assert (
        rollout.status_code == 404 and rollout.json()["detail"]["code"] == "model_not_found"
    )  # valid, no model


def test_every_list_takes_the_same_paging_parameters(document: dict[str, Any]) -> None:
    def answer(op: dict[str, Any]) -> str:
        schema = op["responses"]["200"].get("content", {}).get("application/json", {}).get("schema", {})
        return str(schema.get("$ref", "")).rsplit("/", 1)[-1]

    lists = [
        (path, op)
        for method, path, op in operations(document)
        if method == "GET" and answer(op).endswith("Page")
    ]
    assert len(lists) == 18, [p for p, _ in lists]
    for path, op in lists:
        params = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
        limit = params["limit"]["schema"]
        assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, MAX_LIMIT, DEFAULT_LIMIT), path
        assert "cursor" in params, path
        assert set(document["components"]["schemas"][answer(op)]["required"]) == {"items", "next"}, path


def test_docs_and_redoc_are_served_without_a_cdn(server: ServerThread, client: httpx.Client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200 and "openapi.json" in html.text
        scripts = re.findall(r'src="([^"]+)"', html.text)
        assert scripts and all(s.startswith("/") for s in scripts), scripts  # nothing from another host
        for src in scripts:
            asset = client.get(src)
            assert asset.status_code == 200 and len(asset.content) > 100_000, src


def test_a_stopped_server_leaves_nothing_alive(
    tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo
) -> None:
    """FastAPI keeps every route callable it classified in a process-wide LRU: a route handler
    closing over its app would keep each stopped server (its engine, context, route table) alive
    for the life of the process."""
    srv = ServerThread(server_settings(tmp_path, keydir, broker_info)).start()
    try:
        docs = httpx.get(f"{srv.url}/docs", verify=default_verify_context()).status_code
        app = weakref.ref(srv.app)
    finally:
        srv.stop()
    assert srv._thread is not None and not srv._thread.is_alive(), "the server thread ended"
    del srv  # the assert below must not hold it in a temporary of its own
    gc.collect()
    alive = app() is not None
    assert docs == 200
    assert not alive


def test_the_docs_pages_follow_the_proxys_prefix(
    tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo
) -> None:
    """Behind a proxy serving the API under a prefix (``root_path``, with or without its trailing
    slash) every URL the pages load carries it once."""
    import asyncio

    from fleet_server.app import create_app

    app = create_app(server_settings(tmp_path, keydir, broker_info))

    async def pages(root: str) -> tuple[str, str, int]:
        transport = httpx.ASGITransport(app=app, root_path=root)  # what uvicorn --root-path passes on
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet.example") as http:
            docs, redoc = await http.get("/docs"), await http.get("/redoc")
            redirect = await http.get("/docs/oauth2-redirect")
        return docs.text, redoc.text, redirect.status_code

    for root in ("/proxy", "/proxy/"):
        docs, redoc, redirect = asyncio.run(pages(root))
        assert redirect == 200
        assert "/proxy/openapi.json" in docs and "/proxy/docs/oauth2-redirect" in docs
        assert "/proxy/static-offline-docs/swagger-ui-bundle.js" in docs
        assert "/proxy/openapi.json" in redoc and "/proxy/static-offline-docs/redoc.standalone.js" in redoc
        assert "/proxy//" not in docs + redoc
