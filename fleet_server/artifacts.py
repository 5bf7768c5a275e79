"""Bundle staging (verified before anything is accepted) and artifact serving with HTTP Range.

An upload is trusted only after the envelope verifies against the release keys
of ``<keys_dir>/trust.json`` and every file matches its signed hash and length.
Files are streamed to a private upload directory (never more than the signed
length is written) and moved into place only once all checks passed, so a
refused upload leaves nothing behind.

Stored artifacts are public reads (docs/decisions/0009-public-delivery-and-request-guard.md):
every byte is signed, so a device checks what it got, not who served it.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Engine
from sqlmodel import col, select

from fleet_server.errors import NotFound
from fleet_server.models import Model
from fleet_server.store import new_session
from signing.errors import LengthMismatch, MalformedEnvelope, MissingFile, UnexpectedFile
from signing.manifest import ENVELOPE_NAME, BundleManifest, manifest_from_envelope, verify_file
from signing.trust import TrustRoot

CHUNK = 1 << 20
MAX_ENVELOPE = 1 << 20


@dataclass(frozen=True)
class Upload:
    """One uploaded part: the file name the client gave and a readable stream."""

    filename: str
    stream: BinaryIO


@dataclass(frozen=True)
class StagedBundle:
    """A verified bundle waiting in the upload area (``commit`` moves it into storage)."""

    manifest: BundleManifest
    envelope: bytes
    staging_dir: Path

    def commit(self, artifacts_dir: Path) -> Path:
        target = artifacts_dir / uuid.uuid4().hex
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.staging_dir), target)
        return target

    def discard(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)


def load_trust(keys_dir: Path) -> TrustRoot:
    return TrustRoot.load_file(Path(keys_dir) / "trust.json")


def stage_bundle(envelope: bytes, files: list[Upload], trust: TrustRoot, upload_dir: Path) -> StagedBundle:
    """Verify the envelope, stream the files to disk, verify each; raise the TrustError that failed."""
    if len(envelope) > MAX_ENVELOPE:
        raise MalformedEnvelope(f"envelope larger than {MAX_ENVELOPE} bytes")
    manifest = manifest_from_envelope(envelope, trust.release_keys)
    entries = {f.path: f for f in manifest.files}
    names = [f.filename for f in files]
    extra = sorted({n for n in names if n not in entries})
    if extra:
        raise UnexpectedFile(f"uploaded files not in the signed manifest: {', '.join(extra)}")
    if len(set(names)) != len(names):
        raise UnexpectedFile("a file was uploaded twice")
    missing = sorted(set(entries) - set(names))
    if missing:
        raise MissingFile(f"signed files not uploaded: {', '.join(missing)}")
    staging = Path(upload_dir) / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        for up in files:
            entry = entries[up.filename]
            _copy_bounded(up.stream, staging / entry.path, entry.length)
            verify_file(staging / entry.path, entry)
        (staging / ENVELOPE_NAME).write_bytes(envelope)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StagedBundle(manifest, envelope, staging)


def _copy_bounded(src: BinaryIO, dest: Path, limit: int) -> None:
    """Copy at most ``limit`` bytes; one more byte means the file is not the signed one."""
    written = 0
    with open(dest, "wb") as out:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                return
            written += len(chunk)
            if written > limit:
                raise LengthMismatch(f"{dest.name}: more than the signed {limit} bytes")
            out.write(chunk)


# --- serving ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """Where a stored model file and its bundle's envelope are."""

    model_file: Path
    envelope: Path


def find_artifact(engine: Engine, sha256: str) -> Artifact:
    """The newest stored bundle whose model file has this hash.

    Opens and closes its own session: a streamed download must not hold a pooled
    connection for as long as the client takes to read it (a wave of devices
    downloading at once would exhaust the pool).
    """
    with new_session(engine) as session:
        model = session.exec(
            select(Model).where(Model.sha256 == sha256).order_by(col(Model.created_at).desc())
        ).first()
    if model is None:
        raise NotFound("artifact_not_found", f"no artifact {sha256}")
    storage = Path(model.storage_path)
    return Artifact(storage / str(model.manifest["files"][0]["path"]), storage / ENVELOPE_NAME)


def find_bundle_file(engine: Engine, sha256: str, name: str) -> Path:
    """Another file of the bundle whose model file has this hash (its golden set), by the name its
    signed manifest lists; any name it does not list is not found (no path is built from input)."""
    with new_session(engine) as session:
        model = session.exec(
            select(Model).where(Model.sha256 == sha256).order_by(col(Model.created_at).desc())
        ).first()
    listed = [str(f["path"]) for f in model.manifest["files"][1:]] if model is not None else []
    if model is None or name not in listed:
        raise NotFound("artifact_not_found", f"no file {name!r} in the bundle of {sha256}")
    return Path(model.storage_path) / listed[listed.index(name)]


# --- Range --------------------------------------------------------------------------

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range as inclusive (start, end); None for the whole file.

    Multiple ranges are refused (416): devices resume with one range, and
    refusing is simpler and safer than multipart/byteranges.
    """
    if header is None:
        return None
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(header)
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(header)
    return start, min(end, size - 1)


def iter_file(path: Path, start: int, end: int) -> Iterator[bytes]:
    """Yield bytes ``start..end`` (inclusive) in chunks."""
    remaining = end - start + 1
    with open(path, "rb") as fh:
        fh.seek(start)
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


__all__ = [
    "Artifact",
    "RangeNotSatisfiable",
    "StagedBundle",
    "Upload",
    "find_artifact",
    "iter_file",
    "load_trust",
    "parse_range",
    "stage_bundle",
]
