"""Captured inferences a device uploads: read the batch, keep its bytes, index every inference.

A batch arrives as ``PUT /api/v1/captures/{device_id}/{batch_id}`` with the body the agent
sealed (``device_agent.capture_store.body``), signed by the device
(``signing.device_auth``; the route checks that before the body is read). Here:

- :func:`parse` (pure) checks the body against the path (same device, same batch id), the
  model hash, and each item: an item without a usable inference id or time is skipped and
  counted, never the whole batch (the device cannot fix a batch it already sealed);
- :func:`store` keeps the body as it came, in ``<capture_dir>/<device>/<batch>-<sha256>.json``
  (the hash in the name: a second body under the same id can never overwrite the first), and
  indexes the batch and each inference with the model, the device's hardware cohort and the
  rollout stage that put this model on this device (none outside a rollout).

A resend of the same body (the device never heard the answer) is a 200 that stores nothing;
another body under a stored batch id is a 409. The file is written before the rows commit,
so a row never points at a missing file; a file whose rows never committed is overwritten by
the resend with the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_server.errors import ApiError
from fleet_server.labels import INFERENCE_ID_RE
from fleet_server.models import (
    CaptureBatch,
    CaptureItem,
    Device,
    Label,
    Model,
    Rollout,
    RolloutDevice,
    utcnow,
)
from fleet_server.server_label_counts import add_counts, tally
from signing import safejson

log = logging.getLogger(__name__)

BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_ITEMS = 100_000  # far more than a 1 MiB body holds
MAX_CLASSES = 1 << 16  # outputs wider than this are not scored (no top-1 kept)
# numpy dtype names the agent writes -> struct codes (little-endian)
_STRUCT = {
    "float32": "f",
    "float64": "d",
    "float16": "e",
    "int8": "b",
    "uint8": "B",
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
}


def load_device_ca(path: Path) -> x509.Certificate | None:
    """The CA of device certificates, which uploads are signed with; None (logged) while there is none
    (provisioning creates it; the route looks again on the next upload)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        # the message, not the exception: a record kept by a handler would keep its traceback's
        # frames, and with them the server being built
        log.warning(
            "no device CA at %s (%s): capture uploads are refused (503) until there is one", path, str(exc)
        )
        return None


@dataclass(frozen=True, slots=True)
class Item:
    inference_id: str
    ts: datetime
    position: int
    predicted: str | None


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a batch body holds that the index needs."""

    model_sha256: str
    items: list[Item]
    skipped: int  # items without a usable inference id or time


def _refuse(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, code, message)


def top1(output: Any) -> str | None:
    """The top-1 class of an output tensor's first row (its last axis), or None when it is not a
    classifier's output (width 1, empty, too wide) or cannot be read."""
    if not isinstance(output, dict):
        return None
    code, shape, data = _STRUCT.get(str(output.get("dtype"))), output.get("shape"), output.get("data")
    if code is None or not isinstance(shape, list) or not shape or not isinstance(data, str):
        return None
    width = shape[-1]
    if not isinstance(width, int) or not 1 < width <= MAX_CLASSES:
        return None
    size = struct.calcsize(code)
    try:
        raw = base64.b64decode(data[: 4 * math.ceil(width * size / 3) + 4], validate=False)
        values = struct.unpack_from(f"<{width}{code}", raw)
    except (binascii.Error, struct.error, ValueError):
        return None
    best = max(range(width), key=values.__getitem__)
    return None if isinstance(values[best], float) and not math.isfinite(values[best]) else str(best)


def _when(v: Any) -> datetime | None:
    if not isinstance(v, str) or len(v) > 40:
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        return None
    return t.astimezone(UTC) if t.tzinfo is not None else None


def parse(body: bytes, device_id: str, batch_id: str, max_bytes: int) -> Parsed:
    """The batch's model and items (pure); an ApiError (4xx) for a body that is not a batch of this
    device under this id."""
    try:
        doc = safejson.loads(body, max_bytes=max_bytes)
    except safejson.JsonError as exc:
        raise _refuse(400, "invalid_request", f"capture batch: {exc}") from None
    if not isinstance(doc, dict):
        raise _refuse(400, "invalid_request", "capture batch: expected a JSON object")
    if doc.get("device_id") != device_id or doc.get("batch_id") != batch_id:
        raise _refuse(403, "wrong_device", "the batch's device_id and batch_id must be those of its URL")
    sha = doc.get("model_sha256")
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise _refuse(400, "invalid_request", "capture batch: model_sha256 must be 64 lowercase hex")
    items = doc.get("items")
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise _refuse(400, "invalid_request", f"capture batch: items must be a list of at most {MAX_ITEMS}")
    kept: list[Item] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        iid, ts = item.get("inference_id"), _when(item.get("ts"))
        if not isinstance(iid, str) or not INFERENCE_ID_RE.match(iid) or ts is None or iid in seen:
            continue
        seen.add(iid)
        outputs = item.get("outputs")
        predicted = top1(outputs[0]) if isinstance(outputs, list) and outputs else None
        kept.append(Item(iid, ts, i, predicted))
    return Parsed(sha, kept, len(items) - len(kept))


