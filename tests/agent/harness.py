"""Test harness playing the fleet server's role: tiny ONNX models, signed bundles and
directives, a real HTTP artifact server (Range + device header), a paho observer,
and an agent on its own loop thread so tests can call ``infer`` from many threads.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import ssl
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import paho.mqtt.client as mqtt
from onnx import TensorProto, helper, numpy_helper

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from edgefleet.broker import BrokerInfo, device_mqtt_keys
from signing.dsse import sign_envelope
from signing.keyring import KeyDir
from signing.keys import KeyPair
from signing.manifest import ENVELOPE_NAME, sign_bundle
from tests.mqtt_clients import server_address, server_client
from tests.support import waiting
from tests.support.loopback_http import LoopbackServer, QuietHandler, file_server

T = TypeVar("T")
HW = "rpi4"


# The agent's predicates read memory (its state, an observer's messages): polled every 10 ms,
# which catches a download under way or a swap in progress.
wait_for = functools.partial(waiting.wait_for, interval=0.01)


def unique_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_model(path: Path, seed: int = 0, nan: bool = False, width: int = 10) -> Path:
    """input "input" float [N,64] -> MatMul -> "scores" [N,width]; ``nan`` poisons the weights.

    ``width`` sizes the file (~256 bytes per class): 10 is ~2.6 KB, 2048 ~512 KB."""
    w = np.random.default_rng(seed).standard_normal((64, width)).astype(np.float32)
    if nan:
        w[0, 0] = np.nan
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["scores"])],
        f"tiny{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@dataclass
class Bundle:
    dir: Path
    sha256: str
    length: int
    name: str
    version: str
    target: str
    file: str = "model.onnx"

    @property
    def model_path(self) -> Path:
        return self.dir / self.file


def make_bundle(
    root: Path,
    key: KeyPair,
    seed: int = 0,
    nan: bool = False,
    version: str = "1",
    hardware_ids: list[str] | None = None,
    target: str = "arm64-cpu",
    name: str = "tiny",
    width: int = 10,
) -> Bundle:
    d = root / f"{name}-{version}-{seed}-{'nan' if nan else 'ok'}-{uuid.uuid4().hex[:4]}"
    if target.startswith(("tflite", "ethos-u")):
        from .tflite_models import make_tflite

        make_tflite(d / "model.tflite", seed=seed, nan=nan)
        file = "model.tflite"
    else:
        make_model(d / "model.onnx", seed=seed, nan=nan, width=width)
        file = "model.onnx"
    manifest = sign_bundle(
        d,
        {
            "name": name,
            "version": version,
            "release": int(version) if version.isdigit() else 1,
            "target": target,
            "hardware_ids": hardware_ids or [HW],
        },
        [file],
        key,
    )
    f = manifest.model_file
    return Bundle(d, f.sha256, f.length, name, version, target, file)


class ArtifactServer:
    """Real HTTP server for bundle files: ``/m/<sha>`` model, ``/e/<sha>`` envelope.

    Honours ``Range: bytes=a-``, requires ``X-Edgefleet-Device``, logs requests;
    ``overrides[sha] = bytes`` serves other bytes for a model (tampering, oversize);
    ``busy[path] = (n, status)`` answers the next ``n`` GETs of ``path`` with ``status``
    (a proxy in front of a restarting server). With ``tls`` it speaks HTTPS and
    records the common name of each client certificate presented in ``peers``.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.envelopes: dict[str, bytes] = {}
        self.overrides: dict[str, bytes] = {}
        self.busy: dict[str, tuple[int, int]] = {}
        self.requests: list[tuple[str, str | None, str | None]] = []  # path, range, device
        self.peers: list[str] = []
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                peer = self.connection.getpeercert() if tls is not None else None
                if peer:
                    outer.peers.extend(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")
                device = self.headers.get("X-Edgefleet-Device")
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng, device))
                if not device:
                    self.send_error(403)
                    return
                left, status = outer.busy.get(self.path, (0, 0))
                if left > 0:
                    outer.busy[self.path] = (left - 1, status)
                    self.send_error(status)
                    return
                m = re.fullmatch(r"/(m|e)/([0-9a-f]{64})", self.path)
                if not m:
                    self.send_error(404)
                    return
                kind, sha = m.groups()
                body = (
                    outer.overrides.get(sha, outer.files.get(sha))
                    if kind == "m"
                    else outer.envelopes.get(sha)
                )
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and kind == "m":
                    rm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                    if rm is None or int(rm.group(1)) >= len(body):
                        self.send_error(416)
                        return
                    start = int(rm.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.server = LoopbackServer(Handler, tls=tls)
        self.base = self.server.url

    def add(self, bundle: Bundle) -> None:
        self.files[bundle.sha256] = bundle.model_path.read_bytes()
        self.envelopes[bundle.sha256] = (bundle.dir / ENVELOPE_NAME).read_bytes()

    def model_ref(self, bundle: Bundle, **changes: Any) -> protocol.ModelRef:
        urls = {
            "model_url": f"{self.base}/m/{bundle.sha256}",
            "envelope_url": f"{self.base}/e/{bundle.sha256}",
        }
        return model_ref(bundle, **{**urls, **changes})

    def close(self) -> None:
        self.server.close()


def model_ref(bundle: Bundle, *, model_url: str, envelope_url: str, **changes: Any) -> protocol.ModelRef:
    """What a directive names for ``bundle`` fetched from these URLs (``changes`` override fields)."""
    fields: dict[str, Any] = {
        "name": bundle.name,
        "version": bundle.version,
        "release": 1,
        "target": bundle.target,
        "sha256": bundle.sha256,
        "length": bundle.length,
        "model_url": model_url,
        "envelope_url": envelope_url,
    }
    fields.update(changes)
    return protocol.ModelRef(**fields)


def sign_directive(
    key: KeyPair,
    device_id: str,
    seq: int,
    model: protocol.ModelRef | None,
    ttl: float = 3600.0,
    **fields: Any,
) -> bytes:
    """A fleet-signed directive; ``fields`` sets the optional ones (probation, shadow, not_before...)."""
    now = protocol.utcnow()
    d = protocol.Directive(
        device_id=device_id,
        seq=seq,
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl),
        model=model,
        **fields,
    )
    env = sign_envelope(d.model_dump_json().encode(), protocol.DIRECTIVE_PAYLOAD_TYPE, [key])
    return json.dumps(env).encode()


