"""Capture upload: sealed batches go to the fleet, oldest first, signed as the device, at a bounded rate.

``PUT {upload_url}/{device_id}/{batch_id}`` with the batch file as the body and
the headers of :func:`signing.device_auth.sign_request` (the key and certificate
the device was provisioned with). What the answer means is :func:`outcome`:

- 201 (stored) or 200 (already stored with the same body): delivered, the file goes;
- another 4xx (except 408 and 429): the server refuses this batch for good (its
  ``detail.code`` says why), so it is dropped and counted, and the rest go on;
- 408, 429, 5xx, no answer at all: retried, with exponential backoff and full
  jitter, from the oldest batch again.

A batch file is deleted only after one of those final answers, so a crash, a kill
or a server outage mid-upload loses nothing: after a restart the same bytes go
again under the same batch id, and the server answers 200. Uploads run on the
agent's loop and never touch the inference path; ``capture_upload_bytes_per_s``
caps the average rate.

A device configured without a certificate and key cannot sign, so it uploads
nothing (a warning says why, ``capture_upload_refused`` counts the attempts) and
its batches wait on disk, within the quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from device_agent.capture_store import CaptureStore, Pending
from device_agent.metrics import Metrics
from device_agent.mqtt_link import backoff_delay

if TYPE_CHECKING:
    import httpx

    from signing.device_auth import DeviceIdentity

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
IDLE_POLL_S = 5.0  # look for sealed batches at least this often, woken sooner by the writer
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
NO_IDENTITY_RETRY_S = 300.0


class Outcome(Enum):
    DELIVERED = "delivered"
    REFUSED = "refused"  # final: drop the batch
    RETRY = "retry"


RETRIED_4XX = frozenset({408, 429})


def outcome(status: int | None) -> Outcome:
    """What an answer to a capture upload means; None: no answer at all."""
    if status in (200, 201):
        return Outcome.DELIVERED
    if status is not None and 400 <= status < 500 and status not in RETRIED_4XX:
        return Outcome.REFUSED
    return Outcome.RETRY


@dataclass(frozen=True)
class UploadSettings:
    device_id: str
    cert_file: Path | None
    key_file: Path | None
    ca_file: Path | None = None  # HTTPS: the CA of the server's certificate (None: the system's)
    bytes_per_s: int = 0  # 0: no cap


def batch_url(upload_url: str, device_id: str, batch_id: str) -> str:
    return f"{upload_url.rstrip('/')}/{device_id}/{batch_id}"


class CaptureUploader:
    """The agent's upload task (``run`` until cancelled) for one capture store."""

    def __init__(
        self,
        settings: UploadSettings,
        store: CaptureStore,
        metrics: Metrics,
        upload_url: Callable[[], str | None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.upload_url = upload_url
        self.wake = asyncio.Event()
        self._identity: DeviceIdentity | None = None
        self._no_identity = False
        self._attempt = 0

    def identity(self) -> DeviceIdentity | None:
        """The device's signing identity, loaded on first use; None without one (said once: the
        configuration does not change while the agent runs)."""
        if self._identity is None and not self._no_identity:
            s = self.settings
            self._no_identity = True
            if s.cert_file is None or s.key_file is None:
                log.warning(
                    "%s: captures cannot be uploaded: no device certificate and key "
                    "(mqtt_cert_file/mqtt_key_file) to sign them with; they stay on disk",
                    s.device_id,
                )
                return None
            from signing.device_auth import DeviceAuthError, DeviceIdentity

            try:
                self._identity = DeviceIdentity.load(s.device_id, str(s.cert_file), str(s.key_file))
            except (OSError, ValueError, DeviceAuthError) as exc:
                log.warning("%s: captures cannot be uploaded: device key unusable: %s", s.device_id, exc)
                return None
            self._no_identity = False
        return self._identity

    async def run(self) -> None:
        """Upload until cancelled; one failure never ends the task.

        Between passes it waits for the writer's wake-up (a batch was sealed) or the idle poll;
        after a failed attempt it sits out the whole backoff, wake-ups or not, so a fleet whose
        server is down does not retry with every sealed batch."""
        while True:
            try:
                delay = await self.upload_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.count("capture_upload_errors")
                log.exception("%s: capture upload failed", self.settings.device_id)
                self._attempt += 1
                delay = backoff_delay(self._attempt - 1, base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S)
            if self._attempt:
                await asyncio.sleep(delay)
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)

    async def upload_pending(self) -> float:
        """Send what is sealed, oldest first; the seconds to wait before looking again."""
        url = self.upload_url()
        pending = await asyncio.to_thread(self.store.pending)
        if not pending or url is None:
            return IDLE_POLL_S
        identity = await asyncio.to_thread(self.identity)
        if identity is None:
            self.metrics.count("capture_upload_refused", len(pending))
            return NO_IDENTITY_RETRY_S
        import httpx

        from device_agent.http_fetcher import HttpsSettings

        https = HttpsSettings(self.settings.ca_file, self.settings.cert_file, self.settings.key_file)
        async with httpx.AsyncClient(verify=https.context(), timeout=TIMEOUT_S) as client:
            for p in pending:
                result = await self._send(client, identity, url, p)
                if result is Outcome.RETRY:
                    self._attempt += 1
                    return backoff_delay(self._attempt - 1, base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S)
                self._attempt = 0
        return 0.0 if len(await asyncio.to_thread(self.store.pending)) else IDLE_POLL_S

    async def _send(
        self, client: httpx.AsyncClient, identity: DeviceIdentity, url: str, p: Pending
    ) -> Outcome:
        import httpx

        from signing.device_auth import sign_request

        body = await asyncio.to_thread(self.store.read, p)
        if body is None:  # evicted while waiting
            return Outcome.DELIVERED
        target = batch_url(url, self.settings.device_id, p.batch_id)
        headers = sign_request(identity, "PUT", urlsplit(target).path, body)
        headers["Content-Type"] = "application/json"
        started = time.monotonic()
        status: int | None = None
        detail = ""
        try:
            try:
                resp = await client.put(target, content=body, headers=headers)
                status = resp.status_code
                if status >= 400:
                    detail = resp.text[:300]
            except httpx.HTTPError as exc:
                detail = f"{type(exc).__name__}: {exc}"
            result = outcome(status)
            if result is not Outcome.RETRY:
                await asyncio.to_thread(self.store.done, p)
        finally:
            self.store.release()  # retried or cancelled: the file stays, and may be evicted again
        if result is Outcome.DELIVERED:
            self.metrics.count("capture_items_uploaded", p.items)
            self.metrics.count("capture_batches_uploaded")
        elif result is Outcome.REFUSED:
            self.metrics.count("capture_items_refused", p.items)
            self.metrics.count("capture_batches_refused")
            log.warning(
                "%s: capture batch %s refused (%s): %s", self.settings.device_id, p.batch_id, status, detail
            )
        else:
            self.metrics.count("capture_upload_retries")
            log.info(
                "%s: capture upload of %s deferred (%s): %s",
                self.settings.device_id,
                p.batch_id,
                status,
                detail,
            )
        await self._pace(len(body), time.monotonic() - started)
        return result

    async def _pace(self, sent: int, took: float) -> None:
        """Hold the average rate at ``bytes_per_s``: a body of n bytes occupies n / rate seconds."""
        rate = self.settings.bytes_per_s
        if rate > 0:
            await asyncio.sleep(max(0.0, sent / rate - took))


__all__ = ["CaptureUploader", "Outcome", "UploadSettings", "batch_url", "outcome"]
