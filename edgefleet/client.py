"""A typed HTTP client for the fleet server's admin API, used by the CLI and the demo.

Errors come back as ``ApiError`` carrying the server's ``code`` so scripts can
branch on it and the CLI can print it and exit non-zero.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from signing.manifest import ENVELOPE_NAME, read_bundle

DEFAULT_SERVER = "http://127.0.0.1:8080"


def default_server() -> str:
    return os.environ.get("EDGEFLEET_SERVER", DEFAULT_SERVER)


class ApiError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.status = status
        self.code = code
        self.message = message


class ApiClient:
    def __init__(self, base_url: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = (base_url or default_server()).rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            code, message = f"http_{resp.status_code}", resp.text[:500]
            try:
                detail = resp.json().get("detail")
                if isinstance(detail, dict):
                    code = str(detail.get("code", code))
                    message = str(detail.get("message", ""))
                elif detail is not None:
                    message = str(detail)
            except ValueError:
                pass
            raise ApiError(resp.status_code, code, message)
        return resp.json() if resp.content else None

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"{self.base_url}: {exc}") from exc
        return self._check(resp)

    def health(self) -> Any:
        return self._request("GET", "/healthz")

    # devices
    def register_device(self, device_id: str, hardware_id: str, tags: dict[str, str] | None = None) -> Any:
        body = {"device_id": device_id, "hardware_id": hardware_id, "tags": tags or {}}
        return self._request("POST", "/api/v1/devices", json=body)

    def devices(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/v1/devices"))

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/devices/{device_id}"))

    def set_device_tags(self, device_id: str, tags: dict[str, str]) -> dict[str, Any]:
        return dict(self._request("PUT", f"/api/v1/devices/{device_id}/tags", json={"tags": tags}))

    # models
    def push_bundle(self, bundle_dir: Path) -> dict[str, Any]:
        """Upload a bundle directory: its envelope plus every file its manifest lists."""
        bundle_dir = Path(bundle_dir)
        manifest = read_bundle(bundle_dir)
        handles = [open(bundle_dir / f.path, "rb") for f in manifest.files]  # noqa: SIM115
        try:
            files: list[tuple[str, tuple[str, Any, str]]] = [
                ("envelope", (ENVELOPE_NAME, (bundle_dir / ENVELOPE_NAME).read_bytes(), "application/json"))
            ]
            files += [
                ("files", (f.path, h, "application/octet-stream"))
                for f, h in zip(manifest.files, handles, strict=True)
            ]
            return dict(self._request("POST", "/api/v1/models", files=files))
        finally:
            for h in handles:
                h.close()

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/v1/models"))

    # rollouts
    def create_rollout(self, **body: Any) -> dict[str, Any]:
        return dict(self._request("POST", "/api/v1/rollouts", json=body))

    def rollouts(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/v1/rollouts"))

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/rollouts/{rollout_id}"))

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """pause, resume, abort, approve or rollback: idempotent on the server."""
        return dict(self._request("POST", f"/api/v1/rollouts/{rollout_id}/{action}"))

    def approve_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.rollout_action(rollout_id, "approve")

    def rollback_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.rollout_action(rollout_id, "rollback")

    def rollout_telemetry(self, rollout_id: str) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/api/v1/rollouts/{rollout_id}/telemetry"))

    def telemetry(self, model: str | None = None, hardware_id: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"model": model, "hardware_id": hardware_id}.items() if v is not None}
        return list(self._request("GET", "/api/v1/telemetry", params=params))

    def server_info(self) -> dict[str, Any]:
        return dict(self._request("GET", "/api/v1/server"))

    def stats(self) -> dict[str, Any]:
        return dict(self._request("GET", "/api/v1/stats"))
