"""The shipped deployment files as the tests read them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleet_server.settings import ServerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# ServerSettings fields that decide whether a replica's broker session outlives restarts
MQTT_SESSION_FIELDS = ("mqtt_client_id", "shared_subscriptions")


def env_file(path: Path, **override: str) -> dict[str, str]:
    """``KEY=value`` lines as systemd's EnvironmentFile= reads them, then ``override``."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env | override


def mqtt_session_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The MQTT session fields ``env`` (``EDGEFLEET_*`` variables) gives a server, as ServerSettings
    parses them; a field the variables leave out keeps the server's default."""
    given = {f: env[f"EDGEFLEET_{f.upper()}"] for f in MQTT_SESSION_FIELDS if f"EDGEFLEET_{f.upper()}" in env}
    settings = ServerSettings(**given)
    return {f: getattr(settings, f) for f in MQTT_SESSION_FIELDS}
