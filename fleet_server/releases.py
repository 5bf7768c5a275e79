"""Releasing a model: accepting a signed bundle, and the release-signed TUF targets that list it.

A bundle upload is checked in order: the envelope against the trusted release
keys, every file against its signed hash and length (``artifacts.stage_bundle``),
then, when the release host sent TUF targets metadata with it, that metadata
must describe exactly this bundle. Only then is the bundle moved into storage,
recorded, and the targets installed into the repository, which the fleet key
re-publishes (snapshot + timestamp). The server never signs targets itself, so
a stolen online key can re-publish what was released but never release.

Every refusal is a :class:`~fleet_server.errors.DomainError`; trust failures
keep the ``signing`` error's code. A refused upload leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from tuf.api.metadata import Metadata, Targets

from fleet_server.artifacts import StagedBundle, Upload, stage_bundle
from fleet_server.context import ServerContext
from fleet_server.errors import Conflict, NotFound, Rejected
from fleet_server.mirror import BundleSource, Publisher, open_storage
from fleet_server.models import Model, utcnow
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.settings import ServerSettings
from fleet_server.store import new_session
from fleet_server.tuf_service import TufService
from signing import safejson
from signing.errors import HardwareMismatch, MetadataInvalid, TargetMismatch, TargetNotFound, TrustError
from signing.manifest import BundleManifest
from signing.targets import TargetCustom
from signing.tuf_release import target_name

MAX_METADATA = 1 << 20  # a targets document lists every release; 1 MiB is thousands of them


@dataclass(frozen=True)
class Accepted:
    model: Model
    created: bool  # False: the identical bundle was already stored (the upload is idempotent)


@dataclass(frozen=True)
class Published:
    targets_version: int
    snapshot_version: int


def accept_bundle(
    c: ServerContext, session: Session, envelope: bytes, files: list[Upload], targets: bytes | None
) -> Accepted:
    """Verify and store a bundle; with ``targets``, also release it through TUF."""
    if targets is not None:
        _parse_metadata(targets)
    with _refused():
        staged = stage_bundle(envelope, files, c.trust, c.settings.upload_tmp_dir)
    try:
        manifest = staged.manifest
        if targets is not None:
            with _refused():
                check_release_target(targets, manifest)
        existing = session.exec(
            select(Model).where(Model.name == manifest.name, Model.version == manifest.version)
        ).first()
    except BaseException:
        staged.discard()
        raise
    if existing is not None:
        staged.discard()
        if existing.manifest != manifest.to_dict():
            raise Conflict("model_exists", f"{manifest.ref} exists with different content")
        if targets is not None:
            publish_release(c, targets, Path(existing.storage_path), manifest)
        accepted = Accepted(existing, created=False)
    else:
        accepted = Accepted(_store(c, session, staged, targets), created=True)
    if c.publisher is not None:
        # before the upload returns, so no rollout can name a bundle its mirrors do not hold yet
        c.publisher.publish_quietly()
    return accepted


def _store(c: ServerContext, session: Session, staged: StagedBundle, targets: bytes | None) -> Model:
    manifest = staged.manifest
    path = staged.commit(c.settings.artifacts_dir)
    try:
        if targets is not None:
            publish_release(c, targets, path, manifest)
        model = Model(
            name=manifest.name,
            version=manifest.version,
            release=manifest.release,
            target=manifest.target,
            hardware_ids=list(manifest.hardware_ids),
            sha256=manifest.model_file.sha256,
            length=manifest.model_file.length,
            manifest=manifest.to_dict(),
            storage_path=str(path),
            created_at=utcnow(),
        )
        session.add(model)
        session.commit()
    except IntegrityError:
        shutil.rmtree(path, ignore_errors=True)
        raise Conflict("model_exists", f"{manifest.ref} was uploaded concurrently") from None
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return model


def accept_targets(c: ServerContext, targets: bytes, files: list[Upload]) -> Published:
    """Install release-signed targets metadata (e.g. a raised revocation floor) with new targets' bytes."""
    service = tuf_repository(c)
    version = _parse_metadata(targets)
    with tempfile.TemporaryDirectory(dir=c.settings.data_dir) as tmp:
        staged: dict[str, Path] = {}
        for i, up in enumerate(files):
            path = Path(tmp) / str(i)
            with open(path, "wb") as out:
                shutil.copyfileobj(up.stream, out, 1 << 20)
            staged[up.filename] = path
        with _refused(repository=True):
            snapshot = service.accept(targets, staged)
    return Published(targets_version=version, snapshot_version=snapshot)


