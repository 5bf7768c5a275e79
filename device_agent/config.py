"""Agent configuration: who the device is, where it keeps its state, where its broker is.

A plain dataclass (not pydantic-settings) because a device reads one small TOML
file written at provisioning; ``edgefleet agent --config device.toml`` loads it
with :func:`load_config`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device_agent import wire as protocol
from device_agent.mirrors import check_mirrors
from device_agent.mqtt_security import MqttSecurity, read_secret


@dataclass(frozen=True)
class BrokerInfo:
    """Where a broker listens and what it supports; passed to server, agents and simulator."""

    host: str
    port: int
    mqtt_version: int = 5  # 5 or 4 (3.1.1)
    shared_subscriptions: bool = True
    kind: str = "mosquitto"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@dataclass
class AgentConfig:
    """Everything one agent needs; paths are resolved against the TOML file's directory."""

    device_id: str
    hardware_id: str
    data_dir: Path
    trust_path: Path
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_version: int = 5  # 5 or 4 (3.1.1)
    # Broker security (device_agent.mqtt_security). Production brokers (``edgefleet broker config``)
    # take TLS only and authenticate each device by client certificate or by username/password;
    # leaving all of these unset talks to an open development broker.
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None  # the fleet CA that signed the broker's certificate
    mqtt_cert_file: Path | None = None  # this device's client certificate (CN = device id)
    mqtt_key_file: Path | None = None
    mqtt_username: str | None = None  # password auth: the device id (the broker binds client id to it)
    mqtt_password_file: Path | None = None  # the password, in a file of its own (0600)
    telemetry_interval: float = 10.0  # seconds between telemetry batches
    targets: list[str] = field(default_factory=lambda: ["arm64-cpu"])
    tags: dict[str, str] = field(default_factory=dict)
    keepalive: int = 30
    session_expiry: int = 3600  # MQTT 5: how long the broker keeps our session while we are away
    max_inflight: int = 20  # bound on unacknowledged QoS 1 publishes (message ids wrap at 65,535)
    intra_op_threads: int = 1  # onnxruntime threads per session: devices are small, sessions many
    telemetry_batch_max: int = 5000  # cut a batch early once a window holds this many inferences
    telemetry_queue_bytes: int = 8 << 20  # on-disk store-and-forward cap; oldest batches go first
    sketch_every: int = 64  # drift sketches (input moments, value histograms) on every Nth inference
    api_listen: str = ""  # local inference API: "127.0.0.1:8700", "unix:/run/edgefleet/agent.sock", "" off
    api_max_body: int = 16 << 20  # largest request body the local API accepts
    api_request_timeout_s: float = 5.0  # a local API inference not answered by then is a 504 ("timeout")
    api_workers: int = 4  # inferences the local API runs at once (more requests wait, within the timeout)
    # Ground truth: recent predictions kept to match labels (POST /v1/labels, Agent.label) by id.
    label_ring_size: int = 4096  # predictions kept (~300 bytes each); older ones answer "expired"
    label_max_age_s: float = 86400.0  # a label for an older prediction answers "expired"
    # Capture (the directive's policy): sealed batches are uploaded at most this fast (0: no cap) ...
    capture_upload_bytes_per_s: int = 0
    capture_batch_age_s: float = 5.0  # ... and an open batch is sealed for upload after this long
    npu_delegate: str | None = None  # external delegate library for ethos-u* targets (LiteRT)
    download_max_bytes_per_s: int = 0  # bandwidth cap for model downloads; 0 = unlimited
    min_free_disk_bytes: int = 32 << 20  # keep this much disk free beyond a download, else refuse it
    delivery_retry_s: float = 60.0  # keep retrying an unreachable/busy server this long before failing
    log_format: str = "json"  # "json" (one object per line, for journald/log shippers) or "text"
    log_level: str = "INFO"
    # TUF delivery (docs/trust.md). With ``tuf_root_path`` (the root.json from provisioning) every
    # install is first resolved in the release-signed TUF metadata and directives/bundles are checked
    # against the keys of the newest verified root. Without it the agent checks DSSE signatures
    # against the keys in ``trust_path`` only (the simulator and many tests run that way).
    tuf_root_path: Path | None = None
    tuf_url: str = ""  # repository base (``<tuf_url>/metadata/``); "" = derived from the directive's URLs
    # HTTPS to the artifact server and the TUF repository: the CA that signed the server's
    # certificate (unset: the system's trust store). The device presents its client certificate
    # (``mqtt_cert_file``/``mqtt_key_file``) on HTTPS too, where a server asks for one.
    http_ca_file: Path | None = None
    # Static delivery (device_agent/mirrors.py, docs/trust.md): base URLs of published trees, tried
    # in order for TUF metadata, model files and envelopes; the directive's URLs and ``tuf_url`` are
    # then not used. HTTPS mirrors are verified against ``http_ca_file`` (or the system's store);
    # plain HTTP works too, since every byte is signed, but lets an on-path party see and withhold.
    mirrors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not protocol.DEVICE_ID_RE.match(self.device_id):
            raise ValueError(f"invalid device id {self.device_id!r}")
        if self.mqtt_version not in (4, 5):
            raise ValueError(f"mqtt_version must be 4 or 5, got {self.mqtt_version}")
        if self.telemetry_interval <= 0:
            raise ValueError("telemetry_interval must be > 0")
        if self.delivery_retry_s < 0:
            raise ValueError("delivery_retry_s must be >= 0")
        for name in (
            "telemetry_batch_max",
            "telemetry_queue_bytes",
            "sketch_every",
            "api_max_body",
            "api_workers",
            "label_ring_size",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("api_request_timeout_s", "label_max_age_s", "capture_batch_age_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("download_max_bytes_per_s", "min_free_disk_bytes", "capture_upload_bytes_per_s"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.log_format not in ("json", "text"):
            raise ValueError(f"log_format must be 'json' or 'text', got {self.log_format!r}")
        if self.api_listen and not self.api_listen.startswith("unix:"):
            host, sep, port = self.api_listen.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"api_listen must be 'host:port' or 'unix:/path', got {self.api_listen!r}")
        self.data_dir = Path(self.data_dir)
        self.trust_path = Path(self.trust_path)
        self.tuf_root_path = Path(self.tuf_root_path) if self.tuf_root_path else None
        for name in ("mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file", "mqtt_password_file", "http_ca_file"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value else None)
        if self.mqtt_password_file is not None and not self.mqtt_username:
            raise ValueError("mqtt_password_file needs mqtt_username")
        if (self.mqtt_cert_file is None) != (self.mqtt_key_file is None):
            raise ValueError("mqtt_cert_file and mqtt_key_file go together")
        if not self.mqtt_tls and (self.mqtt_ca_file or self.mqtt_cert_file):
            raise ValueError("mqtt_ca_file/mqtt_cert_file need mqtt_tls = true")
        self.targets = [str(t) for t in self.targets]
        self.mirrors = check_mirrors(self.mirrors)
        self.tags = {str(k): str(v) for k, v in self.tags.items()}

    def mqtt_security(self) -> MqttSecurity:
        """The broker connection's TLS and credentials (reads the password file now)."""
        return MqttSecurity(
            tls=self.mqtt_tls,
            ca_file=self.mqtt_ca_file,
            cert_file=self.mqtt_cert_file,
            key_file=self.mqtt_key_file,
            username=self.mqtt_username,
            password=read_secret(self.mqtt_password_file) if self.mqtt_password_file else None,
        )


PATH_KEYS = (
    "data_dir",
    "trust_path",
    "tuf_root_path",
    "mqtt_ca_file",
    "mqtt_cert_file",
    "mqtt_key_file",
    "mqtt_password_file",
    "http_ca_file",
)


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> AgentConfig:
    """Build a config from a mapping (TOML table); unknown keys are an error, not silently ignored."""
    known = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown agent config keys: {', '.join(unknown)}")
    values = dict(data)
    for key in PATH_KEYS:
        if values.get(key):
            p = Path(values[key]).expanduser()
            if base_dir is not None and not p.is_absolute():
                p = base_dir / p
            values[key] = p
    return AgentConfig(**values)


def load_config(path: Path) -> AgentConfig:
    """Load ``path`` (TOML). Keys may sit at top level or under an ``[agent]`` table."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    table = data.get("agent", data)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [agent] must be a table")
    return config_from_dict(table, base_dir=path.parent)
