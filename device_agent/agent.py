"""The device agent: reconcile towards the signed desired state, hot-swap, serve, report.

Flow for each retained directive on ``ef/v1/{id}/desired``:

1. directive checks (fleet key signature, device id, seq, expiry) -> ``rejected`` + reason;
2. if the model is already in a slot: re-verify the file and swap (fast rollback);
   otherwise fetch + verify the release-signed envelope, check it agrees with the
   directive (hash, length, hardware id, target), download into the inactive slot
   (resumable, bounded, hashed while streaming);
3. load + warm the new model in a worker thread, then swap ONE reference.

Every failure leaves the serving model untouched. ``infer`` reads the serving
reference once, so calls in flight during a swap finish on the model they started
with. All MQTT work happens on the agent's asyncio loop; ``infer`` may run on any
thread and talks to the loop only through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from device_agent import __version__, protocol
from device_agent.config import AgentConfig
from device_agent.downloader import DownloadError, IncompleteDownload, download_model, fetch_envelope
from device_agent.mqtt_link import MqttLink, backoff_delay
from device_agent.runtime import LoadedModel, OnnxRuntimeFactory, RuntimeFactory, RuntimeLoadError
from device_agent.slots import SlotStore
from device_agent.telemetry import Telemetry, top1_classes
from signing.dsse import verify_envelope
from signing.errors import MalformedEnvelope, TrustError
from signing.manifest import BundleManifest, FileEntry, manifest_from_envelope, verify_file
from signing.trust import TrustRoot

log = logging.getLogger(__name__)

DS = protocol.DeploymentState
DOWNLOAD_ATTEMPTS = 4


class NoModelError(RuntimeError):
    """``infer`` was called before any model was installed."""


class InstallError(Exception):
    """A directive could not be carried out; ``code`` is the reason reported upstream."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.code = code


@dataclass(frozen=True)
class InferenceResult:
    outputs: list[np.ndarray]
    model_sha256: str
    model_version: str
    ok: bool = True
    error: str | None = None  # "non_finite" | "runtime_error"


@dataclass(frozen=True)
class _Serving:
    """The one reference ``infer`` reads; replaced whole on a swap, never mutated."""

    model: LoadedModel
    sha256: str
    name: str
    version: str
    slot: str


@dataclass
class _Deployment:
    seq: int = 0
    state: protocol.DeploymentState = DS.IDLE
    error: str | None = None


def capabilities(targets: list[str]) -> dict[str, Any]:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "memory": memory,
        "runtimes": {"onnxruntime": ort.__version__},
        "targets": list(targets),
    }


