"""The trust root: which keys may sign bundles (release) and directives (fleet).

The root key(s) sign this document (threshold k of n); a device pins it at
provisioning and accepts a new one only as a chain N -> N+1, each link signed by
the threshold of the root it replaces AND of its own root keys (the TUF root
rule), so losing fewer than k old root keys never lets anyone re-root a fleet.
The same key set is published as TUF root metadata (``signing.tuf_repo``) for
delivery; this DSSE form is what directive and bundle checks read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from signing.dsse import parse_envelope, sign_envelope, verify_envelope
from signing.errors import ExpiredMetadata, MalformedEnvelope, RootChainBroken, TrustError
from signing.keys import KeyPair, PublicKey

PAYLOAD_TYPE = "application/vnd.edgefleet.trust-root+json"


def _keys(entries: Any) -> dict[str, PublicKey]:
    keys = [PublicKey.from_dict(e) for e in entries]
    return {k.keyid: k for k in keys}


@dataclass(frozen=True)
class TrustRoot:
    version: int
    expires: datetime
    root_keys: dict[str, PublicKey]
    root_threshold: int
    release_keys: dict[str, PublicKey]
    fleet_keys: dict[str, PublicKey]
    envelope: dict[str, Any]

    def to_bytes(self) -> bytes:
        return json.dumps(self.envelope, indent=2).encode()

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, raw: bytes | str | Mapping[str, Any], now: datetime | None = None) -> TrustRoot:
        """Parse and self-verify a trust root (its root keys must meet their threshold)."""
        env = parse_envelope(raw)
        import base64

        try:
            body = json.loads(base64.b64decode(env["payload"]))
            root_keys = _keys(body["root_keys"])
            threshold = int(body["root_threshold"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedEnvelope(f"trust root is malformed: {exc}") from exc
        verify_envelope(env, PAYLOAD_TYPE, root_keys, threshold)
        try:
            root = cls(
                version=int(body["version"]),
                expires=datetime.fromisoformat(body["expires"]),
                root_keys=root_keys,
                root_threshold=threshold,
                release_keys=_keys(body["release_keys"]),
                fleet_keys=_keys(body["fleet_keys"]),
                envelope=env,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedEnvelope(f"trust root is malformed: {exc}") from exc
        if (now or datetime.now(UTC)) > root.expires:
            raise ExpiredMetadata(f"trust root v{root.version} expired at {root.expires.isoformat()}")
        return root

    @classmethod
    def load_file(cls, path: Path) -> TrustRoot:
        return cls.load(Path(path).read_bytes())

    def verify_successor(
        self, raw: bytes | str | Mapping[str, Any], now: datetime | None = None
    ) -> TrustRoot:
        """Accept ``raw`` as the next root only if it is v N+1, self-signed, and signed by our threshold.

        Raises RootChainBroken with the reason (wrong version, or the old root's
        threshold did not sign it); the new root's own signature and expiry checks
        raise their usual errors.
        """
        try:
            new = TrustRoot.load(raw, now=now)
        except ExpiredMetadata:
            # An intermediate root may have expired since; only the final one must be current.
            new = TrustRoot.load(raw, now=datetime.min.replace(tzinfo=UTC))
        if new.version != self.version + 1:
            raise RootChainBroken(f"expected trust root v{self.version + 1}, got v{new.version}")
        try:
            verify_envelope(new.envelope, PAYLOAD_TYPE, self.root_keys, self.root_threshold)
        except TrustError as exc:
            raise RootChainBroken(
                f"trust root v{new.version} is not signed by {self.root_threshold} key(s) "
                f"of v{self.version}: {exc}"
            ) from exc
        return new

    def follow(self, chain: list[bytes], now: datetime | None = None) -> TrustRoot:
        """Walk ``chain`` (roots v N+1, N+2, ... in order) from this pinned root; return the last one.

        The final root must not be expired.
        """
        current = self
        for raw in chain:
            current = current.verify_successor(raw, now=now)
        if (now or datetime.now(UTC)) > current.expires:
            raise ExpiredMetadata(f"trust root v{current.version} expired at {current.expires.isoformat()}")
        return current


def create_trust_root(
    root_keys: list[KeyPair],
    release_keys: list[PublicKey],
    fleet_keys: list[PublicKey],
    version: int = 1,
    expires: datetime | None = None,
    threshold: int = 1,
    previous_root_keys: list[KeyPair] | None = None,
) -> TrustRoot:
    """Sign a trust root with ``root_keys`` (and, for a rotation, the replaced root's keys too)."""
    if not 1 <= threshold <= len(root_keys):
        raise ValueError(f"root threshold {threshold} must be between 1 and {len(root_keys)}")
    if expires is None:
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)
    body = {
        "version": version,
        "expires": expires.isoformat(),
        "root_threshold": threshold,
        "root_keys": [k.public.to_dict() for k in root_keys],
        "release_keys": [k.to_dict() for k in release_keys],
        "fleet_keys": [k.to_dict() for k in fleet_keys],
    }
    payload = json.dumps(body, sort_keys=True).encode()
    signers = {k.keyid: k for k in [*root_keys, *(previous_root_keys or [])]}
    env = sign_envelope(payload, PAYLOAD_TYPE, signers.values())
    return TrustRoot.load(env)