class Observer:
    """A paho client (test side, its own thread) that publishes directives and records device messages.

    It plays the fleet server, so on the production broker it has the server's identity (its
    certificate, on the server listener): the only account that may write ``desired``."""

    def __init__(self, broker: BrokerInfo) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = server_client(broker, unique_id("fleet-server-observer"))
        self.client.on_message = self._on_message
        self.client.max_queued_messages_set(0)
        self.client.connect(*server_address(broker))
        self.client.subscribe(
            [(protocol.wildcard(c), 1) for c in ("events", "reported", "status", "telemetry")]
        )
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def publish(self, device_id: str, payload: bytes, retain: bool = True) -> None:
        info = self.client.publish(protocol.topic(device_id, "desired"), payload, qos=1, retain=retain)
        info.wait_for_publish(5)

    def events(self, device_id: str) -> list[protocol.Event]:
        t = protocol.topic(device_id, "events")
        with self._lock:
            return [protocol.decode_event(p) for tp, p in self.messages if tp == t]

    def reported(self, device_id: str) -> list[protocol.Reported]:
        t = protocol.topic(device_id, "reported")
        with self._lock:
            return [protocol.decode_reported(p) for tp, p in self.messages if tp == t and p]

    def telemetry(self, device_id: str) -> list[protocol.TelemetryBatch]:
        t = protocol.topic(device_id, "telemetry")
        with self._lock:
            return [protocol.decode_telemetry(p) for tp, p in self.messages if tp == t]

    def wait_event(
        self, device_id: str, state: protocol.DeploymentState, seq: int | None = None, timeout: float = 10.0
    ) -> protocol.Event:
        def find() -> protocol.Event | None:
            for e in self.events(device_id):
                if e.state == state and (seq is None or e.seq == seq):
                    return e
            return None

        return wait_for(find, timeout, f"{state} event (seq {seq}) from {device_id}")

    def clear_retained(self, device_id: str) -> None:
        self.client.publish(protocol.topic(device_id, "desired"), b"", qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class LoopThread:
    """An asyncio loop in a background thread (as on a device: agent on the loop, infer elsewhere)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def agent_config(
    broker: BrokerInfo, data_dir: Path, trust_path: Path, device_id: str, **kw: Any
) -> AgentConfig:
    """An agent of ``device_id`` on ``broker``, with the credentials the broker issued it."""
    return AgentConfig(
        device_id=device_id,
        hardware_id=kw.pop("hardware_id", HW),
        data_dir=data_dir,
        trust_path=trust_path,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_version=kw.pop("mqtt_version", broker.mqtt_version),
        telemetry_interval=kw.pop("telemetry_interval", 0.5),
        **{**device_mqtt_keys(broker, device_id), **kw},
    )


def swapped(agent: Agent, n: int) -> bool:
    """At least ``n`` models have served on ``agent`` (boot, swaps, reverts)."""
    return len(agent.history) >= n


def mqtt_toml(broker: BrokerInfo, device_id: str) -> str:
    """The broker lines of an agent TOML for ``device_id`` (address, TLS and its credentials)."""
    keys = {"mqtt_host": broker.host, "mqtt_port": broker.port, **device_mqtt_keys(broker, device_id)}
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def start_agent(lt: LoopThread, agent: Agent) -> Agent:
    lt.run(agent.start())
    assert lt.run(agent.wait_connected(10)), "agent did not connect"
    return agent


X = np.random.default_rng(42).standard_normal((1, 64)).astype(np.float32)


class TufServer:
    """A real TUF repository (``signing.tuf_repo``) served over real HTTP, for TUF-mode agents.

    ``release(bundle)`` signs the bundle into the targets metadata with the release
    keys and publishes snapshot + timestamp with the fleet key, as the server does.
    """

    def __init__(self, root: Path, keydir: KeyDir, tls: ssl.SSLContext | None = None) -> None:
        from signing.tuf_repo import TufRepository

        self.keydir = keydir
        root.mkdir(parents=True, exist_ok=True)
        self.repo = TufRepository.create(root, keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet"))
        self.server = file_server(root, tls)
        self.url = self.server.url

    def release(self, bundle: Bundle) -> None:
        from signing.targets import TargetCustom
        from signing.tuf_release import target_name

        release = int(bundle.version) if bundle.version.isdigit() else 1
        custom = TargetCustom(bundle.name, release, [HW])
        self.repo.add_target(
            target_name(bundle.name, bundle.version), bundle.model_path, custom, self.keydir.keys("release")
        )
        self.repo.publish(self.keydir.key("fleet"))

    def close(self) -> None:
        self.server.close()
