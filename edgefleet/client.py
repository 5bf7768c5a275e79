"""A typed HTTP client for the fleet server's admin API, used by the CLI and the demo.

Errors come back as ``ApiError`` carrying the server's ``code`` so scripts can
branch on it and the CLI can print it and exit non-zero. Lists come from the
server a page at a time (``{"items", "next"}``); the list methods here follow
the cursors and return every entry (or the first ``limit``), and ``page``
returns one page as the server sent it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from device_agent.http_clients import default_verify_context
from signing.keys import KeyPair
from signing.manifest import ENVELOPE_NAME, BundleManifest, read_bundle

DEFAULT_SERVER = "http://127.0.0.1:8080"


def default_server() -> str:
    return os.environ.get("EDGEFLEET_SERVER", DEFAULT_SERVER)


TOKEN_ENV = "EDGEFLEET_TOKEN"
PAGE_SIZE = 1000  # the server's largest page: fewest round trips when following cursors
RELEASE_RACE_ROUNDS = 8  # re-sign this often when concurrent releases keep winning the targets version


OCTETS = "application/octet-stream"
DOWNLOAD_CHUNK = 256 * 1024


class CountingReader:
    """A binary file handle that reports every chunk read from it: upload progress for httpx.

    httpx streams a multipart file part by ``seek(0)`` then ``read(chunk)`` until empty, and
    sizes it with ``fileno()``; all three are passed through, so the body keeps its
    Content-Length and is never held in memory.
    """

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self._raw = raw
        self._on_bytes = on_bytes
        self._pos = raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._raw.seek(offset, whence)
        if pos != self._pos:
            self._on_bytes(pos - self._pos)
            self._pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        if chunk:
            self._pos += len(chunk)
            self._on_bytes(len(chunk))
        return chunk


class ApiError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.status = status
        self.code = code
        self.message = message


class ApiClient:
    """``token`` (else ``$EDGEFLEET_TOKEN``) is sent as ``Authorization: Bearer``."""

    def __init__(self, base_url: str | None = None, timeout: float = 30.0, token: str | None = None) -> None:
        self.base_url = (base_url or default_server()).rstrip("/")
        token = token or os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=headers, verify=default_verify_context()
        )

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

    def page(self, path: str, /, **params: Any) -> dict[str, Any]:
        """One page of a list as the server sends it: ``{"items": [...], "next": cursor or None}``;
        ``params`` are its filters, ``limit`` and ``cursor`` (None values are left out)."""
        query = {k: _param(v) for k, v in params.items() if v is not None}
        return dict(self._request("GET", path, params=query))

    def pages(self, path: str, limit: int | None = None, /, **params: Any) -> list[dict[str, Any]]:
        """Every entry of a list (following ``next``), or its first ``limit`` entries."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while limit is None or len(items) < limit:
            size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - len(items))
            page = self.page(path, **params, limit=size, cursor=cursor)
            items += page["items"]
            cursor = page.get("next")
            if cursor is None:
                break
        return items

    def health(self) -> Any:
        return self._request("GET", "/healthz")

    # devices
    def register_device(self, device_id: str, hardware_id: str, tags: dict[str, str] | None = None) -> Any:
        body = {"device_id": device_id, "hardware_id": hardware_id, "tags": tags or {}}
        return self._request("POST", "/api/v1/devices", json=body)

    def devices(
        self,
        selector: str | None = None,
        state: str | None = None,
        online: bool | None = None,
        model: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Devices by id, filtered by the server: ``selector`` as the CLI's (``hw=rpi4,site=lab``),
        ``state`` (the agent's deployment state), ``online``, ``model`` (name:version, name or sha256)."""
        filters = {"selector": selector, "state": state, "online": online, "model": model}
        return self.pages("/api/v1/devices", limit, **filters)

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/devices/{device_id}"))

    def set_device_tags(self, device_id: str, tags: dict[str, str]) -> dict[str, Any]:
        return dict(self._request("PUT", f"/api/v1/devices/{device_id}/tags", json={"tags": tags}))

    def delete_device(self, device_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/api/v1/devices/{device_id}"))

    # models
    def push_bundle(
        self,
        bundle_dir: Path,
        release_keys: list[KeyPair] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Upload a bundle directory: its envelope plus every file its manifest lists.

        The model files are streamed from disk (never read whole); ``progress`` is called
        with the bytes of each chunk sent (negative when a retried upload starts over).

        With ``release_keys`` the release is also added to the server's TUF repository:
        the current targets metadata is fetched, the bundle's target (hash, length,
        family, release counter, hardware ids) added and signed here, and uploaded
        with the bundle. The release key never leaves this process. Two releases
        signed from the same targets version race (the loser gets ``metadata_rollback``);
        the loser re-reads the targets, re-signs and uploads again (optimistic concurrency).
        """
        bundle_dir = Path(bundle_dir)
        manifest = read_bundle(bundle_dir)

        def attempt() -> dict[str, Any]:
            sent = 0

            def counted(n: int) -> None:
                nonlocal sent
                sent += n
                if progress is not None:
                    progress(n)

            handles = [open(bundle_dir / f.path, "rb") for f in manifest.files]  # noqa: SIM115
            try:
                files: list[tuple[str, tuple[str, Any, str]]] = [
                    (
                        "envelope",
                        (ENVELOPE_NAME, (bundle_dir / ENVELOPE_NAME).read_bytes(), "application/json"),
                    )
                ]
                if release_keys:
                    signed = self._signed_release(manifest, release_keys)
                    files.append(("targets", ("targets.json", signed, "application/json")))
                files += [
                    ("files", (f.path, h if progress is None else CountingReader(h, counted), OCTETS))
                    for f, h in zip(manifest.files, handles, strict=True)
                ]
                return dict(self._request("POST", "/api/v1/models", files=files))
            except ApiError:
                counted(-sent)  # a retried upload starts over
                raise
            finally:
                for h in handles:
                    h.close()

        return self._resigning(attempt)

    def _resigning(self, attempt: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``attempt`` (which signs against the targets it fetches) again while another
        release wins the race for the next targets version; give up after a few rounds."""
        for round_ in range(RELEASE_RACE_ROUNDS):
            try:
                return attempt()
            except ApiError as exc:
                if exc.code != "metadata_rollback" or round_ == RELEASE_RACE_ROUNDS - 1:
                    raise
                time.sleep(random.uniform(0.0, 0.05 * (2**round_)))  # jitter, not crypto
        raise AssertionError("unreachable")

    def models(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every model the server holds (of family ``name``), by name, then upload order."""
        return self.pages("/api/v1/models", name=name)

    def model(self, name: str, version: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/models/{name}/{version}"))

    def model_metrics(self, name: str, version: str) -> dict[str, Any]:
        """The model's field figures per hardware cohort and rollout stage, and in total."""
        return dict(self._request("GET", f"/api/v1/models/{name}/{version}/metrics"))

    def model_acceptance(self, name: str, version: str) -> dict[str, Any]:
        """The devices' on-device acceptance checks of the model per hardware class."""
        return dict(self._request("GET", f"/api/v1/models/{name}/{version}/acceptance"))

    def post_labels(self, labels: list[dict[str, Any]]) -> dict[str, Any]:
        """Post a batch of labels; each item's outcome in order, and their counts."""
        return dict(self._request("POST", "/api/v1/labels", json={"labels": labels}))

    def bundle_file(self, sha256: str, name: str) -> bytes:
        """Another (small) file of a bundle, by the name its manifest lists (the golden set)."""
        try:
            resp = self._http.get(f"/api/v1/artifacts/{sha256}/files/{name}")
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"{self.base_url}: {exc}") from exc
        self._check_status(resp)
        return resp.content

    def model_envelope(self, sha256: str) -> bytes:
        """The bundle's signed envelope as stored (public: devices verify it themselves)."""
        try:
            resp = self._http.get(f"/api/v1/artifacts/{sha256}/envelope")
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"{self.base_url}: {exc}") from exc
        self._check_status(resp)
        return resp.content

    def download_artifact(
        self, sha256: str, dest: Path, progress: Callable[[int, int | None], None] | None = None
    ) -> int:
        """Stream the model file to ``dest``; ``progress(n_bytes, total)`` per chunk. Returns its length.

        The caller checks the hash against the signed manifest: this only moves bytes.
        """
        written = 0
        try:
            with self._http.stream("GET", f"/api/v1/artifacts/{sha256}") as resp:
                self._check_status(resp)
                total = int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
                with open(dest, "wb") as out:
                    for chunk in resp.iter_bytes(DOWNLOAD_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress(len(chunk), total)
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"{self.base_url}: {exc}") from exc
        return written

    def _check_status(self, resp: httpx.Response) -> None:
        if resp.status_code >= 400:
            resp.read()
            self._check(resp)

    # TUF release metadata (signed here, with keys the server never sees)
    def tuf_targets(self) -> bytes | None:
        """The server's current targets metadata, or None before the first release."""
        try:
            resp = self._http.get("/tuf/metadata/targets.json")
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"{self.base_url}: {exc}") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            self._check(resp)
        return resp.content

    def _signed_release(self, manifest: BundleManifest, release_keys: list[KeyPair]) -> bytes:
        from signing.tuf_release import sign_target_added, target_name
        from signing.tuf_repo import custom_for_bundle

        entry = manifest.model_file
        return sign_target_added(
            self.tuf_targets(),
            target_name(manifest.name, manifest.version),
            sha256=entry.sha256,
            length=entry.length,
            custom=custom_for_bundle(manifest.to_dict()),
            release_keys=release_keys,
        )

    def revoke_below(self, family: str, release: int, release_keys: list[KeyPair]) -> dict[str, Any]:
        """Raise ``family``'s signed revocation floor to ``release`` (devices refuse older releases)."""
        from signing.targets import FLOORS_TARGET
        from signing.tuf_release import sign_floor_raised

        def attempt() -> dict[str, Any]:
            signed, floors = sign_floor_raised(self.tuf_targets(), family, release, release_keys)
            files = [
                ("targets", ("targets.json", signed, "application/json")),
                ("files", (FLOORS_TARGET, floors, "application/json")),
            ]
            return dict(self._request("POST", "/api/v1/tuf/targets", files=files))

        return self._resigning(attempt)

    # tokens and audit
    # SLOs
    def create_slo(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/api/v1/slos", json=body))

    def slos(self, model: str | None = None) -> list[dict[str, Any]]:
        return self.pages("/api/v1/slos", model=model)

    def slo_status(self, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/slos/{name}/status"))

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        return self.pages("/api/v1/alerts", state=state)

    def alert_deliveries(self, alert: str | None = None) -> list[dict[str, Any]]:
        return self.pages("/api/v1/alerts/deliveries", alert=alert)

    def planned_window(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/api/v1/planned-windows", json=body))

    def budget_override(self, model: str, reason: str, hours: float) -> dict[str, Any]:
        body = {"model": model, "reason": reason, "hours": hours}
        return dict(self._request("POST", "/api/v1/budget-overrides", json=body))

    # declarative configuration
    def apply_config(
        self, documents: list[dict[str, Any]], source: str = "", dry_run: bool = False
    ) -> dict[str, Any]:
        body = {"documents": documents, "source": source, "dry_run": dry_run}
        return dict(self._request("POST", "/api/v1/config/apply", json=body))

    def config_documents(self, kind: str | None = None) -> list[dict[str, Any]]:
        return self.pages("/api/v1/config/documents", None, kind=kind)

    def config_document(self, kind: str, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/config/documents/{kind}/{name}"))

    def config_applies(self) -> list[dict[str, Any]]:
        return self.pages("/api/v1/config/applies")

    def config_apply(self, apply_id: int) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/config/applies/{apply_id}"))

    def create_token(self, name: str, role: str) -> dict[str, Any]:
        return dict(self._request("POST", "/api/v1/tokens", json={"name": name, "role": role}))

    def tokens(self, role: str | None = None) -> list[dict[str, Any]]:
        return self.pages("/api/v1/tokens", role=role)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/api/v1/tokens/{token_id}"))

    def audit(
        self, limit: int | None = 200, after_id: int = 0, actor: str | None = None, **filters: Any
    ) -> list[dict[str, Any]]:
        """Audit entries oldest first after ``after_id``: the first ``limit`` (None: all). ``filters``:
        ``method``, ``path`` (a prefix), ``result``, ``since``, ``until`` (aware datetimes)."""
        return self.pages("/api/v1/audit", limit, after_id=after_id or None, actor=actor or None, **filters)

    # rollouts
    def create_rollout(self, **body: Any) -> dict[str, Any]:
        return dict(self._request("POST", "/api/v1/rollouts", json=body))

    def rollouts(self, state: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """Every rollout (in ``state``, of ``model`` = name:version), oldest first, with its status."""
        return self.pages("/api/v1/rollouts", state=state, model=model)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/rollouts/{rollout_id}"))

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """pause, resume, abort, approve or rollback: idempotent on the server."""
        return dict(self._request("POST", f"/api/v1/rollouts/{rollout_id}/{action}"))

    def approve_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.rollout_action(rollout_id, "approve")

    def rollback_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.rollout_action(rollout_id, "rollback")

    def create_experiment(self, **body: Any) -> dict[str, Any]:
        return dict(self._request("POST", "/api/v1/experiments", json=body))

    def experiments(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every experiment (in ``state``), oldest first, with its figures."""
        return self.pages("/api/v1/experiments", state=state)

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/experiments/{experiment_id}"))

    def stop_experiment(self, experiment_id: str, **body: Any) -> dict[str, Any]:
        """Stop an arm (``arm=``) or the whole experiment (``promote=True``: roll the winner out)."""
        return dict(self._request("POST", f"/api/v1/experiments/{experiment_id}/stop", json=body))

    def rollout_devices(self, rollout_id: str, state: str | None = None) -> list[dict[str, Any]]:
        """The rollout's devices by id (in ``state``): stage, state, attempts, reason."""
        return self.pages(f"/api/v1/rollouts/{rollout_id}/devices", state=state)

    def rollout_decisions(self, rollout_id: str, action: str | None = None) -> list[dict[str, Any]]:
        """The rollout's decisions oldest first (of ``action``), with their figures."""
        return self.pages(f"/api/v1/rollouts/{rollout_id}/decisions", action=action)

    def rollout_telemetry(self, rollout_id: str) -> list[dict[str, Any]]:
        return self.pages(f"/api/v1/rollouts/{rollout_id}/telemetry")

    def telemetry(self, model: str | None = None, hardware_id: str | None = None) -> list[dict[str, Any]]:
        return self.pages("/api/v1/telemetry", model=model, hardware_id=hardware_id)

    def server_info(self) -> dict[str, Any]:
        return dict(self._request("GET", "/api/v1/server"))

    def stats(self) -> dict[str, Any]:
        return dict(self._request("GET", "/api/v1/stats"))

    def drift(self, drifting: bool = False) -> list[dict[str, Any]]:
        """Devices this replica saw off their desired state (``drifting``: only those drifting now)."""
        return self.pages("/api/v1/drift", drifting=drifting or None)


def _param(value: Any) -> Any:
    """A query value as the server parses it (booleans as true/false, times as ISO 8601)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return value
