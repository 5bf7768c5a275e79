"""The wire models of ``/api/v1/config``: an apply, its outcome, the stored documents and history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet_server.declarative import API_VERSION
from fleet_server.schemas import TIME_EXAMPLE, Page

DOCUMENT_EXAMPLE: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "RolloutPolicy",
    "metadata": {"name": "canary", "labels": {"team": "vision"}},
    "spec": {"stages": [5, 50, 100], "soak_seconds": 600, "on_class_failure": "skip"},
}
CHANGE_EXAMPLE: dict[str, Any] = {
    "kind": "RolloutPolicy",
    "name": "canary",
    "action": "created",
    "diff": "--- /dev/null\n+++ declared/RolloutPolicy/canary\n@@ -0,0 +1,12 @@\n"
    "+apiVersion: edgefleet.dev/v1\n",
}


class ApplyIn(BaseModel):
    """Documents to apply together (one transaction): each created, changed or left unchanged."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"documents": [DOCUMENT_EXAMPLE], "source": "fleet.yaml"}]},
    )

    documents: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=500,
        description="documents in the shape of the published schema (GET /api/v1/config/schema)",
    )
    source: str = Field(default="", max_length=512, description="where they were read from, for the history")
    dry_run: bool = Field(
        default=False, strict=True, description="validate and compute the changes, store and enact nothing"
    )


class ChangeOut(BaseModel):
    """What applying one document did (or would do)."""

    kind: str = Field(description="the document's kind")
    name: str = Field(description="the document's name")
    action: str = Field(description="created, configured or unchanged")
    diff: str = Field(
        description="unified diff of the live document against the declared one; empty when unchanged"
    )


class ApplyOut(BaseModel):
    """One apply: who, when, from where, and what each document did."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "dry_run": False,
                    "ts": TIME_EXAMPLE,
                    "actor": "a1b2c3d4e5f6 (ci-deployer)",
                    "source": "fleet.yaml",
                    "changes": [CHANGE_EXAMPLE],
                }
            ]
        }
    )

    id: int = Field(description="the apply's number in the history; 0 for a dry run (not kept)")
    dry_run: bool = Field(description="nothing was stored or enacted")
    ts: datetime | None = Field(description="when it was applied; null for a dry run")
    actor: str = Field(description="who applied it")
    source: str = Field(description="where the documents were read from")
    changes: list[ChangeOut] = Field(description="one per document, in the order sent")


class ApplyRecordOut(ApplyOut):
    """A stored apply with the documents as they were sent."""

    documents: list[dict[str, Any]] = Field(description="the documents as applied")


class ApplyPage(Page[ApplyOut]):
    """A page of applies, oldest first."""


class HistoryOut(BaseModel):
    """One apply that created or changed a document."""

    apply_id: int = Field(description="the apply")
    ts: datetime = Field(description="when")
    actor: str = Field(description="who")
    source: str = Field(description="from which file")
    action: str = Field(description="created or configured")
    diff: str = Field(description="what changed")


class DocumentOut(BaseModel):
    """A live document as last applied, and the spec it is read as (every default filled in)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "kind": "RolloutPolicy",
                    "name": "canary",
                    "generation": 2,
                    "created_at": TIME_EXAMPLE,
                    "updated_at": TIME_EXAMPLE,
                    "updated_by": "a1b2c3d4e5f6 (ci-deployer)",
                    "apply_id": 7,
                    "document": DOCUMENT_EXAMPLE,
                    "effective": None,
                    "history": None,
                }
            ]
        }
    )

    kind: str = Field(description="the kind")
    name: str = Field(description="the name, unique per kind")
    generation: int = Field(description="how many applies created or changed it")
    created_at: datetime = Field(description="first applied")
    updated_at: datetime = Field(description="last changed")
    updated_by: str = Field(description="who last changed it")
    apply_id: int = Field(description="the apply that last changed it")
    document: dict[str, Any] = Field(
        description="the document as declared (apiVersion, kind, metadata, spec)"
    )
    effective: dict[str, Any] | None = Field(
        default=None, description="its spec with every default filled in (one document's read only)"
    )
    history: list[HistoryOut] | None = Field(
        default=None,
        description="the applies that created or changed it, newest first (one document's read only)",
    )


class DocumentPage(Page[DocumentOut]):
    """A page of live documents, by kind and name."""
