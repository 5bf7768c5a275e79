"""The fleet server's MQTT connections: where the broker is, how the server proves who it is.

Every connection the server opens (the bridge's, each ingest worker's, in every
replica) is made by :func:`new_client` and :func:`connect` from one
:class:`Endpoint`, so all of them reach the production broker the same way:
TLS with the broker's certificate checked against ``mqtt_ca_file`` (host name
included), and the server's identity, a client certificate from the server CA
(``edgefleet broker config``'s ``fleet-server.crt``) or a username and password.
The TLS and credential mechanics are the agent's own
(``device_agent.mqtt_security``): one implementation for both ends.

``mqtt_credentials`` points at the ``fleet-server.json`` that ``broker config``
writes (host, port, CA, certificate, key); any field set in the settings (or
its ``EDGEFLEET_MQTT_*`` variable) wins over the file. Client ids come from
``fleet_server.mqtt_identity`` (each connection its own, all under the reserved
``fleet-server`` prefix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.mqtt_security import MqttSecurity, MqttSecurityError, read_secret
from fleet_server.settings import ServerSettings

# fleet-server.json key -> settings field
CREDENTIAL_FIELDS = {
    "host": "mqtt_host",
    "port": "mqtt_port",
    "tls": "mqtt_tls",
    "ca_file": "mqtt_ca_file",
    "cert_file": "mqtt_cert_file",
    "key_file": "mqtt_key_file",
    "username": "mqtt_username",
    "password_file": "mqtt_password_file",
}
PATH_KEYS = ("ca_file", "cert_file", "key_file", "password_file")


class MqttConfigError(ValueError):
    """The server's broker settings cannot work (unreadable credentials file, missing TLS file, ...)."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    security: MqttSecurity

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.security.tls else 'mqtt'}://{self.host}:{self.port}"


def load_credentials(path: Path) -> dict[str, Any]:
    """Read ``fleet-server.json``: known keys only, relative paths against the file's directory."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MqttConfigError(f"cannot read the broker credentials {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MqttConfigError(f"{path}: expected a JSON object")
    unknown = sorted(set(data) - set(CREDENTIAL_FIELDS) - {"password"})
    if unknown:
        raise MqttConfigError(f"{path}: unknown keys {', '.join(unknown)}")
    for key in PATH_KEYS:
        if data.get(key):
            p = Path(data[key]).expanduser()
            data[key] = p if p.is_absolute() else Path(path).parent / p
    return data


def endpoint(settings: ServerSettings) -> Endpoint:
    """Where the broker is and how to get in, from the settings and ``mqtt_credentials``."""
    values: dict[str, Any] = {name: getattr(settings, name) for name in CREDENTIAL_FIELDS.values()}
    file_password: str | None = None
    if settings.mqtt_credentials is not None:
        creds = load_credentials(settings.mqtt_credentials)
        file_password = creds.get("password")
        for key, name in CREDENTIAL_FIELDS.items():
            if key in creds and name not in settings.model_fields_set:
                values[name] = creds[key]
    password: str | None = None
    if settings.mqtt_password is not None:
        password = settings.mqtt_password.get_secret_value()
    elif values["mqtt_password_file"] is not None:
        password = read_secret(Path(values["mqtt_password_file"]))
    elif file_password is not None and "mqtt_username" not in settings.model_fields_set:
        password = str(file_password)
    try:
        security = MqttSecurity(
            tls=bool(values["mqtt_tls"]),
            ca_file=_path(values["mqtt_ca_file"]),
            cert_file=_path(values["mqtt_cert_file"]),
            key_file=_path(values["mqtt_key_file"]),
            username=values["mqtt_username"],
            password=password,
        )
    except MqttSecurityError as exc:
        raise MqttConfigError(f"MQTT settings: {exc}") from exc
    return Endpoint(str(values["mqtt_host"]), int(values["mqtt_port"]), security)


def shard_endpoints(settings: ServerSettings) -> dict[str, Endpoint]:
    """Every broker the server connects to, by shard name, in the shards file's order (its first is
    where devices registered before the fleet was sharded stay): each shard's endpoint comes from
    its ``fleet-server.json`` alone. Without a shards file, the one broker of :func:`endpoint`."""
    from fleet_server.shards import DEFAULT_SHARD, ShardError, load_shards

    if settings.mqtt_shards is None:
        return {DEFAULT_SHARD: endpoint(settings)}
    try:
        shards = load_shards(settings.mqtt_shards)
    except ShardError as exc:
        raise MqttConfigError(str(exc)) from exc
    out: dict[str, Endpoint] = {}
    for shard in shards:
        if shard.server_credentials is None:
            raise MqttConfigError(f"{settings.mqtt_shards}: shard {shard.name!r} names no server_credentials")
        only_file = ServerSettings.model_construct(
            **{**settings.model_dump(exclude=set(CREDENTIAL_FIELDS.values()) | {"mqtt_password"}),
               "mqtt_credentials": shard.server_credentials}
        )  # fmt: skip
        out[shard.name] = endpoint(only_file)
    return out


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


def connect_properties(settings: ServerSettings, persistent: bool) -> Properties | None:
    if settings.mqtt_version != 5:
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.mqtt_session_expiry if persistent else 0
    # Bounds the unacknowledged messages the broker sends us: acks wait for the commit.
    props.ReceiveMaximum = settings.mqtt_receive_maximum
    return props


def new_client(settings: ServerSettings, client_id: str, persistent: bool, where: Endpoint) -> mqtt.Client:
    v5 = settings.mqtt_version == 5
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=True,
    )
    try:
        where.security.apply(client)
    except MqttSecurityError as exc:
        raise MqttConfigError(f"MQTT TLS: {exc}") from exc
    # At most 2 s between attempts (a handful of clients against one broker): after a broker
    # restart, what devices send before a $share consumer has subscribed again is dropped, and
    # devices, backing off from half a second, are usually back first (docs/deploy.md).
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.max_queued_messages_set(0)
    return client


def connect(client: mqtt.Client, settings: ServerSettings, persistent: bool, where: Endpoint) -> None:
    client.connect_async(
        where.host,
        where.port,
        keepalive=settings.mqtt_keepalive,
        clean_start=not persistent if settings.mqtt_version == 5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=connect_properties(settings, persistent),
    )
    client.loop_start()


def release(client: mqtt.Client) -> None:
    """Close what a stopped client still holds open: paho keeps the socket pair that wakes its network
    thread until the client is garbage collected (``Client.__del__``), and a stopped server's client
    can stay referenced for long (FastAPI caches route callables, and the API docs' routes close over
    the app, which holds the server's context). Call after ``disconnect()`` and ``loop_stop()``."""
    client._reset_sockets()
