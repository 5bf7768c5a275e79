"""Captured inferences joined with their labels, a page at a time: what a retraining export reads.

The rows are ``CaptureItem``s of a model (every version of a family, or one version), in
inference-id order (UUIDv7: time order per device, and a unique key for the keyset), within a
time window, optionally only those with at least one label. Each row carries its labels (one per
source) and its arrays, read from the stored batch files: every file a page needs is read once.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, exists, select

from fleet_server.errors import NotFound
from fleet_server.models import CaptureBatch, CaptureItem, Label, Model
from fleet_server.paging import Page, select_page

log = logging.getLogger(__name__)

KIND = "captures"


def model_shas(session: Session, model: str) -> dict[str, str]:
    """sha256 -> name:version of ``model`` (``name`` for every version, or ``name:version``)."""
    name, _, version = model.partition(":")
    q = select(Model).where(Model.name == name)
    if version:
        q = q.where(Model.version == version)
    found = {m.sha256: f"{m.name}:{m.version}" for m in session.exec(q).all()}
    if not found:
        raise NotFound("model_not_found", f"no model {model}")
    return found


def _arrays(root: Path, batches: dict[tuple[str, str], str], wanted: list[CaptureItem]) -> dict[str, Any]:
    """inference_id -> the item as the device sent it, from each needed batch file read once."""
    by_file: dict[str, list[CaptureItem]] = defaultdict(list)
    for it in wanted:
        path = batches.get((it.device_id, it.batch_id))
        if path is not None:
            by_file[path].append(it)
    out: dict[str, Any] = {}
    for path, items in by_file.items():
        try:
            doc = json.loads((root / path).read_bytes())
            sent = doc["items"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("capture batch %s unreadable: %s", path, exc)
            continue
        for it in items:
            if 0 <= it.position < len(sent) and isinstance(sent[it.position], dict):
                out[it.inference_id] = sent[it.position]
    return out


def dataset_page(
    session: Session,
    root: Path,
    model: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    labeled: bool = False,
    cursor: str | None = None,
    limit: int = 100,
) -> Page[dict[str, Any]]:
    """One page of the dataset: captured inferences with attribution, labels and arrays."""
    names = model_shas(session, model)
    q = select(CaptureItem).where(col(CaptureItem.model_sha256).in_(list(names)))
    if since is not None:
        q = q.where(CaptureItem.ts >= since)
    if until is not None:
        q = q.where(CaptureItem.ts < until)
    if labeled:
        q = q.where(exists().where(col(Label.inference_id) == col(CaptureItem.inference_id)))
    items: Page[CaptureItem] = select_page(session, q, [col(CaptureItem.inference_id)], KIND, cursor, limit)
    ids = [it.inference_id for it in items.items]
    labels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if ids:
        rows = session.exec(
            select(Label).where(col(Label.inference_id).in_(ids)).order_by(col(Label.source))
        ).all()
        for lb in rows:
            labels[lb.inference_id].append(
                {"label": lb.label, "source": lb.source, "label_time": lb.label_time}
            )
    keys = {(it.device_id, it.batch_id) for it in items.items}
    batches: dict[tuple[str, str], str] = {}
    if keys:
        devices = {d for d, _ in keys}
        for b in session.exec(select(CaptureBatch).where(col(CaptureBatch.device_id).in_(devices))).all():
            if (b.device_id, b.batch_id) in keys:
                batches[(b.device_id, b.batch_id)] = b.path
    sent = _arrays(root, batches, list(items.items))
    rows_out = []
    for it in items.items:
        item = sent.get(it.inference_id, {})
        rows_out.append(
            {
                "inference_id": it.inference_id,
                "device_id": it.device_id,
                "model": names[it.model_sha256],
                "sha256": it.model_sha256,
                "hardware_id": it.hardware_id,
                "rollout_id": it.rollout_id,
                "stage": it.stage,
                "ts": it.ts,
                "predicted": it.predicted,
                "labels": labels.get(it.inference_id, []),
                "inputs": item.get("inputs"),
                "outputs": item.get("outputs"),
            }
        )
    return Page(rows_out, items.next)


__all__ = ["dataset_page", "model_shas"]
