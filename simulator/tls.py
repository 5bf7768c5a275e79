"""TLS for thousands of simulated devices in one process: each SSL context is built once.

A real device builds its client context once per boot. Here thousands of agents boot (and
reboot, after injected crashes) in one process, and a context costs ~1 ms and a few KB to build
(CA file parsed, client certificate and key loaded): so contexts are cached by what they hold.
Devices that authenticate by password share one context (nothing device-specific in it);
devices with client certificates keep one each across reboots. An ``ssl.SSLContext`` may serve
any number of connections; paho wraps each socket with it at connect time.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, fields
from pathlib import Path

from device_agent.config import AgentConfig
from device_agent.mqtt_security import MqttSecurity


@functools.cache
def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    return MqttSecurity(tls=True, ca_file=ca_file, cert_file=cert_file, key_file=key_file).ssl_context()


@dataclass(frozen=True)
class SharedContextSecurity(MqttSecurity):
    """The agent's own TLS settings, with the context taken from the cache."""

    def ssl_context(self) -> ssl.SSLContext:
        return client_context(self.ca_file, self.cert_file, self.key_file)


class SimAgentConfig(AgentConfig):
    """An agent configuration whose broker connection reuses cached SSL contexts."""

    def mqtt_security(self) -> MqttSecurity:
        own = super().mqtt_security()
        if not own.tls:
            return own
        return SharedContextSecurity(**{f.name: getattr(own, f.name) for f in fields(own)})
