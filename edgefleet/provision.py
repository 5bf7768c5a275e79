"""Device identity: the fleet CA, client certificates, the Mosquitto password file, bootstrap files.

A device gets, once, at provisioning:

- MQTT credentials: a username equal to its device id and a random password,
  whose PBKDF2 hash (Mosquitto's ``$7$`` format) goes into the broker's
  password file; and a client certificate (CN = device id) from the fleet CA,
  for brokers configured for mutual TLS. The broker binds the client id to that
  identity, so the credentials of A never speak as B.
- ``agent.toml``: the agent configuration it runs with as written
  (``python -m device_agent --config agent.toml``): broker address, TLS on, the
  CA, and the client certificate or the username with the password in a file
  of its own (0600, never in the TOML), trust anchors, data directory.
- ``bootstrap.json``: its id and hardware id, the broker address, and the trust
  anchors it pins: TUF root metadata and the DSSE trust root (embedded, never
  fetched), plus the CA certificate that authenticates the broker.

Two CAs live in the key directory (``ca/``), their keys encrypted with the key
passphrase when one is given: the fleet CA (the broker's certificate, device
certificates) and the server CA, which only ever signs the fleet server's own
client certificate, so that only the server gets onto the broker's server
listener (``edgefleet.broker_config``). Certificates are ECDSA P-256: every TLS
stack a device may have speaks it.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.mirrors import check_mirrors
from device_agent.protocol import DEVICE_ID_RE
from fleet_server.mqtt_identity import SERVER_ACCOUNT, is_reserved
from signing.keyring import KeyDir
from signing.keys import KeyLocked, WrongPassphrase, is_encrypted_pem, write_private

CA_DIR = "ca"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CA_CERT = "server-ca.crt"
SERVER_CA_KEY = "server-ca.key"
BOOTSTRAP_FILE = "bootstrap.json"
AGENT_CONFIG_FILE = "agent.toml"
HTTP_CA_FILE = "http-ca.crt"  # a device's copy of the CA of the server's HTTPS certificate
PASSWORD_FILE = "mqtt.password"
AUTH_MODES = ("password", "mtls")
# Mosquitto 2.0's password hash: PBKDF2-HMAC-SHA512, 12-byte salt, 101 iterations (mosquitto_passwd)
PW_ITERATIONS = 101
PW_SALT_BYTES = 12


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
    return _load_ca(keydir, CA_CERT, CA_KEY, "edgefleet fleet CA", passphrase, create)


def server_ca(keydir: KeyDir, passphrase: bytes | None = None, *, create: bool = True) -> FleetCA:
    """The CA of the broker's server listener: it signs the fleet server's client certificate only."""
    return _load_ca(keydir, SERVER_CA_CERT, SERVER_CA_KEY, "edgefleet server CA", passphrase, create)


def _load_ca(
    keydir: KeyDir, cert_name: str, key_name: str, common_name: str, passphrase: bytes | None, create: bool
) -> FleetCA:
    d = keydir.path / CA_DIR
    cert_path, key_path = d / cert_name, d / key_name
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
        raise ProvisionError(f"no {common_name} in {d}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
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


def hash_password_line(username: str, password: str, *, salt: bytes | None = None) -> str:
    """``username:$7$101$salt$hash``: the line ``mosquitto_passwd`` writes (PBKDF2-HMAC-SHA512).

    Computed here (no subprocess per device), so a fleet of thousands is written in a moment;
    ``tests/security/test_broker_acl.py`` checks the real broker accepts it, and that it matches
    ``mosquitto_passwd`` for the same salt.
    """
    if not username or ":" in username or "\n" in username or "\n" in password:
        raise ProvisionError("usernames may not be empty or contain ':' or newlines")
    salt = salt if salt is not None else secrets.token_bytes(PW_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PW_ITERATIONS)
    b64 = base64.b64encode
    return f"{username}:$7${PW_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def set_password(password_file: Path, username: str, password: str, *, mode: int = 0o640) -> None:
    """Add or replace ``username`` in a Mosquitto password file (atomic replace; reload with SIGHUP)."""
    set_passwords(password_file, {username: password}, mode=mode)


def set_passwords(password_file: Path, passwords: dict[str, str], *, mode: int = 0o640) -> None:
    """Add or replace several users at once (one rewrite of the file for a whole fleet)."""
    new = [hash_password_line(user, pw) for user, pw in passwords.items()]
    _rewrite_password_file(password_file, set(passwords), new, mode)


def remove_password(password_file: Path, username: str) -> None:
    """Drop ``username`` from a password file, if it is there."""
    if password_file.exists():
        _rewrite_password_file(password_file, {username}, [], password_file.stat().st_mode & 0o777)


def _rewrite_password_file(password_file: Path, drop: set[str], add: list[str], mode: int) -> None:
    kept = []
    if password_file.exists():
        kept = [ln for ln in password_file.read_text().splitlines() if ln and ln.split(":", 1)[0] not in drop]
    password_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = password_file.with_name(f".{password_file.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{ln}\n" for ln in kept + add))
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
    agent_config: Path
    auth: str


def check_device_id(device_id: str) -> None:
    """Device ids become MQTT usernames, client ids and topic levels: no wildcards, no '%', no '/',
    and nothing that could be (or become) one of the fleet server's client ids."""
    if not DEVICE_ID_RE.match(device_id):
        raise ProvisionError(f"invalid device id {device_id!r}: use letters, digits, '.', '_' or '-'")
    if is_reserved(device_id):
        raise ProvisionError(
            f"{device_id!r} is reserved: ids starting with {SERVER_ACCOUNT!r} belong to the fleet server"
        )


