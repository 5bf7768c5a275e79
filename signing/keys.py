"""Signing keys with stable key ids, stored as PEM: Ed25519, and ECDSA P-256 for release keys.

A key id is the SHA-256 of the raw public key (Ed25519: the 32-byte key; P-256:
the uncompressed X9.62 point), so the same key always has the same id wherever
it is listed (trust root, envelope signature, TUF metadata, server config).

Ed25519 is the default for every role: small, fast, deterministic signatures.
ECDSA P-256 exists for release keys because OpenSSF ``model_signing`` (and the
Sigstore ecosystem around it) verifies key-based signatures on the NIST curves
only; a release signed with P-256 can be checked by third parties with their own
tools, and a device still verifies it with ``cryptography`` alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ED25519 = "ed25519"
ECDSA_P256 = "ecdsa-sha2-nistp256"  # securesystemslib's / TUF's name for the scheme
SCHEME = ED25519  # the default scheme

# The names the CLI takes (``--release-algorithm``) -> the scheme stored with the key.
ALGORITHMS = {"ed25519": ED25519, "ecdsa-p256": ECDSA_P256, ECDSA_P256: ECDSA_P256}

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def scheme_for(algorithm: str) -> str:
    """The scheme for a CLI algorithm name or a scheme name; ValueError names the choices."""
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unknown key algorithm {algorithm!r}: choose ed25519 or ecdsa-p256") from None


def keyid_for(raw_public: bytes) -> str:
    """Key id: hex SHA-256 of the raw public key bytes."""
    return hashlib.sha256(raw_public).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A public key we may trust for a role; serialisable into a trust root.

    ``raw`` is the 32-byte Ed25519 key or, for ``ecdsa-sha2-nistp256``, the
    65-byte uncompressed point. ``scheme`` defaults to Ed25519 so every key
    made before P-256 existed reads the same.
    """

    raw: bytes
    scheme: str = ED25519

    def __post_init__(self) -> None:
        if self.scheme not in (ED25519, ECDSA_P256):
            raise ValueError(f"unsupported key scheme {self.scheme!r}")

    @property
    def keyid(self) -> str:
        return keyid_for(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` (Ed25519, or DER-encoded ECDSA with SHA-256) is valid over ``data``."""
        try:
            if self.scheme == ED25519:
                Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
            else:
                self._ec().verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            # ValueError: a point not on the curve or a malformed key; either way not a valid signature
            return False
        return True

    def _ec(self) -> ec.EllipticCurvePublicKey:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.raw)

    def crypto_key(self) -> Ed25519PublicKey | ec.EllipticCurvePublicKey:
        """The ``cryptography`` public key object."""
        if self.scheme == ED25519:
            return Ed25519PublicKey.from_public_bytes(self.raw)
        return self._ec()

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM: what third-party verifiers (``model_signing``, openssl) read."""
        return self.crypto_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "scheme": self.scheme, "public": self.raw.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PublicKey:
        scheme = data.get("scheme")
        if scheme not in (ED25519, ECDSA_P256) or not isinstance(data.get("public"), str):
            raise ValueError(f"unsupported key entry: {data!r}")
        key = cls(bytes.fromhex(str(data["public"])), str(scheme))
        if "keyid" in data and data["keyid"] != key.keyid:
            raise ValueError("key id does not match the public key")
        return key

    @classmethod
    def from_crypto(cls, key: Ed25519PublicKey | ec.EllipticCurvePublicKey) -> PublicKey:
        """Wrap a ``cryptography`` public key (Ed25519 or P-256; anything else is refused)."""
        if isinstance(key, Ed25519PublicKey):
            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            point = serialization.PublicFormat.UncompressedPoint
            return cls(key.public_bytes(serialization.Encoding.X962, point), ECDSA_P256)
        raise ValueError(f"unsupported public key type {type(key).__name__}")

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"unsupported public key type {type(key).__name__}")
        return cls.from_crypto(key)


@dataclass(frozen=True)
class KeyPair:
    """A private signing key and its public half."""

    private: PrivateKey

    def __post_init__(self) -> None:
        PublicKey.from_crypto(self.private.public_key())  # refuses curves other than P-256

    @property
    def public(self) -> PublicKey:
        return PublicKey.from_crypto(self.private.public_key())

    @property
    def scheme(self) -> str:
        return ED25519 if isinstance(self.private, Ed25519PrivateKey) else ECDSA_P256

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature, or DER-encoded ECDSA over SHA-256 (what DSSE, Sigstore and TUF expect)."""
        if isinstance(self.private, Ed25519PrivateKey):
            return self.private.sign(data)
        return self.private.sign(data, ec.ECDSA(hashes.SHA256()))

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
        return cls.from_pem(path.read_bytes(), passphrase, name=str(path))

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None, *, name: str = "key") -> KeyPair:
        """Decrypt PEM bytes in memory (``name`` labels errors); the plaintext key is never written."""
        encrypted = is_encrypted_pem(data)
        if encrypted and not passphrase:
            raise KeyLocked(f"{name} is encrypted: give its passphrase")
        try:
            key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
        except ValueError as exc:
            if encrypted:
                raise WrongPassphrase(f"{name}: wrong passphrase") from exc
            raise ValueError(f"{name}: not a PEM private key: {exc}") from exc
        if isinstance(key, Ed25519PrivateKey) or (
            isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            return cls(key)
        raise ValueError(f"{name}: not an Ed25519 or ECDSA P-256 private key")


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


def generate_keypair(algorithm: str = ED25519) -> KeyPair:
    """A fresh key: Ed25519 by default, ``ecdsa-p256`` (or its scheme name) for P-256."""
    if scheme_for(algorithm) == ECDSA_P256:
        return KeyPair(ec.generate_private_key(ec.SECP256R1()))
    return KeyPair(Ed25519PrivateKey.generate())
