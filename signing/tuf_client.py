"""Device-side delivery: fetch a release through python-tuf's ``Updater`` and name every refusal.

Rules the device relies on, all python-tuf's own (not re-derived here): root
chain N -> N+1 with both thresholds, rollback protection (versions never go
down, against the cache of what was trusted before), freeze protection
(expiry), mix-and-match protection (snapshot pins targets, timestamp pins
snapshot), endless-data protection (every download is capped at its signed or
configured length), and hash/length checks of the target.

What this module adds:

- the anchor is always the root bytes the caller passes (provisioned, or the
  newest root the agent stored in its trust state), never the writable cache;
- a new ``Updater`` per check, because ``refresh()`` runs once per Updater;
- the target's edgefleet custom fields and the family floors, parsed;
- python-tuf's exceptions translated into ``signing.errors`` classes, so the
  agent reports *which* rule refused an update.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from signing.errors import (
    DeliveryError,
    DeliveryUnavailable,
    EndlessData,
    MetadataExpired,
    MetadataInvalid,
    MetadataMixAndMatch,
    MetadataRollback,
    MetadataUnsigned,
    TargetMismatch,
    TargetNotFound,
)
from signing.targets import FLOORS_TARGET, TargetCustom, VerifiedTarget, parse_floors

log = logging.getLogger(__name__)


def translate(exc: Exception) -> DeliveryError:
    """Map a python-tuf exception onto the specific edgefleet error class."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return MetadataUnsigned(msg)
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        # python-tuf raises one class for two attacks; its messages tell them apart:
        # "... must be >= N" / "Expected targets.json version" = older than trusted (rollback);
        # "Expected snapshot version N" / "Expected targets vN" = not what signed metadata pins.
        if "must be >=" in msg or ".json version" in msg:
            return MetadataRollback(msg)
        return MetadataMixAndMatch(msg)
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return MetadataExpired(msg)
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return TargetMismatch(msg)
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return EndlessData(msg)
    if isinstance(exc, tuf_exc.DownloadError):
        return DeliveryUnavailable(msg)
    return MetadataInvalid(msg)


@contextlib.contextmanager
def tuf_errors() -> Iterator[None]:
    """Re-raise python-tuf's errors as edgefleet DeliveryErrors (the original is ``__cause__``)."""
    try:
        yield
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
        raise translate(exc) from exc


def new_updater(
    trusted_root: bytes,
    cache_dir: Path,
    metadata_url: str,
    targets_url: str | None = None,
    *,
    fetcher: FetcherInterface | None = None,
    config: UpdaterConfig | None = None,
    reference_time: datetime | None = None,
) -> Updater:
    """A fresh Updater anchored on ``trusted_root`` (bytes), caching metadata in ``cache_dir``.

    ``reference_time``: judge every expiry of this update at that instant instead of the
    host clock (a device whose own clock is the one that counts, or a simulated skew).
    python-tuf 7 fixes the update start time (TUF spec 5.1) in
    ``TrustedMetadataSet.reference_time`` when the Updater is built and has no public
    parameter for it, so it is set here, in one place; should a later python-tuf move
    it, expiry falls back to the host clock and that is logged once.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tuf_errors():
        updater = Updater(
            metadata_dir=str(cache_dir),
            metadata_base_url=metadata_url,
            target_base_url=targets_url,
            fetcher=fetcher,
            config=config,
            bootstrap=trusted_root,
        )
    if reference_time is not None:
        _set_reference_time(updater, reference_time)
    return updater


_warned_no_reference_time = False


def _set_reference_time(updater: Updater, when: datetime) -> None:
    global _warned_no_reference_time
    trusted = getattr(updater, "_trusted_set", None)
    if trusted is not None and hasattr(trusted, "reference_time"):
        trusted.reference_time = when
    elif not _warned_no_reference_time:
        _warned_no_reference_time = True
        log.warning("this python-tuf has no reference_time: TUF expiry uses the host clock")


def verified_target(updater: Updater, cache_dir: Path, name: str) -> VerifiedTarget:
    """Refresh ``updater`` and return what its metadata says about target ``name``."""
    return _verified(updater, cache_dir, name)[1]


def _verified(updater: Updater, cache_dir: Path, name: str) -> tuple[TargetFile, VerifiedTarget]:
    with tuf_errors():
        updater.refresh()
        info = updater.get_targetinfo(name)
        floors_info = updater.get_targetinfo(FLOORS_TARGET)
    if info is None:
        raise TargetNotFound(f"no signed target {name!r} in the release metadata")
    sha = info.hashes.get("sha256")
    if sha is None:
        raise MetadataInvalid(f"target {name!r} has no sha256")
    target = VerifiedTarget(
        name=name,
        length=info.length,
        sha256=sha,
        custom=TargetCustom.from_custom(info.custom, name),
        floors=parse_floors(floors_info.custom) if floors_info is not None else {},
        root_version=_root_version(cache_dir),
    )
    return info, target


def _root_version(cache_dir: Path) -> int:
    # The Updater keeps the verified root in its trusted set only; its cache symlink
    # root.json points at the version it just verified and persisted.
    link = Path(cache_dir) / "root.json"
    version: int = Metadata[Root].from_bytes(link.read_bytes()).signed.version
    return version


def check_target(
    name: str,
    *,
    trusted_root: bytes,
    cache_dir: Path,
    metadata_url: str,
    fetcher: FetcherInterface | None = None,
    config: UpdaterConfig | None = None,
    reference_time: datetime | None = None,
) -> VerifiedTarget:
    """Refresh metadata and return the verified target info without downloading it.

    For an agent that streams the bytes itself (resumable, hashing while it
    writes into a slot) and checks them against ``length``/``sha256``.
    """
    updater = new_updater(
        trusted_root, cache_dir, metadata_url, fetcher=fetcher, config=config, reference_time=reference_time
    )
    return _verified(updater, cache_dir, name)[1]


def fetch_target(
    name: str,
    dest: Path,
    *,
    trusted_root: bytes,
    cache_dir: Path,
    metadata_url: str,
    targets_url: str,
    fetcher: FetcherInterface | None = None,
    config: UpdaterConfig | None = None,
) -> VerifiedTarget:
    """Refresh metadata, download target ``name`` to ``dest`` and return what was verified.

    python-tuf caps the download at the signed length and checks the hash before
    it writes ``dest``, so a refused target never reaches ``dest``.
    """
    updater = new_updater(trusted_root, cache_dir, metadata_url, targets_url, fetcher=fetcher, config=config)
    info, target = _verified(updater, cache_dir, name)
    dest = Path(dest)
    with tuf_errors():
        updater.download_target(info, filepath=str(dest))
    return VerifiedTarget(
        name=target.name,
        length=target.length,
        sha256=target.sha256,
        custom=target.custom,
        floors=target.floors,
        path=dest,
        root_version=target.root_version,
    )


def trusted_root_bytes(cache_dir: Path, version: int) -> bytes:
    """Root metadata v``version`` as the Updater verified and persisted it, for the agent's trust state.

    Only read right after a successful check that reported this ``root_version``;
    the agent stores it atomically and passes it as ``trusted_root`` next time.
    """
    data = (Path(cache_dir) / "root_history" / f"{version}.root.json").read_bytes()
    md = Metadata[Root].from_bytes(data)
    if md.signed.version != version:
        raise MetadataInvalid(f"cached root is v{md.signed.version}, expected v{version}")
    return data
