"""The server's online fleet key, decrypted in memory with a passphrase from the environment.

The fleet key stays encrypted at rest (PKCS#8, as ``edgefleet keys init`` writes
it); the server never writes a plaintext copy. The passphrase comes from the
first of these that is present:

1. the file named by ``key_passphrase_file`` (``EDGEFLEET_KEY_PASSPHRASE_FILE``):
   a Docker/Kubernetes secret or any root-owned file;
2. the environment variable ``EDGEFLEET_KEY_PASSPHRASE`` (CI, quick starts);
3. systemd's credential ``$CREDENTIALS_DIRECTORY/<key_credential>``
   (``LoadCredential=edgefleet-key-passphrase:/etc/edgefleet/key-passphrase``):
   systemd hands it to this service only, on a private non-swappable mount.

A file named explicitly must be readable and non-empty: a typo in a deployment
is an error, never a silent fall-through to a weaker source. The order puts the
explicit setting first so an environment variable inherited by accident cannot
override it.

Only ``<keys_dir>/fleet.key`` is read here. The server's other trust inputs are
public (``trust.json``, ``roots/``); root and release keys never need to be on
the server's disk (``signing.keyring.SERVER_FILES``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fleet_server.settings import ServerSettings
from signing.keys import KeyPair, WrongPassphrase, is_encrypted_pem

log = logging.getLogger(__name__)

FLEET_KEY_FILE = "fleet.key"
PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"
PASSPHRASE_FILE_ENV = "EDGEFLEET_KEY_PASSPHRASE_FILE"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


class FleetKeyError(RuntimeError):
    """The fleet key cannot be loaded. The message is one line: the key file and where a passphrase
    was looked for, so ``edgefleet server`` can print it instead of a traceback."""


@dataclass(frozen=True)
class Passphrase:
    value: bytes
    source: str  # where it came from, for error messages (never the value)


def source_names(settings: ServerSettings) -> list[str]:
    """The passphrase sources in the order they are tried, as a user would name them."""
    return [
        PASSPHRASE_FILE_ENV if settings.key_passphrase_file is None else str(settings.key_passphrase_file),
        f"${PASSPHRASE_ENV}",
        f"${CREDENTIALS_ENV}/{settings.key_credential}",
    ]


def find_passphrase(settings: ServerSettings, environ: Mapping[str, str]) -> Passphrase | None:
    """The first passphrase present, in the documented order; None when there is none at all."""
    if settings.key_passphrase_file is not None:
        return Passphrase(
            _read_secret(Path(settings.key_passphrase_file), "key_passphrase_file"),
            str(settings.key_passphrase_file),
        )
    value = environ.get(PASSPHRASE_ENV)
    if value:
        return Passphrase(value.encode(), f"${PASSPHRASE_ENV}")
    creds = environ.get(CREDENTIALS_ENV)
    if creds:
        path = Path(creds) / settings.key_credential
        if path.is_file():
            return Passphrase(
                _read_secret(path, "the systemd credential"), f"${CREDENTIALS_ENV}/{settings.key_credential}"
            )
    return None


def _read_secret(path: Path, what: str) -> bytes:
    """A passphrase file's content without its trailing newline (``echo`` and editors add one)."""
    try:
        value = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise FleetKeyError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not value:
        raise FleetKeyError(f"{what} {path} is empty")
    return value


def load_fleet_key(settings: ServerSettings, environ: Mapping[str, str] | None = None) -> KeyPair:
    """Load ``<keys_dir>/fleet.key``, decrypting it in memory when it is encrypted.

    Raises FleetKeyError (one line) when the file is missing, the passphrase is
    missing or wrong, or the file is not a key. An unencrypted key (tests, the
    demo) loads as it is, with a warning: production keys are encrypted.
    """
    path = Path(settings.keys_dir) / FLEET_KEY_FILE
    data = _read_key(path)
    if not is_encrypted_pem(data):
        log.warning("%s is not encrypted at rest: use `edgefleet keys init` with a passphrase", path)
        return _from_pem(data, None, path)
    return _decrypt(data, path, settings, environ)


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FleetKeyError(f"cannot read the fleet key {path}: {exc.strerror or exc}") from None


def _decrypt(data: bytes, path: Path, settings: ServerSettings, environ: Mapping[str, str] | None) -> KeyPair:
    environ = os.environ if environ is None else environ
    found = find_passphrase(settings, environ)
    if found is None:
        raise FleetKeyError(
            f"{path} is encrypted and no passphrase was found (looked in, in order: "
            f"{', '.join(source_names(settings))})"
        )
    try:
        return _from_pem(data, found.value, path)
    except WrongPassphrase:
        raise FleetKeyError(
            f"wrong passphrase for {path} (taken from {found.source}; sources in order: "
            f"{', '.join(source_names(settings))})"
        ) from None


def _from_pem(data: bytes, passphrase: bytes | None, path: Path) -> KeyPair:
    try:
        return KeyPair.from_pem(data, passphrase, name=str(path))
    except WrongPassphrase:
        raise
    except ValueError as exc:
        raise FleetKeyError(str(exc).splitlines()[0]) from None


def unlock_fleet_key(settings: ServerSettings, environ: Mapping[str, str] | None = None) -> KeyPair | None:
    """The fleet key decrypted now when it is encrypted, so that a missing or wrong passphrase (or
    an unreadable key file) is reported before the server's imports and database checks; None when
    it is not encrypted: the app loads it then, its warning in its usual place.

    Raises FleetKeyError as :func:`load_fleet_key` does."""
    path = Path(settings.keys_dir) / FLEET_KEY_FILE
    data = _read_key(path)
    return _decrypt(data, path, settings, environ) if is_encrypted_pem(data) else None
