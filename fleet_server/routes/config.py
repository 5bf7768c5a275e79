"""``/api/v1/config``: declarative configuration. Operators (and admins) apply, viewers read.

An apply is a POST, so the audit log keeps each call with a one-line summary; the history of
applies keeps the documents and diffs themselves (``fleet_server.config_store``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from sqlmodel import Session

from fleet_server import config_store, declarative
from fleet_server.auth import Principal, require
from fleet_server.config_schemas import (
    ApplyIn,
    ApplyOut,
    ApplyPage,
    ApplyRecordOut,
    DocumentOut,
    DocumentPage,
    HistoryOut,
)
from fleet_server.declarative import Action
from fleet_server.models import ConfigApply, ConfigDocument
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.routes.common import API, Ctx, Cursor, Db, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses

router = admin_router(f"{API}/config", tags=["config"])

Operator = Annotated[Principal, Depends(require("operator"))]
KindPath = Annotated[
    str, Path(description="the kind (Model, RolloutPolicy, SLO, HardwareTargets)", max_length=64)
]
NamePath = Annotated[str, Path(description="the document's name", max_length=64)]


def apply_out(row: ConfigApply) -> ApplyOut:
    return ApplyOut(
        id=row.id or 0,
        dry_run=False,
        ts=row.ts,
        actor=row.actor,
        source=row.source,
        changes=row.changes,  # type: ignore[arg-type]
    )


def document_out(row: ConfigDocument) -> DocumentOut:
    return DocumentOut(
        kind=row.kind,
        name=row.name,
        generation=row.generation,
        created_at=row.created_at,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
        apply_id=row.apply_id,
        document=row.body,
    )


@router.post(
    "/apply",
    response_model=ApplyOut,
    responses=error_responses(409, 413, 422),
    summary="Apply declarative configuration",
)
def post_apply(body: ApplyIn, request: Request, c: Ctx, session: Db, who: Operator) -> ApplyOut:
    """Validate the documents, store the changed ones and enact them (an SLO document creates or
    changes the SLO, an Experiment document starts the experiment), in one transaction; an
    unchanged document is left alone, so applying the same documents again changes nothing. With
    ``dry_run`` nothing is stored. 422 ``invalid_document`` names the document and field; 409
    ``experiment_running`` refuses a changed Experiment while one of its name runs."""
    # under the engine's lock, as the experiments route: an Experiment document assigns devices,
    # which the engine's tick and other creations must not see half done
    with c.lock:
        done = config_store.apply(session, body.documents, who.actor, body.source, dry_run=body.dry_run)
    counts = {a: sum(c.action is a for c in done.changes) for a in Action}
    summary = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
    request.state.audit_detail = (
        f"{'dry run' if body.dry_run else f'apply {done.id}'}: {summary} ({body.source or 'no source'})"
    )
    return ApplyOut(
        id=done.id or 0,
        dry_run=body.dry_run,
        ts=done.row.ts if done.row is not None else None,
        actor=who.actor,
        source=body.source,
        changes=[c.to_dict() for c in done.changes],  # type: ignore[misc]
    )


@router.get("/schema", summary="The fleet file's JSON schema")
def get_schema() -> dict[str, Any]:
    """The published JSON schema of one document (the same file as docs/schema/fleet.schema.json)."""
    return declarative.fleet_schema()


@router.get("/documents", response_model=DocumentPage, summary="List applied documents")
def get_documents(
    session: Db,
    kind: Annotated[str | None, Query(max_length=64, description="only this kind's")] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> DocumentPage:
    """The live documents by kind and name, a page at a time."""
    return page_out(
        DocumentPage, config_store.list_documents(session, kind, cursor=cursor, limit=limit), document_out
    )


@router.get(
    "/documents/{kind}/{name}",
    response_model=DocumentOut,
    responses=error_responses(404),
    summary="Get an applied document",
)
def get_document(kind: KindPath, name: NamePath, session: Db) -> DocumentOut:
    """One live document, its spec with every default filled in, and the applies that changed it."""
    row = config_store.find_document(session, kind, name)
    return document_out(row).model_copy(
        update={"effective": config_store.effective_spec(row), "history": _history(session, kind, name)}
    )


def _history(session: Session, kind: str, name: str) -> list[HistoryOut]:
    return [
        HistoryOut(
            apply_id=row.id or 0,
            ts=row.ts,
            actor=row.actor,
            source=row.source,
            action=c["action"],
            diff=c["diff"],
        )
        for row, c in config_store.history(session, kind, name)
    ]


@router.get("/applies", response_model=ApplyPage, summary="List applies")
def get_applies(session: Db, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT) -> ApplyPage:
    """Every apply, oldest first: who, when, from where, and what each document did."""
    return page_out(ApplyPage, config_store.list_applies(session, cursor=cursor, limit=limit), apply_out)


@router.get(
    "/applies/{apply_id}",
    response_model=ApplyRecordOut,
    responses=error_responses(404),
    summary="Get an apply",
)
def get_apply(
    apply_id: Annotated[str, Path(pattern="^[0-9]{1,18}$", description="the apply's number", examples=["7"])],
    session: Db,
) -> ApplyRecordOut:
    """One apply with the documents as they were sent."""
    row = config_store.find_apply(session, int(apply_id))
    return ApplyRecordOut(**apply_out(row).model_dump(), documents=row.documents)


__all__ = ["router"]