def agent_mqtt_keys(
    auth: str,
    *,
    ca_file: Path | str,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
    username: str | None = None,
    password_file: Path | str | None = None,
) -> dict[str, Any]:
    """The ``mqtt_*`` keys of an agent configuration for a production broker, one auth mode.

    The one place that says what a device presents: ``mtls`` its client certificate (the broker
    takes its CN as the username), ``password`` its username and the file holding its password.
    In password mode the certificate is given too when there is one: the broker ignores it (it
    verifies it against the same CA and takes the identity from the password), but the device
    signs what it sends over HTTP with it (capture uploads, ``signing.device_auth``) and presents
    it to an HTTPS server that asks.
    """
    if auth not in AUTH_MODES:
        raise ProvisionError(f"auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
    keys: dict[str, Any] = {"mqtt_tls": True, "mqtt_ca_file": str(ca_file)}
    if auth == "mtls":
        if cert_file is None or key_file is None:
            raise ProvisionError("mtls needs a client certificate and its key")
        keys |= {"mqtt_cert_file": str(cert_file), "mqtt_key_file": str(key_file)}
    else:
        if not username or password_file is None:
            raise ProvisionError("password auth needs a username and a password file")
        keys |= {"mqtt_username": username, "mqtt_password_file": str(password_file)}
        if cert_file is not None and key_file is not None:
            keys |= {"mqtt_cert_file": str(cert_file), "mqtt_key_file": str(key_file)}
    return keys


def write_device_identity(ca: FleetCA, device_id: str, out_dir: Path, *, durable: bool = True) -> str:
    """A device's two broker credentials in ``out_dir`` (0700): ``device.crt``/``device.key`` (CN =
    its id, from the fleet CA) and a new random password in ``mqtt.password`` (0600), returned.

    ``durable=False`` skips the fsync of each secret: for the throwaway identities of a local
    broker's simulated fleet, where two fsyncs per device were three quarters of issuing a
    thousand of them."""
    check_device_id(device_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    cert_pem, key = issue_cert(ca, device_id)
    password = secrets.token_urlsafe(24)
    if durable:
        write_cert_and_key(cert_pem, key, out_dir / "device.crt", out_dir / "device.key")
        write_private(out_dir / PASSWORD_FILE, f"{password}\n".encode())
        return password
    (out_dir / "device.crt").write_bytes(cert_pem)
    for name, data in (("device.key", _key_pem(key, None)), (PASSWORD_FILE, f"{password}\n".encode())):
        fd = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return password


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
    auth: str | None = None,
    data_dir: str = "data",
    http_ca_file: Path | None = None,
    mirrors: list[str] | None = None,
) -> Provisioned:
    """Create a device's credentials, ``agent.toml`` and bootstrap directory; add its password hash
    to ``password_file``.

    ``auth``: what ``agent.toml`` authenticates with (``password`` or ``mtls``); by default
    ``password`` when a broker password file is given, else ``mtls``. Both credentials are made
    either way (the bootstrap file carries both), so a broker can switch modes later.
    ``data_dir``: the agent's state directory as the TOML names it (relative: next to the TOML).
    ``http_ca_file``: the CA of the server's HTTPS certificate, copied next to the TOML and named
    in it (:func:`http_ca_choice`).
    ``mirrors``: base URLs of published trees the agent downloads from, in order (static delivery,
    docs/trust.md); none: from the URLs each directive names.
    """
    check_device_id(device_id)
    if not hardware_id or not DEVICE_ID_RE.match(hardware_id):
        raise ProvisionError(f"invalid hardware id {hardware_id!r}")
    auth = auth or ("password" if password_file is not None else "mtls")
    if auth not in AUTH_MODES:
        raise ProvisionError(f"auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
    if not data_dir:
        raise ProvisionError("data_dir may not be empty")
    out_dir = Path(out_dir)
    if (out_dir / BOOTSTRAP_FILE).exists() and not force:
        raise FileExistsError(f"{out_dir / BOOTSTRAP_FILE} exists; pass force to re-provision")
    try:
        mirrors = check_mirrors(mirrors or [])
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    http_ca = http_ca_choice(metadata_url, targets_url, http_ca_file, mirrors)
    http_ca_pem = http_ca_file.read_bytes() if http_ca_file is not None else None  # before any write
    trust_bytes = keydir.trust_path.read_bytes()
    keydir.trust_root()  # refuse to hand out a trust root that does not verify
    tuf_root = keydir.tuf_root()
    ca = fleet_ca(keydir, passphrase)
    password = write_device_identity(ca, device_id, out_dir)
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
        "delivery": {"metadata_url": metadata_url, "targets_url": targets_url, "mirrors": mirrors},
        "trust_file": "trust.json",
        # the anchors, embedded so a device never bootstraps trust from anything it downloads
        "tuf_root": base64.b64encode(tuf_root).decode(),
        "trust_root": json.loads(trust_bytes),
        "provisioned_at": datetime.now(UTC).isoformat(),
    }
    write_private(out_dir / BOOTSTRAP_FILE, json.dumps(bootstrap, indent=2).encode())
    config: dict[str, Any] = {
        "device_id": device_id,
        "hardware_id": hardware_id,
        "data_dir": data_dir,
        "trust_path": "trust.json",
        "tuf_root_path": "root.json",
        "mqtt_host": broker_host,
        "mqtt_port": broker_port,
        **agent_mqtt_keys(
            auth, ca_file="ca.crt", cert_file="device.crt", key_file="device.key",
            username=device_id, password_file=PASSWORD_FILE,
        ),
    }  # fmt: skip
    tuf_url = _repository_base(metadata_url)
    if tuf_url:
        config["tuf_url"] = tuf_url
    if mirrors:
        config["mirrors"] = mirrors
    if http_ca_pem is not None:
        (out_dir / HTTP_CA_FILE).write_bytes(http_ca_pem)
    if http_ca is not None:
        config["http_ca_file"] = http_ca
    write_private(out_dir / AGENT_CONFIG_FILE, agent_toml(config).encode())
    if password_file is not None:
        set_password(password_file, device_id, password)
        readable_by_broker(password_file)
    return Provisioned(device_id, out_dir / BOOTSTRAP_FILE, device_id, password, out_dir / "device.crt",
                       out_dir / "device.key", out_dir / AGENT_CONFIG_FILE, auth)  # fmt: skip


def http_ca_choice(
    metadata_url: str | None,
    targets_url: str | None,
    http_ca_file: Path | None,
    mirrors: list[str] | None = None,
) -> str | None:
    """What ``agent.toml``'s ``http_ca_file`` names: a given CA's copy (``HTTP_CA_FILE``) always; else,
    when a delivery URL is https, the fleet CA (``ca.crt``: the server's certificate issued from it,
    as in a private fleet); else nothing, and the agent uses the system's trust store. Without URLs
    the agent downloads from where each directive points (the server's public URL): give the CA
    explicitly when that is https with a certificate no system store knows."""
    if http_ca_file is not None:
        return HTTP_CA_FILE
    urls = [metadata_url, targets_url, *(mirrors or [])]
    if any(url and urlsplit(url).scheme.lower() == "https" for url in urls):
        return CA_CERT
    return None


def agent_toml(values: dict[str, Any]) -> str:
    """An ``[agent]`` table of plain values (strings, numbers, booleans). Relative paths in it are
    resolved against the file's directory by ``device_agent.config.load_config``; a list of them."""
    lines = [
        "# Written by `edgefleet devices provision`; run: python -m device_agent --config agent.toml",
        "# Relative paths are resolved against this file's directory (docs/agent.md has every key).",
        "[agent]",
    ]
    for key, value in values.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # a JSON string (ASCII, \\ \" \uXXXX escapes) is a valid TOML basic string
    return json.dumps(str(value))


def _repository_base(metadata_url: str | None) -> str:
    """The agent's ``tuf_url`` from a metadata URL ``<base>/metadata/``; "" when it has another shape
    (the agent then derives the repository from each directive's model URL)."""
    if not metadata_url:
        return ""
    trimmed = metadata_url.rstrip("/")
    return trimmed[: -len("/metadata")] if trimmed.endswith("/metadata") else ""


def load_bootstrap(path: Path) -> dict[str, Any]:
    """Read a bootstrap file, checking the fields a device needs are there."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    for field in ("device_id", "hardware_id", "broker", "mqtt", "tuf_root", "trust_root"):
        if field not in data:
            raise ProvisionError(f"{path}: bootstrap lacks {field!r}")
    return data
