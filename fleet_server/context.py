"""The per-app objects request handlers need, kept on ``app.state.ctx`` (no globals)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from fleet_server.counters import Counters
from fleet_server.settings import ServerSettings
from signing.trust import TrustRoot

if TYPE_CHECKING:
    from fleet_server.mqtt_bridge import MqttBridge
    from fleet_server.ticker import Ticker
    from fleet_server.tuf_service import TufService

# Request bodies the API accepts, in bytes. JSON bodies are small documents (the largest, a
# rollout, is a few KB); uploads carry model files, so their bound is what one bundle may weigh.
# Both are enforced while the body streams in (fleet_server.routes.guard), so a client that
# lies in Content-Length or sends a chunked body cannot push more.
MAX_REQUEST_BYTES = 1 << 20
MAX_UPLOAD_BYTES = 4 << 30


@dataclass(frozen=True)
class BodyLimits:
    request: int = MAX_REQUEST_BYTES  # any non-upload body (JSON)
    upload: int = MAX_UPLOAD_BYTES  # a multipart upload (bundle files, TUF targets)


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    trust: TrustRoot
    counters: Counters = field(default_factory=Counters)
    lock: threading.Lock = field(default_factory=threading.Lock)  # rollout changes vs. the ticker
    limits: BodyLimits = field(default_factory=BodyLimits)
    bridge: MqttBridge | None = None
    ticker: Ticker | None = None
    tuf: TufService | None = None  # the TUF repository this server serves (None: not set up)
    admin_token: str = ""  # the bootstrap admin token (plaintext only in memory)
    admin_token_hash: str = ""
