"""The one wire contract between devices and the fleet server (MQTT topics + message schemas).

Kept free of heavy imports (pydantic only) because the server and the simulator
import it too. The agent itself does not import this module: it speaks the same
JSON through :mod:`device_agent.wire` (stdlib only, ~9 MB less RSS on a device);
``tests/agent/test_wire.py`` holds the two to each other. Every inbound payload
goes through ``decode_*``, which raises ``ProtocolError`` on anything malformed
so callers can count and drop it instead of crashing.

Topics (``ef/v1/{device}/...``):

=========  =================  ========  ==========================================
suffix     direction          retained  payload
=========  =================  ========  ==========================================
desired    server -> device   yes       DSSE envelope (fleet key) around Directive
reported   device -> server   yes       Reported (JSON)
events     device -> server   no        Event (JSON)
telemetry  device -> server   no        zlib-compressed JSON TelemetryBatch
status     broker LWT/device  yes       Status (JSON)
=========  =================  ========  ==========================================
"""

from __future__ import annotations

import json
import zlib
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from device_agent import schedule, wire

# Topics, states and bounds live in ``wire`` (stdlib only, what the agent itself imports);
# re-exported here so this module stays the one place the contract is read from.
from device_agent.wire import (
    CAPTURE_KEEP,
    DELTA_DIR,
    DEVICE_ID_RE,
    DIRECTIVE_PAYLOAD_TYPE,
    EVENT_ID_MAX,
    INPUT_BUCKETS,
    INPUT_CHECKS,
    INPUT_STAT_FEATURES,
    LABEL_DELAY_BOUNDS_S,
    LABEL_DELAY_BUCKETS,
    LABEL_UNMATCHED,
    LATENCY_BOUNDS_US,
    LATENCY_BUCKETS,
    MAX_DELTA_FRACTION,
    MAX_LABEL_CLASSES,
    MAX_PAYLOAD,
    OTHER_CLASS,
    PREFIX,
    VALUE_BOUNDS,
    Channel,
    DeploymentState,
    ProtocolError,
    ReasonCode,
    default_of,
    delta_path,
    delta_window_log,
    latency_bucket,
    latency_quantile,
    max_delta_bytes,
    parse_topic,
    shared_subscription,
    topic,
    utcnow,
    wildcard,
)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class ModelRef(_Msg):
    """What a directive asks a device to run; the hash/length must agree with the signed bundle."""

    name: str
    version: str
    release: int
    target: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(gt=0)
    model_url: str  # absolute URL of the model file (HTTP, Range supported)
    envelope_url: str  # absolute URL of the bundle's DSSE envelope (release-signed manifest)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class Probation(_Msg):
    """How the agent judges a freshly swapped-in model before it reports success."""

    # watch window after the swap
    seconds: float = Field(default=default_of(wire.Probation, "seconds"), ge=0.0)
    # ok inferences needed before success
    min_inferences: int = Field(default=default_of(wire.Probation, "min_inferences"), ge=0)
    # non-finite / runtime errors
    max_error_rate: float = Field(default=default_of(wire.Probation, "max_error_rate"), ge=0.0, le=1.0)
    # p95 new / p95 old on this device
    max_latency_ratio: float = Field(default=default_of(wire.Probation, "max_latency_ratio"), gt=0.0)


class Capture(_Msg):
    """What a device keeps of its inferences for retraining and where it uploads them (``wire.Capture``)."""

    upload_url: str = Field(min_length=1)  # where the device uploads capture batches
    sample_rate: float = Field(default=default_of(wire.Capture, "sample_rate"), ge=0.0, le=1.0)
    keep: Literal["inputs", "outputs", "both"] = default_of(wire.Capture, "keep")
    quota_bytes: int = Field(default=default_of(wire.Capture, "quota_bytes"), ge=1)  # on-device disk


