"""The per-app objects request handlers need, kept on ``app.state.ctx`` (no globals)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from fleet_server.counters import Counters
from fleet_server.settings import ServerSettings
from signing.trust import TrustRoot

if TYPE_CHECKING:
    from fleet_server.mirror import Publisher
    from fleet_server.mqtt_bridge import MqttBridge
    from fleet_server.retrain import RetrainWatcher
    from fleet_server.slo_runner import SloRunner
    from fleet_server.ticker import Ticker
    from fleet_server.tuf_service import TufService


@dataclass(frozen=True)
class BodyLimits:
    """Request bodies the API accepts, in bytes (``max_request_bytes``/``max_upload_bytes``).

    Enforced while the body streams in (fleet_server.routes.guard), so a client that lies in
    Content-Length or sends a chunked body cannot push more.
    """

    request: int  # any non-upload body (JSON)
    upload: int  # a multipart upload (bundle files, TUF targets)

    @classmethod
    def of(cls, settings: ServerSettings) -> BodyLimits:
        return cls(settings.max_request_bytes, settings.max_upload_bytes)


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    trust: TrustRoot
    counters: Counters = field(default_factory=Counters)
    lock: threading.Lock = field(default_factory=threading.Lock)  # rollout changes vs. the ticker
    limits: BodyLimits = field(init=False)
    bridge: MqttBridge | None = None
    ticker: Ticker | None = None
    slo: SloRunner | None = None  # the leader's SLO evaluation and alert delivery
    metrics: CollectorRegistry | None = None  # what /metrics exposes (fleet_server.metrics)
    retrain: RetrainWatcher | None = None
    tuf: TufService | None = None  # the TUF repository this server serves (None: not set up)
    publisher: Publisher | None = None  # static delivery: publishes the repository and bundles (None: off)
    device_ca: x509.Certificate | None = None  # signs device certificates (None: captures refused)
    admin_token: str = ""  # the bootstrap admin token (plaintext only in memory)
    admin_token_hash: str = ""

    def __post_init__(self) -> None:
        self.limits = BodyLimits.of(self.settings)
