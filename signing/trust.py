"""The trust root: which keys may sign bundles (release) and directives (fleet).

The root key(s) sign this document; a device pins it at provisioning. This is
the walking-skeleton form of the hierarchy in DESIGN.md; TUF delivery metadata
and root rotation build on it later without changing the roles.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from signing.dsse import parse_envelope, sign_envelope, verify_envelope
from signing.errors import ExpiredMetadata, MalformedEnvelope
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


def create_trust_root(
    root_keys: list[KeyPair],
    release_keys: list[PublicKey],
    fleet_keys: list[PublicKey],
    version: int = 1,
    expires: datetime | None = None,
    threshold: int = 1,
) -> TrustRoot:
    if expires is None:
        expires = datetime.now(UTC).replace(microsecond=0).replace(year=datetime.now(UTC).year + 1)
    body = {
        "version": version,
        "expires": expires.isoformat(),
        "root_threshold": threshold,
        "root_keys": [k.public.to_dict() for k in root_keys],
        "release_keys": [k.to_dict() for k in release_keys],
        "fleet_keys": [k.to_dict() for k in fleet_keys],
    }
    payload = json.dumps(body, sort_keys=True).encode()
    env = sign_envelope(payload, PAYLOAD_TYPE, root_keys)
    return TrustRoot.load(env)
