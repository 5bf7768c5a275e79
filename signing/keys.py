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

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM; encrypted with ``passphrase`` (cryptography's best available scheme) if given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def save(self, path: Path, passphrase: bytes | None = None) -> None:
        """Write the private key readable by its owner only, encrypted when a passphrase is given."""
        write_private(Path(path), self.to_pem(passphrase))

    @classmethod
    def load(cls, path: Path, passphrase: bytes | None = None) -> KeyPair:
        """Load a PEM key; an encrypted one needs its passphrase (KeyLocked / WrongPassphrase otherwise)."""
        path = Path(path)
        data = path.read_bytes()
        encrypted = is_encrypted_pem(data)
        if encrypted and not passphrase:
            raise KeyLocked(f"{path} is encrypted: give its passphrase")
        try:
            key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
        except ValueError as exc:
            if encrypted:
                raise WrongPassphrase(f"{path}: wrong passphrase") from exc
            raise ValueError(f"{path}: not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key)


class KeyLocked(ValueError):
    """The private key on disk is encrypted and no passphrase was given."""


class WrongPassphrase(ValueError):
    """The passphrase does not decrypt the private key."""


def is_encrypted_pem(data: bytes) -> bool:
    """PKCS#8 encrypted keys (and legacy encrypted PEM) announce themselves in the armour."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes owner-only (0600), replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def generate_keypair() -> KeyPair:
    return KeyPair(Ed25519PrivateKey.generate())
