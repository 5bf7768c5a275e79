"""Device request signatures: what the server accepts from a device on HTTP, and what it refuses."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.provision import fleet_ca, issue_cert
from signing.device_auth import (
    CERT_HEADER,
    DeviceAuthError,
    DeviceIdentity,
    sign_request,
    verify_request,
)
from signing.keyring import KeyDir, init_keys

PATH = "/api/v1/captures/cam-1/b1"


def _identity(
    ca_dir: Path, device_id: str, *, server: bool = False
) -> tuple[DeviceIdentity, x509.Certificate]:
    if not (ca_dir / "keys.json").exists():
        init_keys(ca_dir)
    ca = fleet_ca(KeyDir(ca_dir))
    pem, key = issue_cert(ca, device_id, server=server)
    cert = x509.load_pem_x509_certificate(pem)
    return DeviceIdentity(device_id, key, cert.public_bytes(serialization.Encoding.DER)), ca.cert


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _refused(code: str, *args: object, **kwargs: object) -> None:
    with pytest.raises(DeviceAuthError) as info:
        verify_request(*args, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == code, info.value


def test_a_signed_request_proves_its_device(tmp_path: Path) -> None:
    me, ca = _identity(tmp_path / "k", "cam-1")
    body = b'{"items": []}'
    headers = _lower(sign_request(me, "PUT", PATH, body))
    assert verify_request(headers, "PUT", PATH, hashlib.sha256(body).hexdigest(), ca) == "cam-1"
    assert verify_request(headers, "put", PATH, None, ca) == "cam-1"  # checked before the body is read


def test_tampering_and_borrowed_credentials_are_refused(tmp_path: Path) -> None:
    me, ca = _identity(tmp_path / "k", "cam-1")
    body = b"captured"
    headers = _lower(sign_request(me, "PUT", PATH, body))
    _refused("digest_mismatch", headers, "PUT", PATH, hashlib.sha256(b"other").hexdigest(), ca)
    _refused("bad_signature", headers, "PUT", "/api/v1/captures/cam-1/b2", None, ca)
    _refused("bad_signature", headers, "POST", PATH, None, ca)
    _refused("wrong_device", {**headers, "x-edgefleet-device": "cam-2"}, "PUT", PATH, None, ca)
    # another CA's certificate with the right name, and the broker's server certificate from ours
    rogue, _ = _identity(tmp_path / "rogue", "cam-1")
    _refused(
        "device_credentials_invalid", _lower(sign_request(rogue, "PUT", PATH, body)), "PUT", PATH, None, ca
    )
    broker, _ = _identity(tmp_path / "k", "cam-1", server=True)
    _refused(
        "device_credentials_invalid", _lower(sign_request(broker, "PUT", PATH, body)), "PUT", PATH, None, ca
    )
    # unsigned, or signed with garbage
    _refused("device_unauthenticated", {}, "PUT", PATH, None, ca)
    _refused("device_credentials_invalid", {**headers, CERT_HEADER.lower(): "!!"}, "PUT", PATH, None, ca)


def test_an_expired_device_certificate_is_refused(tmp_path: Path) -> None:
    init_keys(tmp_path / "k")
    ca = fleet_ca(KeyDir(tmp_path / "k"))
    key = ec.generate_private_key(ec.SECP256R1())
    then = datetime.now(UTC) - timedelta(days=30)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-1")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(then - timedelta(days=1))
        .not_valid_after(then)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    me = DeviceIdentity("cam-1", key, cert.public_bytes(serialization.Encoding.DER))
    _refused(
        "device_credentials_invalid", _lower(sign_request(me, "PUT", PATH, b"x")), "PUT", PATH, None, ca.cert
    )
    assert base64.b64decode(sign_request(me, "PUT", PATH, b"x")["X-Edgefleet-Signature"])
