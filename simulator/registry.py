"""Register simulated devices with the fleet server (``POST /api/v1/devices``)."""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Iterable

import httpx

from simulator.fleet import DeviceSpec


@functools.cache
def api_tls_context() -> ssl.SSLContext:
    """The verifying TLS context the simulator's clients of the server API share (httpx's default:
    the CA bundle, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``). httpx builds one per client otherwise,
    parsing the whole CA bundle (~18 ms of CPU) even for a plain ``http://`` server, and a
    scenario opens one client to register its fleet and another for its script and timeline."""
    return httpx.create_ssl_context()


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
    with httpx.Client(base_url=base, timeout=timeout, headers=headers, verify=api_tls_context()) as client:
        for spec in specs:
            resp = client.post(
                "/api/v1/devices",
                json={"device_id": spec.device_id, "hardware_id": spec.hardware_id, "tags": dict(spec.tags)},
            )
            resp.raise_for_status()
            out.append(resp.json())
    return out
