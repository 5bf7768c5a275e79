"""Who the fleet server is on the broker: its account and the client ids of its connections.

Stdlib only, because provisioning (``edgefleet.provision``) reads it too: device
ids are refused when they could collide with a server connection.

A Mosquitto client id is unique across the whole broker, whichever listener a
client came in on: a second connection with the same id disconnects the first.
Devices connect with ``use_username_as_clientid`` (client id = device id), and
the server's connections (the bridge, every ingest worker, every replica) each
need a distinct id under the one server account. So every server client id
starts with :data:`SERVER_ACCOUNT`, and no device id may: no device can then
take over (kick off) a server connection, whatever id the operator configured.
"""

from __future__ import annotations

import uuid

SERVER_ACCOUNT = "fleet-server"  # the broker identity (certificate CN) and the prefix of every client id


def is_reserved(name: str) -> bool:
    """Names a device may not have: they are, or could become, a server connection's client id."""
    return name.startswith(SERVER_ACCOUNT)


def server_client_id(configured: str | None) -> str:
    """The client id of a replica's main connection (its workers append ``-ingest<n>``, the events
    worker ``-events``).

    ``configured`` (``EDGEFLEET_MQTT_CLIENT_ID``) is kept stable, so a persistent session
    survives a restart; it gets the reserved prefix unless it already has it. None: a fresh
    random id (a clean session per process).
    """
    if configured is None:
        return f"{SERVER_ACCOUNT}-{uuid.uuid4().hex[:12]}"
    return configured if is_reserved(configured) else f"{SERVER_ACCOUNT}-{configured}"


def worker_client_id(main: str, index: int) -> str:
    return f"{main}-ingest{index}"


def events_client_id(main: str) -> str:
    """The events worker's: derived from the main id, so stable (a persistent session) when that is."""
    return f"{main}-events"
