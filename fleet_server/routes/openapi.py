"""What ``/openapi.json`` says beyond the routes: the API's overview, one described tag per
resource, and descriptions for the multipart bodies FastAPI names itself.

``/docs`` (Swagger UI) and ``/redoc`` read this document; their scripts are served by the server
itself (``fastapi_offline``), so they work where no CDN is reachable. The bearer scheme comes
from the routes' auth dependency (``fleet_server.auth.bearer_scheme``): ``/docs`` shows an
Authorize button, and every call it makes then carries the token.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from fleet_server.paging import DEFAULT_LIMIT, MAX_LIMIT

DESCRIPTION = f"""
The fleet server's admin API: register devices, upload signed model bundles, run staged rollouts
and read what devices report. Devices themselves talk MQTT; the HTTP they use is the public
download of model files and signed delivery metadata, and the upload of captured inferences,
which each device signs with its own key (no token).

**Authentication.** Send `Authorization: Bearer <token>` (the Authorize button above). Roles,
ordered: `viewer` reads, `operator` also registers devices, uploads models and runs rollouts,
`admin` also manages tokens; `labeler` may only post labels. The first admin token is the server's
bootstrap token (`<data_dir>/admin.token`).

**Errors** are always `{{"detail": {{"code": "<snake_case>", "message": "..."}}}}`; branch on `code`.

**Lists** come a page at a time: `{{"items": [...], "next": "<cursor>"}}`. Pass `next` back as
`cursor` (with the same filters) for the following page; `next` is null on the last one. `limit`
is 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT}). Pages follow a fixed order on a unique key, so rows
added while you page never make another row appear twice or go missing.
"""

TAG_DESCRIPTIONS = {
    "devices": "Register devices, list and filter them, read what they report, re-tag them. Filters: a"
    " selector (`hw=rpi4,site=lab`), deployment state, online, running model.",
    "models": "Upload signed bundles (verified against the trusted release keys before anything is kept)"
    " and list the models the server holds.",
    "rollouts": "Staged rollouts: create one for a model and a selector, follow its stages, devices and"
    " decisions, and act on it (pause, resume, approve, abort, roll back).",
    "telemetry": "What devices report about the models they serve, aggregated per model, hardware id and"
    " rollout stage: the figures the rollout gates read.",
    "slos": "Service level objectives per model and cohort, their error budgets and burn-rate alerts,"
    " the alert delivery log, planned-rollout windows that hold notifications, and the override of"
    " the error-budget policy (docs/slo.md).",
    "labels": "Ground truth for inferences devices made (by the inference id the device returned),"
    " joined to their captured predictions. The `labeler` role may post labels and do nothing else.",
    "captures": "Captured inferences devices upload for retraining, signed with the device's own"
    " certificate (no bearer token): stored as sent and indexed by model, cohort, stage and time.",
    "experiments": "A/B experiments between model versions: arms with weights over a selector, per-arm"
    " metrics with always-valid intervals (watch them any time), guardrails that stop an arm, and the"
    " decision (docs/experiments.md).",
    "config": "Declarative configuration (`edgefleet apply`): documents in kubectl's shape (apiVersion,"
    " kind, metadata, spec) validated by the published schema, applied idempotently, each apply kept"
    " with its documents and diff. Operators apply, viewers read.",
    "tokens": "API tokens with roles (admin only). A token's secret is shown once, when it is created.",
    "audit": "The append-only trail of every mutating call: who, what, when, result.",
    "tuf": "Delivery metadata (TUF): the public repository devices verify against keys they already"
    " hold, and the upload of release-signed targets metadata.",
    "artifacts": "Model files and their signed envelopes, public: a device verifies every byte."
    " Resumable with `Range`.",
    "server": "This server: health for load balancers, ingest counters, replica and schema revision.",
}
"""One entry per router tag, in the order ``/docs`` lists them."""
TAGS: list[dict[str, Any]] = [{"name": n, "description": d} for n, d in TAG_DESCRIPTIONS.items()]

SCHEMA_DESCRIPTIONS = {
    "DeploymentState": "A device agent's state for its latest directive, as it reports it.",
    "RolloutState": "A rollout's state (docs/rollouts.md has the lifecycle diagram).",
    "DeviceRolloutState": "A targeted device's state in a rollout (docs/rollouts.md).",
}
"""Descriptions for schemas of enums defined where no API document is in view (the agent's wire
protocol, the lifecycle tables), used as query filters here."""


def install_openapi(app: FastAPI) -> None:
    """Give ``app``'s document its overview and tag descriptions, and describe generated bodies."""
    app.description = DESCRIPTION
    app.openapi_tags = TAGS
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            _add_raw_bodies(document)
            _describe_bodies(document)
            _describe_enums(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document


def _add_raw_bodies(document: dict[str, Any]) -> None:
    """The schemas of bodies a route reads as bytes (a signed upload): FastAPI does not see them."""
    from fleet_server.schemas import CaptureBatchIn

    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schema = CaptureBatchIn.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas["CaptureBatchIn"] = schema


def _describe_bodies(document: dict[str, Any]) -> None:
    """FastAPI names a multipart body's schema itself (``Body_<operation>``) and gives it no
    description: say whose body it is."""
    schemas = document.get("components", {}).get("schemas", {})
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                ref = content.get("schema", {}).get("$ref", "")
                schema = schemas.get(ref.rsplit("/", 1)[-1])
                if schema is not None and "description" not in schema:
                    schema["description"] = (
                        f"The {media} body of {method.upper()} {path}: {operation['summary']}."
                    )


def _describe_enums(document: dict[str, Any]) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for name, text in SCHEMA_DESCRIPTIONS.items():
        if name in schemas and "description" not in schemas[name]:
            schemas[name]["description"] = text


__all__ = ["DESCRIPTION", "TAGS", "TAG_DESCRIPTIONS", "install_openapi"]
