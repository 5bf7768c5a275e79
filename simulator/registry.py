"""Register simulated devices with the fleet server (``POST /api/v1/devices``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import httpx

from device_agent.http_clients import default_verify_context
from simulator.fleet import DeviceSpec


def register_devices(
    server_url: str, specs: Iterable[DeviceSpec], timeout: float = 10.0, token: str | None = None
) -> list[dict[str, object]]:
    """Register each device (201 created, 200 if an identical one exists); return the server's records.

    Raises ``httpx.HTTPStatusError`` on any other answer (e.g. 409: same id, different hardware;
    401/403 without an operator token when the server requires one). ``token`` falls back to
    ``EDGEFLEET_TOKEN``.
    """
    base = server_url.rstrip("/")
    out: list[dict[str, object]] = []
    token = token or os.environ.get("EDGEFLEET_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(
        base_url=base, timeout=timeout, headers=headers, verify=default_verify_context()
    ) as client:
        for spec in specs:
            resp = client.post(
                "/api/v1/devices",
                json={"device_id": spec.device_id, "hardware_id": spec.hardware_id, "tags": dict(spec.tags)},
            )
            resp.raise_for_status()
            out.append(resp.json())
    return out
