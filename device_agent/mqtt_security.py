"""How an MQTT client proves who it is and checks who the broker is: TLS and credentials.

One description for every client that speaks to the fleet broker (the agent,
the simulator's agents and the fleet server's connections), so the production
broker that ``edgefleet broker config`` writes is reachable the same way from
all of them. It needs only the standard library's ``ssl`` and paho, so it stays
light enough for the device.

The broker's certificate is always verified against ``ca_file`` with the host
name checked (its SANs carry the names and addresses given to ``broker
config``); a client certificate (mutual TLS) and a username/password are each
optional, because the broker authenticates by one or the other.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class MqttSecurityError(ValueError):
    """The TLS or credential settings cannot work (missing file, key without certificate, ...)."""


@dataclass(frozen=True)
class MqttSecurity:
    """TLS and credentials of one MQTT connection; the default is the open development broker."""

    tls: bool = False
    ca_file: Path | None = None  # CA that signed the broker's certificate (provisioning's ca.crt)
    cert_file: Path | None = None  # client certificate, for a broker that authenticates by certificate
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise MqttSecurityError("a client certificate needs both cert_file and key_file")
        if self.password is not None and not self.username:
            raise MqttSecurityError("a password needs a username")
        if not self.tls and (self.ca_file or self.cert_file):
            raise MqttSecurityError("ca_file/cert_file given but tls is off")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not Path(path).is_file():
                raise MqttSecurityError(f"{path}: no such file")

    @property
    def authenticated(self) -> bool:
        return self.username is not None or self.cert_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the broker (its CA, its host name) and presents our cert."""
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
            )
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None and self.key_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise MqttSecurityError(f"cannot set up TLS: {exc}") from exc
        return ctx

    def apply(self, client: Any) -> None:
        """Configure a paho ``Client`` before its first connect."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set_context(self.ssl_context())


def read_secret(path: Path) -> str:
    """A secret kept in its own file (password, passphrase): the first line, without its newline."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MqttSecurityError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return text.splitlines()[0] if text else ""
