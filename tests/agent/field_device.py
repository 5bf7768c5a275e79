"""What the ground-truth and capture tests share: a real agent serving a real model through an
in-memory link, with a device certificate from a real fleet CA, and a real HTTP capture server
that checks every upload's device signature against that CA.

The server is this test suite's stand-in for the fleet server's capture endpoint (same
contract: ``PUT {upload_url}/{device_id}/{batch_id}``, 201 stored, 200 the same batch again,
4xx with ``{"detail": {"code", "message"}}``); it can be taken down (connection refused),
made to answer a status, or made to hold a request open (to kill an agent mid-upload).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from device_agent import protocol, wire
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.memory_link import MemoryLink
from edgefleet.broker import BrokerInfo
from edgefleet.provision import fleet_ca, write_device_identity
from signing.device_auth import DeviceAuthError, verify_request
from signing.keyring import KeyDir
from signing.manifest import sign_bundle
from tests.support.loopback_http import LoopbackServer, QuietHandler

from .harness import (
    HW,
    Bundle,
    LoopThread,
    make_model,
    model_ref,
    mqtt_toml,
    sign_directive,
    unique_id,
    wait_for,
)
from .memory_fetcher import MemoryFetcher

UPLOAD_PATH = "/api/v1/captures"


def write_agent_toml(tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo, device_id: str) -> Path:
    """The agent.toml of a real ``python -m device_agent`` process on the test broker that seals
    capture batches quickly; its data directory is ``tmp_path / device_id``."""
    conf = tmp_path / "agent.toml"
    lines = [
        "[agent]",
        f'device_id = "{device_id}"',
        'hardware_id = "rpi4"',
        f'data_dir = "{tmp_path / device_id}"',
        f'trust_path = "{keydir.trust_path}"',
        mqtt_toml(broker_info, device_id).rstrip("\n"),
        f"mqtt_version = {broker_info.mqtt_version}",
        "capture_batch_age_s = 0.3",
        'log_format = "text"',
    ]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def ranged_bundle(root: Path, keydir: KeyDir, *, lo: float, hi: float, seed: int = 5) -> Bundle:
    """The harness's tiny model ([N,64] -> [N,10]) signed with the manifest fields the compiler
    writes: the io signature and the calibration range of its input."""
    d = root / f"ranged-{seed}-{unique_id('b')}"
    make_model(d / "model.onnx", seed=seed)
    manifest = sign_bundle(
        d,
        {
            "name": "ranged",
            "version": "1",
            "release": 1,
            "target": "arm64-cpu",
            "hardware_ids": [HW],
            "io_signature": {
                "inputs": [{"name": "input", "shape": ["N", 64], "dtype": "float32"}],
                "outputs": [{"name": "scores", "shape": ["N", 10], "dtype": "float32"}],
            },
            "quantization": {"input_ranges": {"input": {"min": lo, "max": hi}}},
        },
        ["model.onnx"],
        keydir.key("release"),
    )
    f = manifest.model_file
    return Bundle(d, f.sha256, f.length, "ranged", "1", "arm64-cpu")


@dataclass
class FieldDevice:
    """One agent on a loop thread, its link and fetcher in memory."""

    agent: Agent
    link: MemoryLink
    fetcher: MemoryFetcher
    loop: LoopThread
    keydir: KeyDir
    seq: int = 0
    cut: list[protocol.TelemetryBatch] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.agent.device_id

    def direct(self, bundle: Bundle | None, **fields: Any) -> int:
        """Deliver a fleet-signed directive for ``bundle`` (fields: capture=..., ...); its seq."""
        self.seq += 1
        ref = None
        if bundle is not None:
            model_url, envelope_url = self.fetcher.add(bundle)
            ref = model_ref(bundle, model_url=model_url, envelope_url=envelope_url)
        self.link.deliver(sign_directive(self.keydir.key("fleet"), self.id, self.seq, ref, **fields))
        return self.seq

    def serve(self, bundle: Bundle, **fields: Any) -> None:
        self.direct(bundle, **fields)
        wait_for(
            lambda: self.agent.running_sha256 == bundle.sha256, 20, f"{self.id} serving {bundle.version}"
        )

    def batches(self) -> list[protocol.TelemetryBatch]:
        """Every telemetry window so far, as the server decodes it (the open one is cut now).

        The device's telemetry interval is an hour, so only these cuts close windows."""
        batch = self.agent.telemetry.cut()
        if batch is not None:
            self.cut.append(protocol.decode_telemetry(wire.encode_telemetry(batch), self.id))
        return list(self.cut)

    def stats(self, sha256: str) -> dict[str, Any]:
        """The model's telemetry summed over every batch so far (what the server would add up)."""
        total: dict[str, Any] = {}
        for b in self.batches():
            ms = b.models.get(sha256)
            if ms is None:
                continue
            for k, v in ms.model_dump().items():
                total[k] = _add(total.get(k), v)
        return total

    def unmatched(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.batches():
            for k, v in b.labels_unmatched.items():
                out[k] = out.get(k, 0) + v
        return out


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if isinstance(b, dict):
        return {k: _add(a.get(k), v) for k, v in b.items()} | {k: v for k, v in a.items() if k not in b}
    if isinstance(b, list):
        if len(a) < len(b):
            a = a + [0] * (len(b) - len(a))
        return [_add(x, y) for x, y in zip(a, b + [0] * (len(a) - len(b)), strict=True)]
    return a + b


def device_identity(keydir: KeyDir, device_id: str, root: Path) -> dict[str, Any]:
    """A device certificate and key from the fleet CA, as provisioning writes them (config keys)."""
    d = root / "identity" / device_id
    write_device_identity(fleet_ca(keydir), device_id, d)
    return {"mqtt_tls": True, "mqtt_cert_file": d / "device.crt", "mqtt_key_file": d / "device.key"}


def start_device(
    keydir: KeyDir,
    data: Path,
    loop: LoopThread,
    *,
    device_id: str | None = None,
    identity: bool = True,
    runtime_factory: Any = None,
    **config: Any,
) -> FieldDevice:
    dev = device_id or unique_id("field")
    if identity and "mqtt_cert_file" not in config:
        config = {**device_identity(keydir, dev, data.parent), **config}
    cfg = AgentConfig(
        dev,
        HW,
        data,
        keydir.trust_path,
        telemetry_interval=config.pop("telemetry_interval", 3600.0),
        **config,
    )
    link, fetcher = MemoryLink(dev), MemoryFetcher()
    agent = Agent(cfg, keydir.trust_root(), runtime_factory, link=link, fetcher=fetcher)
    loop.run(agent.start())
    assert loop.run(agent.wait_connected(5))
    return FieldDevice(agent, link, fetcher, loop, keydir)


@dataclass
class Stored:
    device_id: str
    body_sha256: str
    items: list[dict[str, Any]]


@dataclass
class CaptureServer:
    """A real HTTP capture endpoint verifying device signatures against the fleet CA."""

    ca: x509.Certificate
    port: int = 0
    stored: dict[str, Stored] = field(default_factory=dict)  # batch id -> what was stored
    answers: list[tuple[int, int]] = field(default_factory=list)  # (status, batch count) log
    script: list[int] = field(default_factory=list)  # statuses to answer next, before storing
    refuse: Callable[[dict[str, Any]], str | None] = lambda doc: None  # a 4xx code for a batch, or None
    hold_s: float = 0.0  # hold a stored batch's answer this long (to kill the agent mid-upload)
    received: int = 0  # requests that reached the handler
    answered_at: list[float] = field(default_factory=list)  # time.monotonic() of each answer
    _server: LoopbackServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{UPLOAD_PATH}"

    def start(self) -> CaptureServer:
        outer = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with outer._lock:
                    outer.answers.append((status, len(outer.stored)))
                    outer.answered_at.append(time.monotonic())

            def _refuse(self, status: int, code: str, message: str) -> None:
                self._answer(status, {"detail": {"code": code, "message": message}})

            def do_PUT(self) -> None:
                with outer._lock:
                    outer.received += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer._lock:
                    scripted = outer.script.pop(0) if outer.script else None
                if scripted is not None:
                    self._refuse(scripted, "scripted", f"answering {scripted}")
                    return
                parts = self.path.split("/")
                if not self.path.startswith(UPLOAD_PATH + "/") or len(parts) != 6:
                    self._refuse(404, "not_found", self.path)
                    return
                device, batch_id = parts[4], parts[5]
                digest = hashlib.sha256(body).hexdigest()
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    who = verify_request(headers, "PUT", self.path, digest, outer.ca)
                except DeviceAuthError as exc:
                    self._refuse(401 if exc.code == "device_unauthenticated" else 403, exc.code, str(exc))
                    return
                doc = json.loads(body)
                if who != device or doc.get("device_id") != device or doc.get("batch_id") != batch_id:
                    self._refuse(403, "wrong_device", "the batch is not this device's")
                    return
                code = outer.refuse(doc)
                if code is not None:
                    self._refuse(422, code, "refused by the test")
                    return
                with outer._lock:
                    seen = outer.stored.get(batch_id)
                    if seen is not None:
                        status = 200 if seen.body_sha256 == digest else 409
                    else:
                        outer.stored[batch_id] = Stored(device, digest, doc["items"])
                        status = 201
                if status == 409:
                    self._refuse(409, "batch_conflict", "another body under this batch id")
                    return
                if outer.hold_s:  # stored, but the device does not know yet
                    time.sleep(outer.hold_s)
                self._answer(status, {"batch_id": batch_id, "items": len(doc["items"])})

        self._server = LoopbackServer(Handler, port=self.port)
        self.port = self._server.port
        return self

    def stop(self) -> None:
        """Gone: the port refuses connections until ``start`` again (on the same port)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def ids(self) -> list[str]:
        """Every stored inference id, once per time it was stored (duplicates would show twice)."""
        with self._lock:
            return [item["inference_id"] for s in self.stored.values() for item in s.items]
