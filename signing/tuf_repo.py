"""A static TUF repository for released bundles: root/targets/snapshot/timestamp as files in a directory.

python-tuf's ``tuf.api.metadata`` builds and signs the metadata; this module only
decides who signs what (the trust model in DESIGN.md):

- root: the offline root keys, threshold k of n (made by ``signing.keyring``).
- targets: the release keys. Each bundle's model file is a target whose
  ``custom`` field carries family, release counter and hardware ids; the
  revocation floors are the custom field of one reserved target.
- snapshot and timestamp: the online fleet key, with short expiry, so a
  repository that stops being refreshed freezes devices out (freeze attack).

Consistent snapshots are on: metadata is written as ``N.role.json`` and targets
as ``targets/<sha256>.<name>``, so a server can serve the directory as static
files while it is being updated. Writes go through a temporary file and
``os.replace``; the timestamp, which points at everything else, is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from signing.keys import ECDSA_P256, ED25519, KeyPair, PublicKey
from signing.targets import FLOORS_TARGET, TargetCustom

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"

ROOT_EXPIRY = timedelta(days=365)
TARGETS_EXPIRY = timedelta(days=365)
SNAPSHOT_EXPIRY = timedelta(days=7)
TIMESTAMP_EXPIRY = timedelta(days=1)

_SERIALIZER = JSONSerializer(compact=False)


def sslib_key(public: PublicKey) -> SSlibKey:
    """The TUF form of one of our keys, under the same key id as in DSSE envelopes.

    Ed25519 keys are keytype/scheme ``ed25519`` with the raw key in hex; P-256 release
    keys are keytype ``ecdsa``, scheme ``ecdsa-sha2-nistp256`` with a PEM public key:
    both are securesystemslib's own encodings, so python-tuf verifies them unaided.
    """
    return SSlibKey.from_crypto(public.crypto_key(), keyid=public.keyid, scheme=public.scheme)


def public_key_of(key: Key) -> PublicKey | None:
    """One of our keys back from its TUF form; None for a key type or id edgefleet never writes.

    The key id must be ours (sha256 of the raw key): a root listing a key under
    another id is not one we made, and trusting it by a different name would let
    DSSE and TUF disagree about which key is which.
    """
    try:
        if key.keytype == "ed25519" and key.scheme == ED25519:
            pub = PublicKey(bytes.fromhex(str(key.keyval["public"])))
        elif key.keytype == "ecdsa" and key.scheme == ECDSA_P256:
            pub = PublicKey.from_pem(str(key.keyval["public"]).encode())
        else:
            return None
    except (KeyError, ValueError, TypeError):
        return None
    return pub if pub.keyid == key.keyid and pub.scheme == key.scheme else None


def signer_for(key: KeyPair) -> CryptoSigner:
    return CryptoSigner(key.private, sslib_key(key.public))


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def build_root(
    *,
    version: int,
    root_keys: list[KeyPair],
    root_threshold: int,
    release_keys: list[PublicKey],
    fleet_keys: list[PublicKey],
    previous_root_keys: Iterable[KeyPair] = (),
    expires: datetime | None = None,
    release_threshold: int = 1,
) -> bytes:
    """TUF root metadata for our roles, signed by the new root keys and (rotation) the replaced ones."""
    if not 1 <= root_threshold <= len(root_keys):
        raise ValueError(f"root threshold {root_threshold} must be between 1 and {len(root_keys)}")
    root = Root(version=version, expires=expires or _now() + ROOT_EXPIRY, consistent_snapshot=True)
    for kp in root_keys:
        root.add_key(sslib_key(kp.public), Root.type)
    for pub in release_keys:
        root.add_key(sslib_key(pub), Targets.type)
    for pub in fleet_keys:
        root.add_key(sslib_key(pub), Snapshot.type)
        root.add_key(sslib_key(pub), Timestamp.type)
    root.roles[Root.type].threshold = root_threshold
    root.roles[Targets.type].threshold = release_threshold
    md = Metadata(root)
    signers = {kp.keyid: kp for kp in [*root_keys, *previous_root_keys]}
    for kp in signers.values():
        md.sign(signer_for(kp), append=True)
    return md.to_bytes(_SERIALIZER)


class TufRepository:
    """The repository directory: ``metadata/`` and ``targets/``, served as static files.

    Release-key operations (``add_target``, ``remove_target``, ``set_floor``)
    produce new targets metadata; the online fleet key then ``publish``es a new
    snapshot and timestamp. ``refresh_timestamp`` re-signs only the timestamp
    (the server does this well inside ``TIMESTAMP_EXPIRY``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metadata_dir = self.path / METADATA_DIR
        self.targets_dir = self.path / TARGETS_DIR

    # ---------------------------------------------------------------- create

    @classmethod
    def create(
        cls,
        path: Path,
        root: bytes | list[bytes],
        release_keys: list[KeyPair],
        fleet_key: KeyPair,
        *,
        snapshot_expiry: timedelta = SNAPSHOT_EXPIRY,
        timestamp_expiry: timedelta = TIMESTAMP_EXPIRY,
    ) -> TufRepository:
        """Start a repository with an empty, signed target list.

        ``root`` is the root metadata, or the whole chain v1..vN (``KeyDir.tuf_root_chain()``)
        so devices pinned at any earlier version can walk up to the current one.
        """
        repo = cls(path)
        if (repo.metadata_dir / "timestamp.json").exists():
            raise FileExistsError(f"{repo.metadata_dir} already holds a TUF repository")
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        for link in [root] if isinstance(root, bytes) else root:
            repo.publish_root(link)
        targets = Metadata(Targets(version=1, expires=_now() + TARGETS_EXPIRY))
        repo._write_targets(targets, release_keys)
        repo.publish(fleet_key, snapshot_expiry=snapshot_expiry, timestamp_expiry=timestamp_expiry)
        return repo

    @classmethod
    def open_served(cls, path: Path, root_chain: list[bytes]) -> TufRepository:
        """Open (or start) a repository that holds only what the server may sign itself.

        The root chain is published (new links appended after a rotation); targets
        metadata arrives later, signed by a release key elsewhere (``accept_targets``).
        """
        repo = cls(path)
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        have = repo.root().signed.version if (repo.metadata_dir / "root.json").exists() else 0
        for link in root_chain:
            if Metadata[Root].from_bytes(link).signed.version > have:
                repo.publish_root(link)
        return repo

    def has_targets(self) -> bool:
        return (self.metadata_dir / "targets.json").exists()

    def targets_bytes(self) -> bytes | None:
        path = self.metadata_dir / "targets.json"
        return path.read_bytes() if path.exists() else None

    def accept_targets(self, data: bytes, files: Mapping[str, Path]) -> Metadata[Targets]:
        """Install targets metadata a release key signed elsewhere, with the bytes of new targets.

        ``signing.tuf_release.verify_targets_update`` checks signature, version,
        expiry and floors; every listed target must then have its bytes here
        (``files`` maps target name -> a file to hard-link or copy in), so devices
        never see a target that cannot be fetched. The caller publishes after.
        """
        from signing.errors import TargetMismatch, TargetNotFound
        from signing.tuf_release import verify_targets_update

        md = verify_targets_update(self.root_bytes(), self.targets_bytes(), data)
        for name, entry in md.signed.targets.items():
            dest = self._target_file(name, entry.hashes["sha256"])
            if dest.exists():
                continue
            src = files.get(name)
            if src is None:
                raise TargetNotFound(f"targets metadata lists {name!r} but its bytes were not uploaded")
            if Path(src).stat().st_size != entry.length:
                raise TargetMismatch(
                    f"{name}: uploaded {Path(src).stat().st_size} bytes, signed {entry.length}"
                )
            _link_or_copy(Path(src), dest)
        self._write(f"{md.signed.version}.targets.json", data)
        self._write("targets.json", data)
        return md

    # ---------------------------------------------------------------- read

    def _read(self, name: str) -> bytes:
        return (self.metadata_dir / name).read_bytes()

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_bytes(self._read("root.json"))

    def targets(self) -> Metadata[Targets]:
        return Metadata[Targets].from_bytes(self._read("targets.json"))

    def snapshot(self) -> Metadata[Snapshot]:
        return Metadata[Snapshot].from_bytes(self._read("snapshot.json"))

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_bytes(self._read("timestamp.json"))

    def root_bytes(self, version: int | None = None) -> bytes:
        name = "root.json" if version is None else f"{version}.root.json"
        return (self.metadata_dir / name).read_bytes()

    def floors(self) -> dict[str, int]:
        entry = self.targets().signed.targets.get(FLOORS_TARGET)
        return dict(entry.custom["floors"]) if entry is not None else {}

    # ---------------------------------------------------------------- root (offline)

    def publish_root(self, root: bytes) -> None:
        """Add root metadata N (already signed offline) to the served chain ``1.root.json .. N.root.json``.

        Checks it is self-signed and the next version; after a rotation that
        changes release or fleet keys, re-sign targets / publish with the new keys.
        """
        md = Metadata[Root].from_bytes(root)
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        current = self.metadata_dir / "root.json"
        if current.exists():
            old = self.root()
            if md.signed.version != old.signed.version + 1:
                raise ValueError(f"expected root v{old.signed.version + 1}, got v{md.signed.version}")
            old.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        self._write(f"{md.signed.version}.root.json", root)
        self._write("root.json", root)

    # ---------------------------------------------------------------- targets (release keys)

    def add_target(
        self,
        name: str,
        source: Path,
        custom: TargetCustom,
        release_keys: list[KeyPair],
    ) -> TargetFile:
        """Copy ``source`` in as target ``name`` (hashing it once) and sign new targets metadata."""
        _check_name(name)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.targets_dir / f".incoming.{os.getpid()}"
        h = hashlib.sha256()
        length = 0
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    dst.write(chunk)
                    length += len(chunk)
            digest = h.hexdigest()
            os.replace(tmp, self._target_file(name, digest))
        finally:
            tmp.unlink(missing_ok=True)
        entry = TargetFile(length, {"sha256": digest}, name, {"custom": custom.to_dict()})
        self._update_targets(lambda t: t.targets.__setitem__(name, entry), release_keys)
        return entry

    def remove_target(self, name: str, release_keys: list[KeyPair]) -> None:
        """Stop listing a target (its bytes stay until pruned: older snapshots may still name them)."""
        if name not in self.targets().signed.targets:
            raise KeyError(f"no target {name!r}")
        self._update_targets(lambda t: t.targets.pop(name), release_keys)

    def set_floor(self, family: str, floor: int, release_keys: list[KeyPair]) -> dict[str, int]:
        """Raise the signed revocation floor of ``family``; releases below it are refused by devices."""
        floors = self.floors()
        if floor < floors.get(family, 0):
            raise ValueError(f"the floor of {family!r} is {floors[family]}; floors never go down")
        floors[family] = floor
        data = json.dumps({"floors": floors}, sort_keys=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._target_file(FLOORS_TARGET, digest), data)
        entry = TargetFile(len(data), {"sha256": digest}, FLOORS_TARGET, {"custom": {"floors": floors}})
        self._update_targets(lambda t: t.targets.__setitem__(FLOORS_TARGET, entry), release_keys)
        return floors

    def resign_targets(self, release_keys: list[KeyPair]) -> None:
        """New targets version with the same content (after release keys were rotated or revoked)."""
        self._update_targets(lambda t: None, release_keys)

    def _update_targets(self, change: Any, release_keys: list[KeyPair]) -> None:
        if not release_keys:
            raise ValueError("targets metadata needs at least one release key to sign it")
        md = self.targets()
        change(md.signed)
        md.signed.version += 1
        md.signed.expires = _now() + TARGETS_EXPIRY
        self._write_targets(md, release_keys)

    def _write_targets(self, md: Metadata[Targets], release_keys: list[KeyPair]) -> None:
        md.signatures.clear()
        for kp in release_keys:
            md.sign(signer_for(kp), append=True)
        data = md.to_bytes(_SERIALIZER)
        self._write(f"{md.signed.version}.targets.json", data)
        self._write("targets.json", data)

    # ---------------------------------------------------------------- snapshot + timestamp (online fleet key)

    def publish(
        self,
        fleet_key: KeyPair,
        *,
        snapshot_expiry: timedelta = SNAPSHOT_EXPIRY,
        timestamp_expiry: timedelta = TIMESTAMP_EXPIRY,
    ) -> int:
        """Sign a snapshot of the current targets version and a timestamp pointing at it.

        Returns the snapshot version.
        """
        targets_version = self.targets().signed.version
        snap_path = self.metadata_dir / "snapshot.json"
        version = self.snapshot().signed.version + 1 if snap_path.exists() else 1
        snapshot = Metadata(
            Snapshot(
                version=version,
                expires=_now() + snapshot_expiry,
                meta={"targets.json": MetaFile(version=targets_version)},
            )
        )
        snapshot.sign(signer_for(fleet_key))
        data = snapshot.to_bytes(_SERIALIZER)
        self._write(f"{version}.snapshot.json", data)
        self._write("snapshot.json", data)
        self._write_timestamp(fleet_key, version, timestamp_expiry)
        return version

    def refresh_timestamp(self, fleet_key: KeyPair, expiry: timedelta = TIMESTAMP_EXPIRY) -> int:
        """Re-sign the timestamp only (same snapshot), pushing its expiry forward; return its version."""
        return self._write_timestamp(fleet_key, self.snapshot().signed.version, expiry)

    def _write_timestamp(self, fleet_key: KeyPair, snapshot_version: int, expiry: timedelta) -> int:
        ts_path = self.metadata_dir / "timestamp.json"
        version = self.timestamp().signed.version + 1 if ts_path.exists() else 1
        ts = Metadata(
            Timestamp(
                version=version,
                expires=_now() + expiry,
                snapshot_meta=MetaFile(version=snapshot_version),
            )
        )
        ts.sign(signer_for(fleet_key))
        self._write("timestamp.json", ts.to_bytes(_SERIALIZER))
        return version

    # ---------------------------------------------------------------- files

    def _target_file(self, name: str, digest: str) -> Path:
        dirname, _, basename = name.rpartition("/")
        folder = self.targets_dir / dirname if dirname else self.targets_dir
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{digest}.{basename}"

    def target_file(self, name: str) -> Path:
        """Where the bytes of a listed target are served from."""
        entry = self.targets().signed.targets[name]
        return self._target_file(name, entry.hashes["sha256"])

    def _write(self, name: str, data: bytes) -> None:
        _atomic_write(self.metadata_dir / name, data)


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("_edgefleet/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"illegal target name {name!r}")


def _link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link (no second copy of a 100 MB bundle) or, across file systems, copy atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def custom_for_bundle(manifest_fields: Mapping[str, Any], family: str | None = None) -> TargetCustom:
    """Target custom fields from a bundle manifest (family defaults to the model name)."""
    return TargetCustom(
        family=family or str(manifest_fields["name"]),
        release=int(manifest_fields["release"]),
        hardware_ids=[str(h) for h in manifest_fields["hardware_ids"]],
        extra={"version": str(manifest_fields.get("version", ""))},
    )


__all__ = ["TufRepository", "build_root", "custom_for_bundle", "public_key_of", "signer_for", "sslib_key"]