class Window(_Msg):
    """A weekly maintenance window in the device's local time (``device_agent.schedule.Window``):
    ``days`` (mon..sun), ``start`` and ``end`` as ``HH:MM``; an end at or before the start crosses
    midnight, ``start == end`` is the whole day."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        min_length=1, description="the days it opens on, in the device's local time"
    )
    start: str = Field(description="when it opens, HH:MM local time")
    end: str = Field(description="when it closes, HH:MM local time (at or before start: the next day)")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        schedule.parse_hhmm(v, "time")  # raises ScheduleError (a ValueError) naming the format
        return v

    def to_schedule(self) -> schedule.Window:
        return schedule.Window.from_dict(self.model_dump())


class Activation(_Msg):
    """When the device may swap in the downloaded model (``wire.Activation``)."""

    windows: list[Window] = Field(default_factory=list)  # none: any time
    max_deferral_seconds: float = Field(default=default_of(wire.Activation, "max_deferral_seconds"), ge=0.0)


class MeteredRule(_Msg):
    """What a metered link may download (``device_agent.schedule.MeteredRule``)."""

    download: Literal["any", "unmetered_only"] = "any"
    max_bytes_per_day: int | None = Field(default=None, ge=1)


class Directive(_Msg):
    """The desired state of one device. Signed by the fleet key; higher ``seq`` wins."""

    device_id: str
    seq: int = Field(ge=1)
    issued_at: datetime
    expires_at: datetime
    model: ModelRef | None  # None: run nothing new (keep current)
    rollout_id: str | None = None
    # ok inferences before success is reported
    probation_inferences: int = Field(default=default_of(wire.Directive, "probation_inferences"), ge=0)
    probation: Probation | None = None  # watch the new model after the swap; revert on misbehaviour
    shadow: ModelRef | None = None  # candidate to run beside ``model`` on sampled inputs, never served
    shadow_sample_rate: float = Field(
        default=default_of(wire.Directive, "shadow_sample_rate"), ge=0.0, le=1.0
    )
    not_before: datetime | None = None  # do not start before (maintenance windows)
    capture: Capture | None = None  # keep sampled inferences for retraining (off when None)
    activation: Activation | None = None  # swap in only inside these windows (None: at once)
    metered: MeteredRule | None = None  # what a metered link may download (None: anything)


class Waiting(_Msg):
    """Why directive ``seq`` waits rather than fails (``wire.Waiting``)."""

    seq: int
    reason: str
    detail: str
    until: datetime | None = None


class RunningModel(_Msg):
    name: str
    version: str
    sha256: str


class Rejection(_Msg):
    seq: int
    reason: str
    detail: str | None = None


class Reported(_Msg):
    """Retained snapshot of a device; the server treats the latest as the truth."""

    device_id: str
    agent_version: str
    hardware_id: str
    running: RunningModel | None = None
    slots: dict[str, str | None] = Field(default_factory=dict)  # slot name -> model sha256
    active_slot: str | None = None
    deployment_seq: int = 0
    deployment_state: DeploymentState = DeploymentState.IDLE
    deployment_error: str | None = None
    served_ok: dict[str, int] = Field(default_factory=dict)  # model sha256 -> successful inferences
    served_errors: dict[str, int] = Field(default_factory=dict)  # model sha256 -> failed inferences
    shadow_sha256: str | None = None  # candidate currently shadowed, if any
    last_rejection: Rejection | None = None  # the last refused/failed directive, kept in the snapshot
    capabilities: dict[str, Any] = Field(default_factory=dict)
    # model sha256 -> the on-device acceptance check of that model: passed, samples, and each figure
    # (measured on this device, compiled on the host, the limit) -- see device_agent.acceptance
    acceptance: dict[str, Any] = Field(default_factory=dict)
    timezone: str = "UTC"  # IANA name: the device's maintenance windows are read in it
    link: dict[str, Any] = Field(default_factory=dict)  # class, budget_bytes_per_day, used_bytes_today
    waiting: Waiting | None = None  # the directive waits for a window, a deferral or its link
    ts: datetime = Field(default_factory=utcnow)


class Event(_Msg):
    """A deployment state transition with its reason (not retained)."""

    device_id: str
    seq: int  # directive seq it concerns (0 when none)
    state: DeploymentState
    reason: str | None = None  # error code, e.g. "digest_mismatch", "stale_sequence"
    detail: str | None = None
    model_sha256: str | None = None
    ts: datetime = Field(default_factory=utcnow)
    # Bytes of model data the install fetched (a delta and/or the full file, envelope included),
    # sent once, on the event that follows the download; None on every other event. Summing it
    # per rollout gives the bytes a rollout cost on the wire.
    bytes_fetched: int | None = Field(default=None, ge=0)
    # The agent's id for this event, unique per device (its start's random prefix and a count):
    # an event the agent sends again after a lost connection is stored once. None from agents that
    # predate it; those events are stored as they come.
    event_id: str | None = None

    @field_validator("event_id", mode="before")
    @classmethod
    def _usable_id(cls, value: object) -> str | None:
        """An id that cannot serve as a key (not text, empty, too long) is dropped, not the event:
        the event is worth more than its dedupe."""
        if isinstance(value, str) and 0 < len(value) <= EVENT_ID_MAX:
            return value
        return None


class ModelStats(_Msg):
    """Inference statistics for one model hash within one batch window."""

    inferences: int = 0
    errors: dict[str, int] = Field(default_factory=dict)  # kind -> count, e.g. "non_finite"
    latency_buckets: list[int] = Field(default_factory=list)  # counts per LATENCY_BOUNDS_US bucket
    latency_sum_us: float = 0.0
    class_hist: dict[str, int] = Field(default_factory=dict)  # top-1 class -> count
    # Drift sketches of the inputs (first input, flattened per sample): per-feature moments
    # over at most INPUT_STAT_FEATURES features, and a histogram of all values on fixed bins.
    input_count: int = 0
    input_mean: list[float] = Field(default_factory=list)
    input_m2: list[float] = Field(default_factory=list)  # sum of squared deviations (Welford), mergeable
    input_hist: list[int] = Field(default_factory=list)  # counts per VALUE_BOUNDS bucket
    output_hist: list[int] = Field(default_factory=list)  # first float output's values per VALUE_BOUNDS
    # Ground truth: labels matched on the device to this model's predictions in the window.
    labels: int = 0  # labelled predictions
    labels_correct: int = 0  # ... whose label is the predicted top-1 class (classifiers)
    # "true:predicted" -> count; at most MAX_LABEL_CLASSES classes, the rest as OTHER_CLASS
    confusion: dict[str, int] = Field(default_factory=dict)
    label_delay_buckets: list[int] = Field(default_factory=list)  # per LABEL_DELAY_BOUNDS_S bucket
    label_abs_error_sum: float = 0.0  # regressors: sum of |label - prediction| over ``labels``
    # Availability at the local API: requests for this model, and those that got no prediction.
    requests: int = 0
    request_errors: dict[str, int] = Field(default_factory=dict)  # kind -> count ("timeout", ...)
    # Feature availability: input name -> counts in INPUT_CHECKS order (checked, nan, missing,
    # outside the calibration range)
    input_checks: dict[str, list[int]] = Field(default_factory=dict)
    cpu_ms: float = 0.0  # agent process CPU time spent on this model's inferences
    captured: int = 0  # inferences kept for upload (Directive.capture)
    # Input distributions: input name -> counts of its values per INPUT_BUCKETS bucket (relative
    # to the input's calibration range; sampled like input_checks, at most a bounded number of
    # values per sampled request)
    input_buckets: dict[str, list[int]] = Field(default_factory=dict)
    # An app's outcome metrics joined on the device to this model's predictions (``POST
    # /v1/outcomes``): metric -> [count, sum, sum of squares] of the values in the window
    outcomes: dict[str, list[float]] = Field(default_factory=dict)


class ShadowStats(_Msg):
    """A shadowed candidate compared with the served model on the same sampled inputs."""

    samples: int = 0
    top1_agree: int = 0  # samples whose top-1 class matched the served model's
    errors: dict[str, int] = Field(default_factory=dict)
    latency_buckets: list[int] = Field(default_factory=list)
    latency_sum_us: float = 0.0


class TelemetryBatch(_Msg):
    device_id: str
    batch_id: str  # unique per device; the server dedupes on (device_id, batch_id)
    window_start: datetime
    window_end: datetime
    models: dict[str, ModelStats]  # model sha256 -> stats
    shadow: dict[str, ShadowStats] = Field(default_factory=dict)  # candidate sha256 -> comparison
    dropped_batches: int = 0  # batches this device discarded (offline queue full) since the last one sent
    labels_unmatched: dict[str, int] = Field(default_factory=dict)  # LABEL_UNMATCHED reason -> count
    capture_evicted: int = 0  # captured inferences dropped on the device to stay in its disk quota


class Status(_Msg):
    device_id: str
    state: Literal["online", "offline"]
    ts: datetime = Field(default_factory=utcnow)


_M = TypeVar("_M", bound=_Msg)


def encode(msg: BaseModel) -> bytes:
    return msg.model_dump_json().encode()


def encode_telemetry(batch: TelemetryBatch) -> bytes:
    return zlib.compress(batch.model_dump_json().encode(), 6)


def _decode(model: type[_M], payload: bytes, device_id: str | None) -> _M:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        msg = model.model_validate_json(payload)
    except (ValidationError, ValueError) as exc:
        raise ProtocolError(f"malformed {model.__name__}: {exc}") from exc
    if device_id is not None and getattr(msg, "device_id", device_id) != device_id:
        raise ProtocolError(
            f"{model.__name__} names device {getattr(msg, 'device_id', None)!r}, topic {device_id!r}"
        )
    return msg


def decode_reported(payload: bytes, device_id: str | None = None) -> Reported:
    return _decode(Reported, payload, device_id)


def decode_event(payload: bytes, device_id: str | None = None) -> Event:
    return _decode(Event, payload, device_id)


def decode_status(payload: bytes, device_id: str | None = None) -> Status:
    return _decode(Status, payload, device_id)


def decode_directive(payload: bytes) -> Directive:
    return _decode(Directive, payload, None)


def decode_telemetry(payload: bytes, device_id: str | None = None) -> TelemetryBatch:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("compressed telemetry too large")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(payload, MAX_PAYLOAD * 8)
        if d.unconsumed_tail:
            raise ProtocolError("telemetry decompresses past the size limit")
    except zlib.error as exc:
        raise ProtocolError(f"telemetry is not zlib data: {exc}") from exc
    return _decode(TelemetryBatch, raw, device_id)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode()


__all__ = [
    "CAPTURE_KEEP",
    "DELTA_DIR",
    "DEVICE_ID_RE",
    "DIRECTIVE_PAYLOAD_TYPE",
    "EVENT_ID_MAX",
    "INPUT_BUCKETS",
    "INPUT_CHECKS",
    "INPUT_STAT_FEATURES",
    "LABEL_DELAY_BOUNDS_S",
    "LABEL_DELAY_BUCKETS",
    "LABEL_UNMATCHED",
    "LATENCY_BOUNDS_US",
    "LATENCY_BUCKETS",
    "MAX_DELTA_FRACTION",
    "MAX_LABEL_CLASSES",
    "MAX_PAYLOAD",
    "OTHER_CLASS",
    "PREFIX",
    "VALUE_BOUNDS",
    "Activation",
    "Capture",
    "Channel",
    "DeploymentState",
    "Directive",
    "Event",
    "MeteredRule",
    "ModelRef",
    "ModelStats",
    "Probation",
    "ProtocolError",
    "ReasonCode",
    "Rejection",
    "Reported",
    "RunningModel",
    "ShadowStats",
    "Status",
    "TelemetryBatch",
    "Waiting",
    "Window",
    "decode_directive",
    "decode_event",
    "decode_reported",
    "decode_status",
    "decode_telemetry",
    "delta_path",
    "delta_window_log",
    "dumps",
    "encode",
    "encode_telemetry",
    "latency_bucket",
    "latency_quantile",
    "max_delta_bytes",
    "parse_topic",
    "shared_subscription",
    "topic",
    "utcnow",
    "wildcard",
]
