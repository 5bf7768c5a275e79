"""A device proves who it is on HTTP by signing each request with the key it was provisioned with.

Every device holds an ECDSA P-256 key and a certificate for it from the fleet CA
(CN = device id; ``edgefleet devices provision`` issues both, whatever the broker
authenticates by). A request it sends to the server (a capture upload) carries:

- ``X-Edgefleet-Device``: the device id;
- ``X-Edgefleet-Device-Cert``: its certificate (base64 DER);
- ``X-Edgefleet-Content-SHA256``: the body's SHA-256 (hex);
- ``X-Edgefleet-Signature``: base64 ECDSA-SHA256 over ``DOMAIN``, the method, the path,
  the device id and the body hash, one per line.

The server checks the certificate against the fleet CA, its CN against the claimed
id, its validity dates against the server's clock, the signature, and the body hash
against the bytes it read. No device clock is involved: device clocks are skewed
(the simulator runs devices hours off) and every signed request is idempotent (a
capture batch has its own id), so a replayed request changes nothing. Why not
mutual TLS: it needs TLS terminated where the client certificate can be read,
which a CDN or a plain reverse proxy in front of the server does not give, while a
signed request verifies the same anywhere. Only ``cryptography`` is used, so the
device side stays light.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DOMAIN = b"edgefleet-device-request-v1"
DEVICE_HEADER = "X-Edgefleet-Device"
CERT_HEADER = "X-Edgefleet-Device-Cert"
DIGEST_HEADER = "X-Edgefleet-Content-SHA256"
SIGNATURE_HEADER = "X-Edgefleet-Signature"
MAX_CERT_BYTES = 8192


class DeviceAuthError(ValueError):
    """A device request's credentials are missing, malformed or do not verify; ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeviceIdentity:
    """What a device signs requests with: its id, its private key and its certificate (DER)."""

    device_id: str
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes

    @classmethod
    def load(cls, device_id: str, cert_file: str, key_file: str) -> DeviceIdentity:
        """From the PEM files provisioning wrote (``device.crt``, ``device.key``)."""
        with open(cert_file, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        with open(key_file, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise DeviceAuthError("unsupported_key", f"{key_file}: a device key must be ECDSA P-256")
        return cls(device_id, key, cert.public_bytes(serialization.Encoding.DER))


def message(method: str, path: str, device_id: str, body_sha256: str) -> bytes:
    """The bytes a device signs: what the request does, to what, as whom, with which body."""
    return b"\n".join(
        [DOMAIN, method.upper().encode(), path.encode(), device_id.encode(), body_sha256.encode()]
    )


def sign_request(identity: DeviceIdentity, method: str, path: str, body: bytes) -> dict[str, str]:
    """The headers that authenticate ``body`` sent as ``method path`` by ``identity``."""
    digest = hashlib.sha256(body).hexdigest()
    signature = identity.key.sign(
        message(method, path, identity.device_id, digest), ec.ECDSA(hashes.SHA256())
    )
    return {
        DEVICE_HEADER: identity.device_id,
        CERT_HEADER: base64.b64encode(identity.cert_der).decode(),
        DIGEST_HEADER: digest,
        SIGNATURE_HEADER: base64.b64encode(signature).decode(),
    }


def verify_request(
    headers: dict[str, str],
    method: str,
    path: str,
    body_sha256: str | None,
    ca: x509.Certificate,
    now: datetime | None = None,
) -> str:
    """The device id a request proves, or :class:`DeviceAuthError`.

    ``headers`` with lower-case names (as ASGI gives them); ``body_sha256``: the hash of the
    bytes the server actually read, or None to check the signature before reading the body (then
    the caller must compare the claimed digest, returned in the headers, once it has the body).
    """
    device_id = headers.get(DEVICE_HEADER.lower())
    cert_b64 = headers.get(CERT_HEADER.lower())
    digest = headers.get(DIGEST_HEADER.lower())
    sig_b64 = headers.get(SIGNATURE_HEADER.lower())
    if not (device_id and cert_b64 and digest and sig_b64):
        raise DeviceAuthError(
            "device_unauthenticated", "a device request must be signed (X-Edgefleet-* headers)"
        )
    if len(cert_b64) > MAX_CERT_BYTES * 2 or len(sig_b64) > 512:
        raise DeviceAuthError("device_credentials_invalid", "device certificate or signature too large")
    if body_sha256 is not None and digest != body_sha256:
        raise DeviceAuthError("digest_mismatch", "the body does not match its signed SHA-256")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(cert_b64, validate=True))
        signature = base64.b64decode(sig_b64, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise DeviceAuthError("device_credentials_invalid", f"malformed device certificate: {exc}") from exc
    _check_certificate(cert, ca, device_id, now or datetime.now(UTC))
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise DeviceAuthError("device_credentials_invalid", "the device certificate's key is not ECDSA")
    try:
        public.verify(signature, message(method, path, device_id, digest), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise DeviceAuthError(
            "bad_signature", f"the request's signature does not verify for {device_id}"
        ) from None
    return device_id


def _check_certificate(cert: x509.Certificate, ca: x509.Certificate, device_id: str, now: datetime) -> None:
    ca_key = ca.public_key()
    if cert.issuer != ca.subject or not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise DeviceAuthError("device_credentials_invalid", "the device certificate is not from the fleet CA")
    try:
        ca_key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm or hashes.SHA256()),
        )
    except InvalidSignature:
        raise DeviceAuthError(
            "device_credentials_invalid", "the device certificate is not from the fleet CA"
        ) from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise DeviceAuthError("device_credentials_invalid", "the device certificate is not valid now")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        # the broker's server certificate comes from the same CA: it must not speak as a device
        raise DeviceAuthError(
            "device_credentials_invalid", "the certificate is not a device (client) certificate"
        )
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [device_id]:
        raise DeviceAuthError("wrong_device", f"the certificate is not {device_id}'s")


__all__ = [
    "CERT_HEADER",
    "DEVICE_HEADER",
    "DIGEST_HEADER",
    "SIGNATURE_HEADER",
    "DeviceAuthError",
    "DeviceIdentity",
    "sign_request",
    "verify_request",
]
