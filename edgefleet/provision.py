"""Device identity: the fleet CA, client certificates, the Mosquitto password file, bootstrap files.

A device gets, once, at provisioning:

- MQTT credentials: a username equal to its device id and a random password,
  whose PBKDF2 hash (``mosquitto_passwd``'s format) goes into the broker's
  password file; and a client certificate (CN = device id) from the fleet CA,
  for brokers configured for mutual TLS. The broker binds the client id to that
  identity, so the credentials of A never speak as B.
- ``bootstrap.json``: its id and hardware id, the broker address, and the trust
  anchors it pins: TUF root metadata and the DSSE trust root (embedded, never
  fetched), plus the CA certificate that authenticates the broker.

The fleet CA lives in the key directory (``ca/``), its key encrypted with the
key passphrase when one is given. Certificates are ECDSA P-256: every TLS stack
a device may have speaks it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.protocol import DEVICE_ID_RE
from signing.keyring import KeyDir
from signing.keys import KeyLocked, WrongPassphrase, is_encrypted_pem, write_private

CA_DIR = "ca"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_ACCOUNT = "fleet-server"
RESERVED_IDS = frozenset({SERVER_ACCOUNT})
BOOTSTRAP_FILE = "bootstrap.json"


class ProvisionError(ValueError):
    """Provisioning cannot proceed (bad device id, missing tool, unreadable CA)."""


# ---------------------------------------------------------------- fleet CA


@dataclass(frozen=True)
class FleetCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def fleet_ca(keydir: KeyDir, passphrase: bytes | None = None, *, create: bool = True) -> FleetCA:
    """Load the fleet CA from ``<keys>/ca/``, creating it (10 years) on first use."""
    d = keydir.path / CA_DIR
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if cert_path.exists() and key_path.exists():
        data = key_path.read_bytes()
        if is_encrypted_pem(data) and not passphrase:
            raise KeyLocked(f"{key_path} is encrypted: give the key passphrase")
        try:
            key = serialization.load_pem_private_key(data, passphrase if is_encrypted_pem(data) else None)
        except ValueError as exc:
            raise WrongPassphrase(f"{key_path}: wrong passphrase or not a key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisionError(f"{key_path} is not an EC key")
        return FleetCA(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
    if not create:
        raise ProvisionError(f"no fleet CA in {d}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet fleet CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    write_private(key_path, _key_pem(key, passphrase))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return FleetCA(cert, key)


def issue_cert(
    ca: FleetCA,
    common_name: str,
    *,
    server: bool = False,
    hostnames: list[str] | None = None,
    days: int = 825,
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A leaf certificate (PEM) and its new key: clientAuth for devices, serverAuth + SANs for the broker."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for h in hostnames or ["localhost"]:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), key


def write_cert_and_key(
    cert_pem: bytes, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path, key_mode: int = 0o600
) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert_pem)
    write_private(key_path, _key_pem(key, None))
    os.chmod(key_path, key_mode)


# ---------------------------------------------------------------- Mosquitto password file


def mosquitto_passwd_binary() -> str:
    found = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if os.access("/usr/bin/mosquitto_passwd", os.X_OK) else None
    )
    if found is None:
        raise ProvisionError("mosquitto_passwd is not installed (Debian: apt-get install mosquitto)")
    return found


def hash_password_line(username: str, password: str) -> str:
    """``username:$7$...`` as Mosquitto stores it (PBKDF2-SHA512), made by ``mosquitto_passwd -U``.

    The plaintext goes through an owner-only temporary file, never the command line.
    """
    if ":" in username or "\n" in username or "\n" in password:
        raise ProvisionError("usernames may not contain ':' or newlines")
    with tempfile.TemporaryDirectory(prefix="ef-passwd-") as tmp:
        path = Path(tmp) / "plain"
        write_private(path, f"{username}:{password}\n".encode())
        out = subprocess.run(
            [mosquitto_passwd_binary(), "-U", str(path)], capture_output=True, text=True, timeout=30
        )
        if out.returncode != 0:
            raise ProvisionError(f"mosquitto_passwd failed: {out.stderr.strip() or out.stdout.strip()}")
        line = path.read_text().strip()
    if not line.startswith(f"{username}:$"):
        raise ProvisionError("mosquitto_passwd did not hash the password")
    return line


def set_password(password_file: Path, username: str, password: str, *, mode: int = 0o640) -> None:
    """Add or replace ``username`` in a Mosquitto password file (atomic replace; reload with SIGHUP)."""
    line = hash_password_line(username, password)
    lines = []
    if password_file.exists():
        lines = [
            ln for ln in password_file.read_text().splitlines() if ln and not ln.startswith(f"{username}:")
        ]
    lines.append(line)
    password_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = password_file.with_name(f".{password_file.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, password_file)


def readable_by_broker(*paths: Path) -> None:
    """Mosquitto drops to the ``mosquitto`` user: give that group read access when we run as root."""
    if os.geteuid() != 0:
        return
    import grp

    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return
    for p in paths:
        os.chown(p, 0, gid)


# ---------------------------------------------------------------- provisioning


@dataclass(frozen=True)
class Provisioned:
    device_id: str
    bootstrap: Path
    username: str
    password: str
    cert: Path
    key: Path


def check_device_id(device_id: str) -> None:
    """Device ids become MQTT usernames, client ids and topic levels: no wildcards, no '%', no '/'."""
    if not DEVICE_ID_RE.match(device_id):
        raise ProvisionError(f"invalid device id {device_id!r}: use letters, digits, '.', '_' or '-'")
    if device_id in RESERVED_IDS:
        raise ProvisionError(f"{device_id!r} is reserved for the fleet server's broker account")


def provision_device(
    keydir: KeyDir,
    device_id: str,
    hardware_id: str,
    out_dir: Path,
    *,
    broker_host: str,
    broker_port: int = 8883,
    password_file: Path | None = None,
    metadata_url: str | None = None,
    targets_url: str | None = None,
    passphrase: bytes | None = None,
    force: bool = False,
) -> Provisioned:
    """Create a device's credentials and bootstrap directory; add its password hash to ``password_file``."""
    check_device_id(device_id)
    if not hardware_id or not DEVICE_ID_RE.match(hardware_id):
        raise ProvisionError(f"invalid hardware id {hardware_id!r}")
    out_dir = Path(out_dir)
    if (out_dir / BOOTSTRAP_FILE).exists() and not force:
        raise FileExistsError(f"{out_dir / BOOTSTRAP_FILE} exists; pass force to re-provision")
    trust_bytes = keydir.trust_path.read_bytes()
    keydir.trust_root()  # refuse to hand out a trust root that does not verify
    tuf_root = keydir.tuf_root()
    ca = fleet_ca(keydir, passphrase)
    password = secrets.token_urlsafe(24)
    cert_pem, key = issue_cert(ca, device_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    write_cert_and_key(cert_pem, key, out_dir / "device.crt", out_dir / "device.key")
    (out_dir / "ca.crt").write_bytes(ca.cert_pem)
    (out_dir / "trust.json").write_bytes(trust_bytes)
    (out_dir / "root.json").write_bytes(tuf_root)
    bootstrap: dict[str, Any] = {
        "device_id": device_id,
        "hardware_id": hardware_id,
        "broker": {"host": broker_host, "port": broker_port, "tls": True, "ca_file": "ca.crt"},
        "mqtt": {
            "username": device_id,
            "password": password,
            "cert_file": "device.crt",
            "key_file": "device.key",
        },
        "delivery": {"metadata_url": metadata_url, "targets_url": targets_url},
        "trust_file": "trust.json",
        # the anchors, embedded so a device never bootstraps trust from anything it downloads
        "tuf_root": base64.b64encode(tuf_root).decode(),
        "trust_root": json.loads(trust_bytes),
        "provisioned_at": datetime.now(UTC).isoformat(),
    }
    write_private(out_dir / BOOTSTRAP_FILE, json.dumps(bootstrap, indent=2).encode())
    if password_file is not None:
        set_password(password_file, device_id, password)
        readable_by_broker(password_file)
    return Provisioned(device_id, out_dir / BOOTSTRAP_FILE, device_id, password, out_dir / "device.crt",
                       out_dir / "device.key")  # fmt: skip


def load_bootstrap(path: Path) -> dict[str, Any]:
    """Read a bootstrap file, checking the fields a device needs are there."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    for field in ("device_id", "hardware_id", "broker", "mqtt", "tuf_root", "trust_root"):
        if field not in data:
            raise ProvisionError(f"{path}: bootstrap lacks {field!r}")
    return data
