"""Applying declarative configuration: the live documents, each apply's history, and the kinds
whose documents act on the fleet when applied.

An apply runs in one transaction: every document is validated (``fleet_server.declarative``),
compared with the live one, and the changed ones are stored (their generation counts up) and
enacted by their kind's effect; the apply itself is kept (who, when, source, the documents,
what each did). A dry run does all of that and rolls it back, so it refuses exactly what the
apply would refuse. Most kinds only store their document (``edgefleet deploy`` reads ``Model``,
``RolloutPolicy``, ``HardwareTargets``); an ``SLO`` document creates or changes the SLO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_server import declarative, experiments, slos
from fleet_server.declarative import Action, Change, Document, DocumentSetError
from fleet_server.errors import Conflict, Invalid, NotFound
from fleet_server.experiment_schemas import ExperimentIn, ExperimentSpec
from fleet_server.models import ConfigApply, ConfigDocument, Experiment, utcnow
from fleet_server.named_windows import applied_windows
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.slo_schemas import SloIn

Effect = Callable[[Session, Document, str], None]
"""What applying a changed document of a kind does beyond storing it (raises a DomainError)."""


def _enact_slo(session: Session, doc: Document, actor: str) -> None:
    slos.put_slo(session, SloIn.model_validate({**doc.spec.model_dump(), "name": doc.name}), actor)


def _enact_experiment(session: Session, doc: Document, actor: str) -> None:
    """Start the experiment the document declares, unless one of its name is running: a running
    experiment is not edited in place (its devices, arms and statistics started with its spec), so a
    changed spec is refused until it ends. Once it has ended, a changed spec starts a new one."""
    running = session.exec(
        select(Experiment).where(col(Experiment.name) == doc.name, col(Experiment.state) == "running")
    ).first()
    if running is not None:
        raise Conflict(
            "experiment_running",
            f"{doc.ref}: experiment {running.id} of that name is running, and experiments are not edited"
            " in place: stop it (edgefleet experiments stop) and apply again, or give the changed"
            " experiment another name",
        )
    assert isinstance(doc.spec, ExperimentSpec)
    req = ExperimentIn.model_validate({**doc.spec.model_dump(), "name": doc.name})
    experiments.create_experiment(session, req)


EFFECTS: dict[str, Effect] = {"SLO": _enact_slo, "Experiment": _enact_experiment}
"""Kind -> its effect; a kind without one is configuration that its readers look up."""


@dataclass(frozen=True)
class Applied:
    """The outcome of an apply: its id (None for a dry run) and what each document did."""

    id: int | None
    changes: list[Change]
    row: ConfigApply | None


def invalid(exc: DocumentSetError) -> Invalid:
    return Invalid("invalid_document", str(exc))


def apply(
    session: Session, raws: Sequence[Any], actor: str, source: str = "", *, dry_run: bool = False
) -> Applied:
    """Apply ``raws`` (documents as JSON values); commits unless ``dry_run``."""
    try:
        docs = declarative.parse_documents(raws)
        unknown = declarative.window_problems(
            docs, applied_windows(session, declarative.referenced_windows(docs))
        )
        if unknown:
            raise DocumentSetError(unknown)
    except DocumentSetError as exc:
        raise invalid(exc) from None
    rows = {d.key: session.get(ConfigDocument, d.key) for d in docs}
    current = {k: r.body for k, r in rows.items() if r is not None}
    changes = declarative.plan(current, docs)
    record = ConfigApply(
        actor=actor,
        source=source,
        documents=[d.body() for d in docs],
        changes=[c.to_dict() for c in changes],
    )
    session.add(record)
    session.flush()  # its id, for the documents it changes
    assert record.id is not None
    now = utcnow()
    for doc, change in zip(docs, changes, strict=True):
        if change.action is Action.UNCHANGED:
            continue
        body = doc.body()
        row = rows[doc.key]
        if row is None:
            row = ConfigDocument(kind=doc.kind, name=doc.name, sha256="", created_at=now, generation=0)
        row.body = body
        row.sha256 = declarative.digest(body)
        row.generation += 1
        row.updated_at = now
        row.updated_by = actor
        row.apply_id = record.id
        session.add(row)
    # every document is stored before any acts, so an effect reads the documents of the same apply
    # (an experiment's policy the windows declared next to it)
    session.flush()
    for doc, change in zip(docs, changes, strict=True):
        effect = EFFECTS.get(doc.kind)
        if effect is not None and change.action is not Action.UNCHANGED:
            effect(session, doc, actor)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(
            "config_conflict", "another apply changed these documents meanwhile: apply again"
        ) from None
    if dry_run:
        session.rollback()
        return Applied(None, changes, None)
    session.commit()
    session.refresh(record)
    return Applied(record.id, changes, record)


def list_documents(
    session: Session, kind: str | None, *, cursor: str | None, limit: int = DEFAULT_LIMIT
) -> Page[ConfigDocument]:
    query = select(ConfigDocument)
    if kind is not None:
        query = query.where(col(ConfigDocument.kind) == kind)
    return select_page(
        session, query, [col(ConfigDocument.kind), col(ConfigDocument.name)], "config", cursor, limit
    )


def find_document(session: Session, kind: str, name: str) -> ConfigDocument:
    row = session.get(ConfigDocument, (kind, name))
    if row is None:
        raise NotFound("document_not_found", f"no {kind}/{name} has been applied")
    return row


def effective_spec(row: ConfigDocument) -> dict[str, Any]:
    """The stored document's spec with every default filled in."""
    return declarative.parse_document(row.body).effective()


def list_applies(session: Session, *, cursor: str | None, limit: int = DEFAULT_LIMIT) -> Page[ConfigApply]:
    return select_page(session, select(ConfigApply), [col(ConfigApply.id)], "applies", cursor, limit)


def find_apply(session: Session, apply_id: int) -> ConfigApply:
    row = session.get(ConfigApply, apply_id)
    if row is None:
        raise NotFound("apply_not_found", f"no apply {apply_id}")
    return row


HISTORY_SCAN = 2000
"""Newest applies ``history`` reads: a document's history is read from the applies themselves."""


def history(session: Session, kind: str, name: str) -> list[tuple[ConfigApply, dict[str, Any]]]:
    """The applies that created or changed ``kind/name``, newest first, with its change in each."""
    rows = session.exec(select(ConfigApply).order_by(col(ConfigApply.id).desc()).limit(HISTORY_SCAN)).all()
    out = []
    for row in rows:
        for change in row.changes:
            if (change["kind"], change["name"]) == (kind, name) and change["action"] != Action.UNCHANGED:
                out.append((row, change))
    return out


__all__ = [
    "EFFECTS",
    "Applied",
    "Effect",
    "apply",
    "effective_spec",
    "find_apply",
    "find_document",
    "history",
    "list_applies",
    "list_documents",
]