class Agent:
    """One device. ``start``/``stop`` on an asyncio loop; ``infer`` from any thread."""

    def __init__(self, config: AgentConfig, trust: TrustRoot, runtime_factory: RuntimeFactory | None = None):
        self.config = config
        self.device_id = config.device_id
        self.trust = trust
        self.runtime: RuntimeFactory = runtime_factory or OnnxRuntimeFactory(
            intra_op_threads=config.intra_op_threads
        )
        self.slots = SlotStore(config.data_dir)
        self.telemetry = Telemetry(config.device_id)
        self.history: list[str] = []
        self.link: MqttLink | None = None
        self._serving: _Serving | None = None
        self._lock = threading.Lock()  # guards counters touched by infer threads
        self._metrics: Counter[str] = Counter()
        self._served_ok: dict[str, int] = {}
        self._awaiting_proof: str | None = None
        self._deployment = _Deployment(seq=self.slots.state.last_seq)
        self._accepted_seq = self.slots.state.last_seq
        self._accepted_digest: str | None = None
        self._pending: protocol.Directive | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._caps = capabilities(config.targets)
        self._desired_topic = protocol.topic(self.device_id, protocol.Channel.DESIRED)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Load the active slot's model, connect, and begin reconciling and reporting."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self._restore()
        self.link = MqttLink(
            self.device_id,
            self.config.mqtt_host,
            self.config.mqtt_port,
            mqtt_version=self.config.mqtt_version,
            keepalive=self.config.keepalive,
            session_expiry=self.config.session_expiry,
            max_inflight=self.config.max_inflight,
            on_message=self._on_message,
            on_connected=self._on_connected,
        )
        self._tasks = [
            self._loop.create_task(self._reconcile_loop(), name=f"{self.device_id}-reconcile"),
            self._loop.create_task(self._telemetry_loop(), name=f"{self.device_id}-telemetry"),
        ]
        await self.link.start()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        return self.link is not None and await self.link.wait_connected(timeout)

    async def stop(self) -> None:
        """Stop reconciling, send the last telemetry window, publish offline, disconnect."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.link is not None:
            if self.link.connected:
                self.telemetry.cut()
                await self._send_telemetry()
            await self.link.stop()
        pending = list(self._background)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _restore(self) -> None:
        """Serve what ``state.json`` says is active, after re-checking the file's hash."""
        state = self.slots.state
        candidates = [state.active] if state.active else []
        candidates += [s for s in state.slots if s not in candidates and state.slots[s] is not None]
        for slot in candidates:
            info = state.slots.get(slot) if slot else None
            path = self.slots.model_path(slot) if slot else None
            if slot is None or info is None or path is None:
                continue
            try:
                entry = FileEntry(info.file, info.sha256, info.length)
                await asyncio.to_thread(verify_file, path, entry)
                model = await asyncio.to_thread(self.runtime.load, path, info.sha256)
            except (TrustError, RuntimeLoadError, OSError) as exc:
                log.warning("%s: slot %s unusable at start: %s", self.device_id, slot, exc)
                continue
            self._serving = _Serving(model, info.sha256, info.name, info.version, slot)
            self.history.append(info.sha256)
            if slot != state.active:
                self.slots.activate(slot)
            self._deployment.state = DS.SERVING
            return

    # -- inference (any thread) ---------------------------------------------

    @property
    def running_sha256(self) -> str | None:
        s = self._serving
        return s.sha256 if s else None

    @property
    def running_model(self) -> LoadedModel | None:
        s = self._serving
        return s.model if s else None

    def infer(self, x: np.ndarray) -> InferenceResult:
        """Run the serving model on ``x``. Thread-safe; never blocks on a swap.

        Failures do not raise: a non-finite output or a runtime exception is
        returned with ``ok=False`` and counted by kind, because the error rate
        is what the rollout gates judge a model by.
        """
        s = self._serving  # read the reference once: a swap cannot change it under us
        if s is None:
            raise NoModelError(f"{self.device_id}: no model installed")
        t0 = time.perf_counter()
        error: str | None = None
        outputs: list[np.ndarray] = []
        try:
            outputs = s.model.run(x)
            if any(np.issubdtype(o.dtype, np.floating) and not np.isfinite(o).all() for o in outputs):
                error = "non_finite"
        except Exception as exc:
            log.debug("%s: inference failed: %s", self.device_id, exc)
            error = "runtime_error"
        latency_us = (time.perf_counter() - t0) * 1e6
        self.telemetry.record(s.sha256, latency_us, error, top1_classes(outputs) if error is None else [])
        proof = False
        with self._lock:
            if error is None:
                self._served_ok[s.sha256] = self._served_ok.get(s.sha256, 0) + 1
                if self._awaiting_proof == s.sha256:
                    self._awaiting_proof = None
                    proof = True
            else:
                self._metrics[f"inference_{error}"] += 1
        if proof:
            self._call_on_loop(self._on_first_ok)
        return InferenceResult(outputs, s.sha256, s.version, error is None, error)

    def _call_on_loop(self, fn: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing
            loop.call_soon_threadsafe(fn)

    def _on_first_ok(self) -> None:
        # The server counts a device done only on "new hash running AND >= 1 ok inference".
        self._spawn(self._publish_reported())

    # -- metrics / views -----------------------------------------------------

    @property
    def metrics(self) -> dict[str, int]:
        with self._lock:
            return dict(self._metrics)

    @property
    def served_ok(self) -> dict[str, int]:
        with self._lock:
            return dict(self._served_ok)

    @property
    def deployment_state(self) -> protocol.DeploymentState:
        return self._deployment.state

    @property
    def deployment_error(self) -> str | None:
        return self._deployment.error

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._metrics[key] += n

    def reported(self) -> protocol.Reported:
        s = self._serving
        return protocol.Reported(
            device_id=self.device_id,
            agent_version=__version__,
            hardware_id=self.config.hardware_id,
            running=protocol.RunningModel(name=s.name, version=s.version, sha256=s.sha256) if s else None,
            slots=self.slots.slot_hashes(),
            active_slot=self.slots.state.active,
            deployment_seq=self._deployment.seq,
            deployment_state=self._deployment.state,
            deployment_error=self._deployment.error,
            served_ok=self.served_ok,
            capabilities=self._caps,
        )

    # -- MQTT inbound (loop thread) -----------------------------------------

    def _on_connected(self) -> None:
        self._spawn(self._publish_reported())
        self._spawn(self._send_telemetry())

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic != self._desired_topic:
            return
        if not payload:
            # An empty retained message clears the topic: nothing to do, but worth seeing.
            self._count("malformed_messages")
            log.info("%s: empty desired payload (retained clear) ignored", self.device_id)
            return
        self._count("directives_received")
        try:
            body = verify_envelope(payload, protocol.DIRECTIVE_PAYLOAD_TYPE, self.trust.fleet_keys)
        except MalformedEnvelope as exc:
            self._count("malformed_messages")
            log.warning("%s: malformed directive envelope: %s", self.device_id, exc)
            return
        except TrustError as exc:
            self._reject(0, exc.code, str(exc))
            return
        try:
            directive = protocol.decode_directive(body)
        except protocol.ProtocolError as exc:
            self._count("malformed_messages")
            log.warning("%s: malformed directive: %s", self.device_id, exc)
            return
        digest = hashlib.sha256(body).hexdigest()
        if directive.device_id != self.device_id:
            self._reject(directive.seq, "wrong_device", f"directive is for {directive.device_id!r}")
            return
        if directive.seq <= self._accepted_seq:
            if directive.seq == self._accepted_seq and self._accepted_digest in (None, digest):
                # The same retained directive again (reconnect, restart): already handled.
                self._count("duplicate_directives")
                return
            self._reject(
                directive.seq, "stale_sequence", f"seq {directive.seq} <= applied {self._accepted_seq}"
            )
            return
        if directive.expires_at <= protocol.utcnow():
            self._reject(directive.seq, "expired", f"expired at {directive.expires_at.isoformat()}")
            return
        self._accepted_seq, self._accepted_digest = directive.seq, digest
        self._count("directives_accepted")
        self._pending = directive  # latest wins: an older queued directive is superseded
        assert self._wake is not None
        self._wake.set()

    def _reject(self, seq: int, reason: str, detail: str) -> None:
        log.warning("%s: directive seq %d rejected: %s (%s)", self.device_id, seq, reason, detail)
        self._count("rejected_directives")
        self._count(f"rejected_{reason}")
        event = protocol.Event(
            device_id=self.device_id, seq=seq, state=DS.REJECTED, reason=reason, detail=detail
        )
        self._spawn(self._publish_event(event))

    # -- reconcile -----------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            directive, self._pending = self._pending, None
            if directive is None:
                continue
            try:
                await self._apply(directive)
            except asyncio.CancelledError:
                raise
            except InstallError as exc:
                await self._fail(directive, exc.code, str(exc))
            except TrustError as exc:
                await self._fail(directive, exc.code, str(exc))
            except RuntimeLoadError as exc:
                await self._fail(directive, exc.code, str(exc))
            except (httpx.HTTPError, DownloadError, IncompleteDownload) as exc:
                await self._fail(directive, getattr(exc, "code", "download_failed"), str(exc))
            except Exception as exc:
                log.exception("%s: directive seq %d failed unexpectedly", self.device_id, directive.seq)
                await self._fail(directive, "internal_error", repr(exc))

    async def _apply(self, d: protocol.Directive) -> None:
        self._deployment = _Deployment(seq=d.seq, state=self._deployment.state)
        ref = d.model
        serving = self._serving
        if ref is None or (serving is not None and serving.sha256 == ref.sha256):
            self.slots.record_seq(d.seq)
            await self._transition(
                d, DS.SERVING if serving else DS.IDLE, sha=serving.sha256 if serving else None
            )
            return
        if ref.target not in self.config.targets or not self.runtime.supports(ref.target):
            raise InstallError("unsupported_target", f"device runs {self.config.targets}, not {ref.target}")
        slot = self.slots.find(ref.sha256)
        if slot is not None:
            await self._transition(d, DS.VERIFYING, sha=ref.sha256, detail=f"model already in slot {slot}")
            info = self.slots.state.slots[slot]
            assert info is not None
            manifest = BundleManifest.from_dict(info.manifest)
            self._check_manifest(d, manifest)
            path = self.slots.slot_dir(slot) / info.file
            await asyncio.to_thread(verify_file, path, FileEntry(info.file, info.sha256, info.length))
        else:
            slot, path = await self._download(d)
        await self._transition(d, DS.WARMING, sha=ref.sha256)
        model = await asyncio.to_thread(self.runtime.load, path, ref.sha256)
        await self._transition(d, DS.SWAPPING, sha=ref.sha256)
        with self._lock:
            self._awaiting_proof = ref.sha256
        self._serving = _Serving(model, ref.sha256, ref.name, ref.version, slot)  # the swap
        self.slots.activate(slot, d.seq)
        self.history.append(ref.sha256)
        self._count("swaps")
        await self._transition(d, DS.SERVING, sha=ref.sha256)

    def _check_manifest(self, d: protocol.Directive, manifest: BundleManifest) -> None:
        """Director/image agreement (Uptane): the directive may only point at what a release key signed."""
        assert d.model is not None
        entry = manifest.model_file
        if entry.sha256 != d.model.sha256 or entry.length != d.model.length:
            raise InstallError("directive_mismatch", "directive hash/length differ from the signed manifest")
        if self.config.hardware_id not in manifest.hardware_ids:
            raise InstallError(
                "hardware_mismatch", f"{self.config.hardware_id} not in {manifest.hardware_ids}"
            )
        if manifest.target not in self.config.targets or not self.runtime.supports(manifest.target):
            raise InstallError("unsupported_target", f"bundle target {manifest.target} not runnable here")

    async def _download(self, d: protocol.Directive) -> tuple[str, Any]:
        ref = d.model
        assert ref is not None
        await self._transition(d, DS.DOWNLOADING, sha=ref.sha256)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0)) as client:
            envelope = await fetch_envelope(client, ref.envelope_url, self.device_id)
            await self._transition(d, DS.VERIFYING, sha=ref.sha256, detail="bundle envelope")
            manifest = manifest_from_envelope(envelope, self.trust.release_keys)
            self._check_manifest(d, manifest)
            slot = self.slots.inactive
            self.slots.prepare(slot, keep_partial_for=ref.sha256)
            part = self.slots.partial_path(slot, ref.sha256)
            await self._transition(d, DS.DOWNLOADING, sha=ref.sha256, detail=f"model into slot {slot}")
            for attempt in range(DOWNLOAD_ATTEMPTS):
                try:
                    await download_model(
                        client,
                        ref.model_url,
                        part,
                        length=ref.length,
                        sha256=ref.sha256,
                        device_id=self.device_id,
                    )
                    break
                except (IncompleteDownload, httpx.TransportError) as exc:
                    if attempt == DOWNLOAD_ATTEMPTS - 1:
                        raise
                    log.info("%s: download interrupted (%s); resuming", self.device_id, exc)
                    await asyncio.sleep(backoff_delay(attempt, base=0.2, cap=5.0))
        await self._transition(d, DS.INSTALLING, sha=ref.sha256)
        info = self.slots.commit(slot, part, envelope, manifest)
        return slot, self.slots.slot_dir(slot) / info.file

    async def _fail(self, d: protocol.Directive, code: str, detail: str) -> None:
        """Record the failure; the serving model is untouched (nothing was swapped)."""
        log.warning("%s: directive seq %d failed: %s (%s)", self.device_id, d.seq, code, detail)
        self._count("failed_directives")
        self._count(f"failed_{code}")
        self.slots.record_seq(d.seq)
        sha = d.model.sha256 if d.model else None
        self._deployment = _Deployment(seq=d.seq, state=DS.FAILED, error=code)
        await self._publish_event(
            protocol.Event(
                device_id=self.device_id,
                seq=d.seq,
                state=DS.FAILED,
                reason=code,
                detail=detail[:500],
                model_sha256=sha,
            )
        )
        await self._publish_reported()

    async def _transition(
        self,
        d: protocol.Directive,
        state: protocol.DeploymentState,
        *,
        sha: str | None = None,
        detail: str | None = None,
    ) -> None:
        self._deployment = _Deployment(seq=d.seq, state=state)
        await self._publish_event(
            protocol.Event(device_id=self.device_id, seq=d.seq, state=state, detail=detail, model_sha256=sha)
        )
        await self._publish_reported()

    # -- MQTT outbound (loop thread) ----------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._loop is None or self._loop.is_closed():
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_event(self, event: protocol.Event) -> None:
        if self.link is not None:
            topic = protocol.topic(self.device_id, protocol.Channel.EVENTS)
            await self.link.publish(topic, protocol.encode(event), qos=1)

    async def _publish_reported(self) -> None:
        if self.link is not None:
            topic = protocol.topic(self.device_id, protocol.Channel.REPORTED)
            await self.link.publish(topic, protocol.encode(self.reported()), qos=1, retain=True)

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.telemetry_interval)
            self.telemetry.cut()
            await self._send_telemetry()

    async def _send_telemetry(self) -> None:
        """Send queued batches oldest first; stop at the first failure and keep the rest."""
        link = self.link
        if link is None:
            return
        topic = protocol.topic(self.device_id, protocol.Channel.TELEMETRY)
        queue = self.telemetry.queue
        while queue and link.connected:
            batch = queue[0]
            if not await link.publish(topic, protocol.encode_telemetry(batch), qos=1):
                return
            if queue and queue[0] is batch:
                queue.popleft()
            self._count("telemetry_batches")


__all__ = ["Agent", "InferenceResult", "InstallError", "NoModelError"]
