"""Ed25519 keys with stable key ids, stored as PEM.

A key id is the SHA-256 of the raw public key, so the same key always has the
same id wherever it is listed (trust root, envelope signature, server config).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEME = "ed25519"


def keyid_for(raw_public: bytes) -> str:
    """Key id: hex SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A public key we may trust for a role; serialisable into a trust root."""

    raw: bytes

    @property
    def keyid(self) -> str:
        return keyid_for(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "scheme": SCHEME, "public": self.raw.hex()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PublicKey:
        if data.get("scheme") != SCHEME or not isinstance(data.get("public"), str):
            raise ValueError(f"unsupported key entry: {data!r}")
        key = cls(bytes.fromhex(str(data["public"])))
        if "keyid" in data and data["keyid"] != key.keyid:
            raise ValueError("key id does not match the public key")
        return key


@dataclass(frozen=True)
class KeyPair:
    """A private signing key and its public half."""

    private: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def to_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the private key readable by its owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.to_pem())

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key)


def generate_keypair() -> KeyPair:
    return KeyPair(Ed25519PrivateKey.generate())
