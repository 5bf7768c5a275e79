"""Server configuration, read from ``EDGEFLEET_*`` environment variables.

One settings object is passed explicitly everywhere (no module-level globals), so
tests and the demo can run several servers with different settings in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Where the server keeps its data, which broker it bridges, and how fast the engine ticks."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    database_url: str | None = None  # None: SQLite file ``<data_dir>/fleet.db`` (WAL)
    data_dir: Path = Path("./edgefleet-data")
    keys_dir: Path = Path("keys")  # needs trust.json (release keys) and fleet.key
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_version: int = Field(default=5, description="5 or 4 (MQTT 3.1.1)")
    # A stable client id per replica gives it a persistent broker session: QoS 1 events and
    # telemetry published while it restarts are queued by the broker and delivered after.
    # None: a fresh id and a clean session per process (messages sent while it is away are lost).
    mqtt_client_id: str | None = None
    mqtt_session_expiry: int = 600  # seconds the broker keeps a stable-id replica's session
    mqtt_keepalive: int = 30  # seconds; the broker drops a client silent for 1.5x this
    # MQTT 5 Receive Maximum: unacknowledged messages the broker may send each client. Messages are
    # acknowledged after their transaction commits, so this bounds what a crash can leave to redeliver
    # and how far the server buffers ahead of the database (the broker queues the rest).
    mqtt_receive_maximum: int = 2000
    # Broker TLS and identity (fleet_server/mqtt_client.py). A production broker (`edgefleet broker
    # config`) lets the server in on its server listener with the client certificate it issued, and
    # names host, port and files in fleet-server.json: point mqtt_credentials at that file. A field
    # set here (or in its EDGEFLEET_MQTT_* variable) wins over the file. Nothing set: an open
    # development broker.
    mqtt_credentials: Path | None = None  # fleet-server.json from `edgefleet broker config`
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None  # the CA that signed the broker's certificate (its name is checked)
    mqtt_cert_file: Path | None = None  # client certificate + key (mutual TLS)
    mqtt_key_file: Path | None = None
    mqtt_username: str | None = None  # or a username and password (a broker with a password file)
    mqtt_password: SecretStr | None = None
    mqtt_password_file: Path | None = None  # the password in a file of its own (first line)
    # Several brokers (fleet_server/shards.py): the shards file `edgefleet broker config --shards N`
    # writes. Every connection is then made to every shard with that shard's fleet-server.json, and
    # the single-broker fields above are not used. None: the one broker above is the only shard.
    mqtt_shards: Path | None = None
    # Reconciliation (fleet_server/reconcile.py): a device that reports a seq or model other than
    # its directive after the grace gets the directive republished, at most once per interval.
    reconcile_grace_seconds: float = 10.0
    reconcile_interval_seconds: float = 30.0
    # Processes taking the telemetry and event streams (each its own MQTT client in the $share group),
    # so decoding and storing never compete with the API and the main MQTT client for the GIL.
    # 0: a thread of the server process does it (one process, e.g. for debugging). Several telemetry
    # workers need shared subscriptions (a $share group splits the stream); without, one runs.
    ingest_workers: int = 2
    ingest_max_batch: int = 1000  # messages stored per transaction at most
    shared_subscriptions: bool = True
    public_url: str = "http://127.0.0.1:8080"  # base URL devices download artifacts from
    tick_interval: float = 1.0  # seconds between rollout engine runs
    directive_ttl_seconds: float = 86400.0
    # Admin API auth (docs/contracts.md). The bootstrap admin token: this value, or when unset one
    # generated at first start into <data_dir>/admin.token (0600). ``auth_required = False`` lets a
    # call without a token through as "anonymous" (a token that is sent is still checked): for
    # local experiments only, never a deployment.
    admin_token: str | None = None
    auth_required: bool = (
        True  # admin API needs a bearer token (bootstrap: admin_token or <data_dir>/admin.token)
    )
    # The web console (/ui, fleet_server.console): how long a sign-in lasts, and the key that signs its
    # session cookie. Unset: one generated at first start into <data_dir>/console.secret (0600); give
    # every replica behind one address the same value, or a cookie from one is refused by the next.
    console_session_seconds: float = Field(default=8 * 3600.0, gt=0.0)
    console_secret: SecretStr | None = None
    # Request bodies the API accepts, in bytes, enforced while the body streams in
    # (fleet_server.routes.guard): JSON documents are a few KB; an upload is one bundle.
    max_request_bytes: int = Field(default=1 << 20, gt=0)
    max_upload_bytes: int = Field(default=4 << 30, gt=0)
    # How long the server keeps trying to reach its database at start before it gives up: a
    # deployment starts PostgreSQL and the server together (compose, Kubernetes), and the server
    # must wait for it rather than exit. The broker needs no such setting: MQTT reconnects forever.
    startup_retry_seconds: float = Field(default=60.0, ge=0.0)
    # TUF delivery metadata (<data_dir>/tuf): lifetimes of what the fleet key signs, and how often the
    # keeper checks whether to re-sign them (at half their lifetime).
    tuf_timestamp_expiry_seconds: float = 86400.0
    tuf_snapshot_expiry_seconds: float = 7 * 86400.0
    tuf_refresh_interval: float = 60.0
    # Static delivery (fleet_server/mirror.py, docs/trust.md): where the TUF metadata and every
    # bundle are published for mirrors (any static web server or CDN) to serve: "" is
    # <data_dir>/mirror, a path is that directory, s3://bucket/prefix a bucket (boto3's credential
    # chain; mirror_s3_endpoint_url for an S3-compatible service other than AWS), "off" nothing.
    # Published on every release, revocation and re-signing; `edgefleet mirror publish` re-runs it.
    mirror: str = ""
    mirror_s3_endpoint_url: str | None = None
    mirror_s3_region: str | None = None

    # SLOs (docs/slo.md): how often the leader samples the telemetry totals and evaluates every SLO,
    # how long a breach must last before its alert fires, and where alerts go: Alertmanager's v2 API
    # (base URLs, like http://127.0.0.1:9093) and plain webhooks (full URLs), each as a JSON list in
    # the environment. A notification is tried ``alert_max_attempts`` times, backing off to 5 min.
    slo_interval: float = Field(default=60.0, gt=0.0)
    slo_pending_seconds: float = Field(default=0.0, ge=0.0)
    # how long a firing alert must see no breach to resolve; None: the short window of its rules
    slo_resolve_seconds: float | None = Field(default=None, ge=0.0)
    alertmanager_urls: list[str] = Field(default_factory=list)
    alert_webhook_urls: list[str] = Field(default_factory=list)
    alert_max_attempts: int = Field(default=10, ge=1)
    alert_timeout_seconds: float = Field(default=5.0, gt=0.0)
    # Alertmanager forgets a firing alert that is not sent again (resolve_timeout): the leader re-sends
    # firing alerts this often, each valid for four times as long.
    alertmanager_resend_seconds: float = Field(default=60.0, gt=0.0)
    # /metrics needs ``Authorization: Bearer <this>`` when set (Prometheus: ``authorization:
    # credentials_file``); unset, anyone who reaches the port may scrape it (keep it off the public side)
    metrics_token: SecretStr | None = None
    # /readyz says ``degraded`` (still 200) when the oldest unstored telemetry is older than this
    ready_max_ingest_lag_seconds: float = Field(default=60.0, gt=0.0)

    # ``edgefleet server``'s logs: one JSON object a line with the request id ("json"), or plain text
    log_format: Literal["json", "text"] = "json"

    # Captured inferences devices upload (fleet_server.captures): where the batches are kept (None:
    # <data_dir>/captures), and the CA whose device certificates sign the uploads (None: the fleet
    # CA `edgefleet devices provision` keeps, <keys_dir>/ca/ca.crt).
    capture_dir: Path | None = None
    device_ca_file: Path | None = None
    # The retrain webhook (fleet_server.retrain): POSTed when a model's accuracy falls under
    # retrain_min_accuracy (with at least retrain_min_labels labels) or its output PSI against the
    # model it replaced passes retrain_max_psi (both with retrain_min_samples outputs). None: off.
    retrain_webhook_url: str | None = None
    retrain_min_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    retrain_max_psi: float | None = Field(default=None, gt=0.0)
    retrain_min_labels: int = Field(default=200, ge=1)
    retrain_min_samples: int = Field(default=1000, ge=1)
    retrain_window_seconds: float = Field(default=7 * 86400.0, gt=0.0)  # the dataset window it names
    retrain_check_seconds: float = Field(default=60.0, gt=0.0)
    retrain_webhook_attempts: int = Field(default=8, ge=1)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(Path(self.data_dir) / 'fleet.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.data_dir) / "bundles"

    @property
    def tuf_dir(self) -> Path:
        return Path(self.data_dir) / "tuf"

    @property
    def mirror_dir(self) -> Path:
        """The local mirror directory (the default storage, also served at ``/mirror/``)."""
        return Path(self.data_dir) / "mirror"

    @property
    def captures_dir(self) -> Path:
        return Path(self.capture_dir) if self.capture_dir else Path(self.data_dir) / "captures"

    @property
    def device_ca_path(self) -> Path:
        return Path(self.device_ca_file) if self.device_ca_file else Path(self.keys_dir) / "ca" / "ca.crt"

    @property
    def upload_tmp_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"

    # The encrypted fleet key's passphrase (fleet_server.keyload), first found wins: this file,
    # then $EDGEFLEET_KEY_PASSPHRASE, then systemd's $CREDENTIALS_DIRECTORY/<key_credential>
    # (LoadCredential=). The passphrase itself is deliberately not a setting: settings get logged.
    key_passphrase_file: Path | None = None
    key_credential: str = "edgefleet-key-passphrase"
