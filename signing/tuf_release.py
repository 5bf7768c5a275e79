"""Release-side edits of TUF targets metadata, and the server's check of what a release key signed.

The release key never reaches the fleet server. The release host (``edgefleet
models push`` / ``models revoke``) fetches the current targets metadata,
changes it here, signs it with its release key(s) and uploads the signed bytes;
the server only checks them (``verify_targets_update``) and then signs snapshot
and timestamp with the online fleet key. So a stolen fleet key can re-publish
what release keys signed, never add to it.

Also: the target name a directive's model maps to (``target_name``), and the
role keys of a TUF root as ``signing.keys.PublicKey`` (key ids are the same in
both worlds, decision 0004), so an agent that follows a TUF root chain also
knows the current fleet and release keys.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

from securesystemslib.exceptions import FormatError
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from signing.errors import MetadataExpired, MetadataInvalid, MetadataRollback, MetadataUnsigned
from signing.keys import KeyPair, PublicKey
from signing.targets import FLOORS_TARGET, TargetCustom, parse_floors
from signing.tuf_repo import TARGETS_EXPIRY, public_key_of, signer_for

_SERIALIZER = JSONSerializer(compact=False)


def target_name(model_name: str, version: str) -> str:
    """The TUF target path of release ``model_name:version`` (what a directive's ModelRef maps to)."""
    return f"models/{model_name}/{version}"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _load_targets(current: bytes | None) -> Metadata[Targets]:
    if current is None:
        md = Metadata(Targets(version=1, expires=_now() + TARGETS_EXPIRY))
        md.signed.version = 0  # _sign makes it 1, the first version
        return md
    return Metadata[Targets].from_bytes(current)


def _sign(md: Metadata[Targets], release_keys: list[KeyPair]) -> bytes:
    if not release_keys:
        raise ValueError("targets metadata needs at least one release key to sign it")
    md.signed.version += 1
    md.signed.expires = _now() + TARGETS_EXPIRY
    md.signatures.clear()
    for kp in release_keys:
        md.sign(signer_for(kp), append=True)
    return md.to_bytes(_SERIALIZER)


def sign_target_added(
    current: bytes | None,
    name: str,
    *,
    sha256: str,
    length: int,
    custom: TargetCustom,
    release_keys: list[KeyPair],
) -> bytes:
    """New targets metadata: ``current`` (None: the repository has none yet) plus target ``name``."""
    md = _load_targets(current)
    md.signed.targets[name] = TargetFile(length, {"sha256": sha256}, name, {"custom": custom.to_dict()})
    return _sign(md, release_keys)


def floors_file(floors: dict[str, int]) -> bytes:
    """The bytes of the reserved floors target (its content mirrors its signed custom field)."""
    return json.dumps({"floors": floors}, sort_keys=True).encode()


def sign_floor_raised(
    current: bytes | None, family: str, floor: int, release_keys: list[KeyPair]
) -> tuple[bytes, bytes]:
    """New targets metadata with ``family``'s revocation floor raised; returns (metadata, floors file)."""
    md = _load_targets(current)
    entry = md.signed.targets.get(FLOORS_TARGET)
    floors = parse_floors(entry.custom) if entry is not None else {}
    if floor < floors.get(family, 0):
        raise ValueError(f"the floor of {family!r} is {floors[family]}; floors never go down")
    floors[family] = floor
    data = floors_file(floors)
    md.signed.targets[FLOORS_TARGET] = TargetFile(
        len(data), {"sha256": hashlib.sha256(data).hexdigest()}, FLOORS_TARGET, {"custom": {"floors": floors}}
    )
    return _sign(md, release_keys), data


def verify_targets_update(root: bytes, current: bytes | None, new: bytes) -> Metadata[Targets]:
    """Check uploaded targets metadata the way a device will: signed by the root's release role,
    the next version, not expired, and no floor lowered. Raises the specific DeliveryError."""
    try:
        root_md = Metadata[Root].from_bytes(root)
        md = Metadata[Targets].from_bytes(new)
    except (DeserializationError, FormatError, ValueError, TypeError, KeyError) as exc:
        raise MetadataInvalid(f"targets metadata does not parse: {exc}") from exc
    try:
        root_md.signed.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
    except tuf_exc.UnsignedMetadataError as exc:
        raise MetadataUnsigned(f"targets metadata is not signed by a release key of the root: {exc}") from exc
    old_version = Metadata[Targets].from_bytes(current).signed.version if current is not None else 0
    if md.signed.version != old_version + 1:
        raise MetadataRollback(f"targets version {md.signed.version}, expected {old_version + 1}")
    if md.signed.is_expired(_now()):
        raise MetadataExpired(f"targets metadata expired at {md.signed.expires.isoformat()}")
    if current is not None:
        old = Metadata[Targets].from_bytes(current).signed.targets.get(FLOORS_TARGET)
        new_entry = md.signed.targets.get(FLOORS_TARGET)
        old_floors = parse_floors(old.custom) if old is not None else {}
        new_floors = parse_floors(new_entry.custom) if new_entry is not None else {}
        lowered = [f for f, v in old_floors.items() if new_floors.get(f, 0) < v]
        if lowered:
            raise MetadataInvalid(f"a revocation floor went down: {', '.join(sorted(lowered))}")
    return md


def role_keys(root: bytes, role: str) -> list[PublicKey]:
    """The keys a TUF root trusts for ``role`` (``targets`` = release, ``timestamp`` = fleet).

    Ed25519 or ECDSA P-256, under our key ids; keys edgefleet never writes are skipped.
    """
    md = Metadata[Root].from_bytes(root)
    out: list[PublicKey] = []
    for keyid in md.signed.roles[role].keyids:
        pub = public_key_of(md.signed.keys[keyid])
        if pub is not None:
            out.append(pub)
    return out


def release_keys_of(root: bytes) -> list[PublicKey]:
    return role_keys(root, Targets.type)


def fleet_keys_of(root: bytes) -> list[PublicKey]:
    return role_keys(root, Snapshot.type)


def root_version(root: bytes) -> int:
    version: int = Metadata[Root].from_bytes(root).signed.version
    return version


def timestamp_due(timestamp: bytes, margin: timedelta) -> bool:
    """True when the timestamp expires within ``margin`` (the server then re-signs it)."""
    md = Metadata.from_bytes(timestamp)
    return md.signed.expires <= datetime.now(UTC) + margin


__all__ = [
    "fleet_keys_of",
    "floors_file",
    "release_keys_of",
    "role_keys",
    "root_version",
    "sign_floor_raised",
    "sign_target_added",
    "target_name",
    "timestamp_due",
    "verify_targets_update",
]