def check_release_target(signed_targets: bytes, manifest: BundleManifest) -> None:
    """The uploaded targets metadata must describe exactly this bundle (signatures are checked on install)."""
    try:
        md = Metadata[Targets].from_bytes(signed_targets)
    except Exception as exc:
        raise MetadataInvalid(f"targets metadata does not parse: {exc}") from exc
    name = target_name(manifest.name, manifest.version)
    entry = md.signed.targets.get(name)
    if entry is None:
        raise TargetNotFound(f"the signed targets metadata does not list {name!r}")
    model = manifest.model_file
    if entry.hashes.get("sha256") != model.sha256 or entry.length != model.length:
        raise TargetMismatch(f"{name}: signed target hash/length differ from the bundle's model file")
    custom = TargetCustom.from_custom(entry.custom, name)
    if sorted(custom.hardware_ids) != sorted(manifest.hardware_ids) or custom.release != manifest.release:
        raise HardwareMismatch(f"{name}: signed hardware ids/release differ from the bundle manifest")


def publish_release(
    c: ServerContext, signed_targets: bytes, bundle_dir: Path, manifest: BundleManifest
) -> None:
    """Install the release-signed targets (the bundle's model file as its target) and publish."""
    name = target_name(manifest.name, manifest.version)
    with _refused(repository=True):
        tuf_repository(c).accept(signed_targets, {name: bundle_dir / manifest.model_file.path})


def list_models(
    session: Session, name: str | None = None, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page[Model]:
    """One page of the stored models (of family ``name``), by name, then upload order."""
    query = select(Model) if name is None else select(Model).where(col(Model.name) == name)
    return select_page(session, query, [col(Model.name), col(Model.id)], "models", cursor, limit)


def get_model(session: Session, name: str, version: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    if model is None:
        raise NotFound("model_not_found", f"no model {name}:{version}")
    return model


def stored_bundles(engine: Engine) -> list[BundleSource]:
    """Every stored bundle, by its model file's hash; where two share one, the newest (as served)."""
    with new_session(engine) as session:
        models = session.exec(select(Model).order_by(col(Model.created_at))).all()
    newest = {m.sha256: m for m in models}
    return [
        BundleSource(
            sha256=m.sha256,
            directory=Path(m.storage_path),
            model_file=str(m.manifest["files"][0]["path"]),
            other_files=tuple(str(f["path"]) for f in m.manifest["files"][1:]),
        )
        for m in newest.values()
    ]


def make_publisher(settings: ServerSettings, engine: Engine) -> Publisher | None:
    """The static-delivery publisher ``settings.mirror`` asks for (None: ``off``)."""
    if settings.mirror == "off":
        return None
    storage = open_storage(
        settings.mirror,
        default_dir=settings.mirror_dir,
        endpoint_url=settings.mirror_s3_endpoint_url,
        region=settings.mirror_s3_region,
    )
    return Publisher(storage, settings.tuf_dir, lambda: stored_bundles(engine))


def tuf_repository(c: ServerContext) -> TufService:
    if c.tuf is None:
        raise Conflict("tuf_disabled", "this server has no TUF repository")
    return c.tuf


def _parse_metadata(data: bytes) -> int:
    """Bound the targets document before any TUF code parses it; return its version."""
    try:
        doc = safejson.loads(data, max_bytes=MAX_METADATA)
        version = doc["signed"]["version"]
    except safejson.JsonError as exc:
        raise Rejected("metadata_invalid", f"targets metadata: {exc}") from None
    except (KeyError, TypeError):
        raise Rejected("metadata_invalid", "targets metadata has no signed.version") from None
    if not isinstance(version, int) or isinstance(version, bool):
        raise Rejected("metadata_invalid", "targets metadata version is not an integer")
    return version


@contextmanager
def _refused(*, repository: bool = False) -> Iterator[None]:
    """Turn a signing-layer refusal into the domain error the HTTP layer maps (400 + its code).

    ``repository``: the TUF repository also says no with ``ValueError`` (target
    file names or layout it cannot take), which is the client's input too.
    """
    try:
        yield
    except TrustError as exc:
        raise Rejected(exc.code, str(exc)) from None
    except ValueError as exc:
        if not repository:
            raise
        raise Rejected("invalid_request", str(exc)) from None


__all__ = [
    "MAX_METADATA",
    "Accepted",
    "Published",
    "accept_bundle",
    "accept_targets",
    "check_release_target",
    "get_model",
    "list_models",
    "make_publisher",
    "publish_release",
    "stored_bundles",
    "tuf_repository",
]