@dataclass(frozen=True)
class Stored:
    """The answer to an upload: ``created`` False when this exact body was stored before."""

    created: bool
    batch: CaptureBatch
    skipped: int = 0


def _attribution(session: Session, device_id: str, sha: str) -> tuple[str | None, int | None]:
    """The rollout (and its stage) that put model ``sha`` on this device: the latest one that
    assigned the device a stage (a device a rollout holds but has not reached runs another model)."""
    row = session.exec(
        select(RolloutDevice.rollout_id, RolloutDevice.stage)
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(
            RolloutDevice.device_id == device_id,
            Rollout.model_sha256 == sha,
            col(RolloutDevice.stage).is_not(None),
        )
        .order_by(col(Rollout.created_at).desc())
    ).first()
    return (row[0], row[1]) if row is not None else (None, None)


def _write(path: Path, body: bytes) -> None:
    """Write ``body`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def store(engine: Engine, root: Path, device_id: str, batch_id: str, body: bytes, max_bytes: int) -> Stored:
    """Keep and index one uploaded batch (idempotent on the device's batch id and body)."""
    digest = hashlib.sha256(body).hexdigest()
    with Session(engine) as session:
        known = session.get(CaptureBatch, (device_id, batch_id))
        if known is not None:
            return _again(known, digest)
        device = session.get(Device, device_id)
        if device is None:
            raise _refuse(403, "device_not_registered", f"{device_id} is not a registered device")
        parsed = parse(body, device_id, batch_id, max_bytes)
        if session.exec(select(Model.id).where(Model.sha256 == parsed.model_sha256)).first() is None:
            raise _refuse(422, "unknown_model", f"no model with sha256 {parsed.model_sha256} on this server")
        rollout_id, stage = _attribution(session, device_id, parsed.model_sha256)
        hardware_id = device.hardware_id
    relative = Path(device_id) / f"{batch_id}-{digest}.json"
    _write(root / relative, body)
    times = [x.ts for x in parsed.items]
    batch = CaptureBatch(
        device_id=device_id,
        batch_id=batch_id,
        body_sha256=digest,
        model_sha256=parsed.model_sha256,
        hardware_id=hardware_id,
        rollout_id=rollout_id,
        stage=stage,
        items=len(parsed.items),
        path=relative.as_posix(),
        first_ts=min(times) if times else None,
        last_ts=max(times) if times else None,
        received_at=utcnow(),
    )
    rows = [
        {
            "inference_id": x.inference_id,
            "device_id": device_id,
            "batch_id": batch_id,
            "position": x.position,
            "model_sha256": parsed.model_sha256,
            "hardware_id": hardware_id,
            "rollout_id": rollout_id,
            "stage": stage,
            "ts": x.ts,
            "predicted": x.predicted,
        }
        for x in parsed.items
    ]
    try:
        with Session(engine) as session:
            session.add(batch)
            session.flush()
            if rows:  # an inference id seen before (a device bug) keeps its first row
                conn = session.connection()
                dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
                table = CaptureItem.__table__  # type: ignore[attr-defined]
                insert = dialect.insert(table).on_conflict_do_nothing().returning(table.c.inference_id)
                new = {r[0] for r in conn.execute(insert, rows)}
                fresh = [x for x in parsed.items if x.inference_id in new]
                _count_labels(conn, fresh, parsed.model_sha256, hardware_id)
            session.commit()
            session.refresh(batch)
    except IntegrityError:  # the same batch id stored meanwhile by a concurrent upload
        with Session(engine) as session:
            known = session.get(CaptureBatch, (device_id, batch_id))
        if known is None:
            raise
        if known.body_sha256 != digest:
            with contextlib.suppress(OSError):
                (root / relative).unlink()
        return _again(known, digest)
    return Stored(True, batch, parsed.skipped)


def _count_labels(conn: Connection, items: Sequence[Item], sha: str, hardware_id: str) -> None:
    """Score the labels that came before these new captures against their predictions, for the
    accuracy SLI (``fleet_server.server_label_counts``; labels that come after count themselves)."""
    predicted = {x.inference_id: x.predicted for x in items if x.predicted is not None}
    ids = list(predicted)
    met: list[tuple[str, str, Any, str | None]] = []
    for start in range(0, len(ids), 1000):  # bound the IN list (SQLite's parameter limit)
        chunk = ids[start : start + 1000]
        rows = conn.execute(select(Label.inference_id, Label.label).where(col(Label.inference_id).in_(chunk)))
        met.extend((sha, hardware_id, label, predicted[iid]) for iid, label in rows)
    add_counts(conn, tally(met), utcnow())


def _again(known: CaptureBatch, digest: str) -> Stored:
    if known.body_sha256 != digest:
        raise _refuse(409, "batch_conflict", f"batch {known.batch_id} was stored before with another body")
    return Stored(False, known)


__all__ = ["Parsed", "Stored", "load_device_ca", "parse", "store", "top1"]
