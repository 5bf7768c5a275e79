"""The device's side of the wire contract, in the standard library only (no pydantic).

(:mod:`signing.safejson`, which bounds untrusted JSON, is itself standard library only.)

:mod:`device_agent.protocol` is the one wire contract (topics + pydantic schemas)
that the fleet server and the simulator validate with. This module holds the part
of it that is not a schema (topics, channels, deployment states, histogram bounds:
``protocol`` re-exports them from here, so they exist once) and a light codec for
the messages a device handles:

- it DECODES only the signed ``Directive`` (with ``ModelRef`` and ``Probation``),
  validating every field the way the pydantic schema does (types, ranges, the
  sha256 pattern), raising :class:`ProtocolError` on anything malformed;
- it ENCODES ``Status``, ``Reported``, ``Event`` and ``TelemetryBatch`` as the same
  JSON the pydantic models produce (field names, order, ``Z`` datetimes, enum values).

Why: importing pydantic and declaring the protocol models costs the agent ~9 MB
RSS before it handled a single message (a large part of an idle agent's budget), and building their
validators on first use a few MB more. ``tests/agent/test_wire.py`` checks that
both sides agree: what this module encodes decodes with ``protocol``, and what
``protocol`` encodes (or refuses) this module decodes (or refuses) alike.
"""

from __future__ import annotations

import bisect
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from device_agent.schedule import MeteredRule, ScheduleError, Window, parse_windows
from signing import safejson

PREFIX = "ef/v1"
DIRECTIVE_PAYLOAD_TYPE = "application/vnd.edgefleet.directive+json"
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_PAYLOAD = 1 << 20  # no legitimate message is larger; refuse before parsing
EVENT_ID_MAX = 64  # an event id: its agent start's random prefix and a count
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Channel(StrEnum):
    DESIRED = "desired"
    REPORTED = "reported"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    STATUS = "status"


class ProtocolError(ValueError):
    """An inbound message is malformed. Count it, log it, drop it."""


def topic(device_id: str, channel: Channel | str) -> str:
    if not DEVICE_ID_RE.match(device_id):
        raise ValueError(f"invalid device id {device_id!r}")
    return f"{PREFIX}/{device_id}/{Channel(channel).value}"


def shared_subscription(channel: Channel | str, group: str = "fleet") -> str:
    """Topic filter for server replicas splitting one channel across the fleet."""
    return f"$share/{group}/{PREFIX}/+/{Channel(channel).value}"


def wildcard(channel: Channel | str) -> str:
    return f"{PREFIX}/+/{Channel(channel).value}"


def parse_topic(t: str) -> tuple[str, Channel]:
    """Split ``ef/v1/{device}/{channel}``; ProtocolError if it is not one of ours."""
    parts = t.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PREFIX or not DEVICE_ID_RE.match(parts[2]):
        raise ProtocolError(f"not an edgefleet topic: {t!r}")
    try:
        return parts[2], Channel(parts[3])
    except ValueError as exc:
        raise ProtocolError(f"unknown channel in {t!r}") from exc


def utcnow() -> datetime:
    return datetime.now(UTC)


class DeploymentState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    WARMING = "warming"
    SWAPPING = "swapping"
    STAGED = "staged"  # verified in the inactive slot; waits for its window (or an app's deferral)
    PROBATION = "probation"  # swapped in, being watched; success not yet reported
    SERVING = "serving"  # the directive's model answers requests (probation passed)
    SHADOWING = "shadowing"  # a candidate runs beside the served model on sampled inputs
    REVERTED = "reverted"  # probation failed; the agent went back to the previous slot by itself
    FAILED = "failed"
    REJECTED = "rejected"  # directive refused before any work (bad signature, old seq, ...)


class ReasonCode(StrEnum):
    """Every reason the agent gives on the wire: ``Event.reason``, ``Rejection.reason`` and
    ``Reported.deployment_error``.

    The fleet server matches on these strings (retry limits per failure class, the
    operator's view), so a value never changes once shipped. The trust checks in
    :mod:`signing.errors` cannot import this module (``signing`` sits below
    ``device_agent``) and keep their ``code`` strings; ``tests/agent`` checks that
    every one of them is listed here.
    """

    # The directive itself (refused before any work: ``rejected``).
    WRONG_DEVICE = "wrong_device"
    STALE_SEQUENCE = "stale_sequence"
    EXPIRED = "expired"  # also signing.errors.ExpiredMetadata
    MALFORMED_DIRECTIVE = "malformed_directive"  # signed, but not a Directive
    # Signatures and signed content (signing.errors).
    TRUST_ERROR = "trust_error"
    MALFORMED_ENVELOPE = "malformed_envelope"
    WRONG_PAYLOAD_TYPE = "wrong_payload_type"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    THRESHOLD_NOT_MET = "threshold_not_met"
    DIGEST_MISMATCH = "digest_mismatch"
    LENGTH_MISMATCH = "length_mismatch"
    MISSING_FILE = "missing_file"
    UNEXPECTED_FILE = "unexpected_file"
    ROOT_CHAIN_BROKEN = "root_chain_broken"
    # TUF delivery metadata (signing.errors).
    DELIVERY_ERROR = "delivery_error"
    METADATA_UNSIGNED = "metadata_unsigned"
    METADATA_ROLLBACK = "metadata_rollback"
    METADATA_MIX_AND_MATCH = "metadata_mix_and_match"
    METADATA_EXPIRED = "metadata_expired"
    METADATA_INVALID = "metadata_invalid"
    TARGET_NOT_FOUND = "target_not_found"
    TARGET_MISMATCH = "target_mismatch"
    ENDLESS_DATA = "endless_data"
    DELIVERY_UNAVAILABLE = "delivery_unavailable"
    MALFORMED_TARGET = "malformed_target"
    UNAVAILABLE = "unavailable"  # signing.errors.Unavailable: fetched nothing, judged nothing
    # Directive against release (Uptane's director/image agreement).
    DIRECTIVE_MISMATCH = "directive_mismatch"
    HARDWARE_MISMATCH = "hardware_mismatch"
    BELOW_REVOCATION_FLOOR = "below_revocation_floor"
    # Carrying out an accepted directive (``failed``).
    UNSUPPORTED_TARGET = "unsupported_target"
    NO_REPOSITORY = "no_repository"
    INSUFFICIENT_DISK = "insufficient_disk"
    DOWNLOAD_FAILED = "download_failed"
    DOWNLOAD_INCOMPLETE = "download_incomplete"
    LOAD_FAILED = "load_failed"
    # The device's own runtime misses the figures the bundle's golden set was compiled with.
    ACCEPTANCE_FAILED = "acceptance_failed"
    DISK_FULL = "disk_full"
    IO_ERROR = "io_error"
    INTERNAL_ERROR = "internal_error"
    # Probation of a swapped-in model (``reverted``).
    CRASH_LOOP = "crash_loop"
    ERROR_RATE = "error_rate"
    LATENCY_REGRESSION = "latency_regression"
    # Not a failure: the directive waits for its maintenance window.
    NOT_BEFORE = "not_before"
    # Not failures either: a staged model waits for its activation window (device_agent.schedule) or
    # for an app's deferral, and a download waits for an unmetered link or for tomorrow's budget.
    MAINTENANCE_WINDOW = "maintenance_window"
    DEFERRED = "deferred"
    METERED_LINK = "metered_link"
    LINK_BUDGET = "link_budget"


# Deltas (docs/decisions/0024-delta-updates.md): a zstd frame that rebuilds the model file with
# sha256 ``new`` from the one with sha256 ``base``, stored as a plain file under the repository's
# targets tree at ``delta_path(base, new)``, so any static mirror serves it with no metadata of
# its own. A device refuses one longer than ``MAX_DELTA_FRACTION`` of the full file's signed length
# (it would save too little to be worth the rebuild), and the server does not store such a one.
DELTA_DIR = "deltas"
MAX_DELTA_FRACTION = 0.6


def delta_path(base_sha256: str, new_sha256: str) -> str:
    """The delta's path relative to the repository's ``targets/`` directory."""
    for sha in (base_sha256, new_sha256):
        if not _SHA256_RE.match(sha):
            raise ValueError(f"not a sha256: {sha!r}")
    return f"{DELTA_DIR}/{base_sha256}/{new_sha256}.zst"


def max_delta_bytes(length: int) -> int:
    """The longest delta worth fetching for a full file of ``length`` bytes."""
    return int(length * MAX_DELTA_FRACTION)


def delta_window_log(length: int) -> int:
    """The zstd window (log2 bytes) a delta rebuilding a file of ``length`` bytes is made with, and the
    largest a device accepts for it: the window must cover the whole new file for the old one (the
    dictionary) to stay in reach until its last byte; zstd takes 2**10 to 2**31 (64-bit builds)."""
    return min(31, max(10, (max(length, 1) - 1).bit_length()))


# Fixed log-spaced latency bucket upper bounds in microseconds (last bucket: +inf).
LATENCY_BOUNDS_US: tuple[float, ...] = tuple(round(10 * 2 ** (i / 2), 1) for i in range(40))
LATENCY_BUCKETS = len(LATENCY_BOUNDS_US) + 1  # one count per bound, then one above the largest


def latency_bucket(latency_us: float) -> int:
    """The index of the bucket counting ``latency_us`` (a value on a bound goes in that bound's bucket)."""
    return bisect.bisect_left(LATENCY_BOUNDS_US, latency_us)


def latency_quantile(buckets: Sequence[int], q: float) -> float | None:
    """Upper bound (us) of the bucket holding quantile ``q`` of a latency histogram; None when empty.

    The histogram only knows buckets, so this is the bound a device or the server
    can both compute from the same counts; the overflow bucket counts as twice the
    largest bound.
    """
    n = sum(buckets)
    if n == 0:
        return None
    rank, seen = q * n, 0
    for i, c in enumerate(buckets):
        seen += c
        if c and seen >= rank:
            return LATENCY_BOUNDS_US[i] if i < len(LATENCY_BOUNDS_US) else LATENCY_BOUNDS_US[-1] * 2
    return LATENCY_BOUNDS_US[-1] * 2


# Fixed value bins for input/output histograms (symmetric, log-spaced; last bucket: +inf).
VALUE_BOUNDS: tuple[float, ...] = tuple(
    sorted({-(10.0 ** (e / 4)) for e in range(-16, 17)} | {0.0} | {10.0 ** (e / 4) for e in range(-16, 17)})
)
INPUT_STAT_FEATURES = 256

# Ground truth. A label's delay (label time minus inference time) is counted per bucket: 1 s up to
# ~24 days, doubling every two buckets, then one above the largest.
LABEL_DELAY_BOUNDS_S: tuple[float, ...] = tuple(round(2 ** (i / 2), 1) for i in range(43))
LABEL_DELAY_BUCKETS = len(LABEL_DELAY_BOUNDS_S) + 1
MAX_LABEL_CLASSES = 64  # confusion counts keep this many classes; the rest count as OTHER_CLASS
OTHER_CLASS = "other"
LABEL_UNMATCHED = ("unknown", "expired", "duplicate", "invalid")  # why a label matched no prediction
# What each input check counts, in ``ModelStats.input_checks[name]`` order.
INPUT_CHECKS = ("checked", "nan", "missing", "out_of_range")
# Buckets of an input's values relative to its calibration range [min, max], in
# ``ModelStats.input_buckets[name]`` order: below min, ten equal bins, above max. Numbered so the
# names sort in this order (a dashboard sorts its bars by name).
INPUT_BUCKETS = ("00 <min", *(f"{i + 1:02d} {10 * i}-{10 * i + 10}%" for i in range(10)), "11 >max")
CAPTURE_KEEP = ("inputs", "outputs", "both")


# -- decoding (the directive) ---------------------------------------------------------


class _Fields:
    """Typed reads from one JSON object; every miss is a ProtocolError naming the field."""

    def __init__(self, what: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ProtocolError(f"malformed {what}: expected an object, got {type(data).__name__}")
        self.what, self.data = what, data

    def _fail(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"malformed {self.what}: {key}: {why}")

    def _get(self, key: str, default: Any, required: bool) -> Any:
        if key not in self.data:
            if required:
                raise self._fail(key, "field required")
            return default
        return self.data[key]

    def text(self, key: str, *, default: str | None = None, required: bool = True) -> Any:
        v = self._get(key, default, required)
        if v is None and not required:
            return None
        if not isinstance(v, str):
            raise self._fail(key, "expected a string")
        return v

    def integer(self, key: str, *, default: int = 0, required: bool = True, ge: int | None = None) -> int:
        v = self._get(key, default, required)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(key, "expected an integer")
        if ge is not None and v < ge:
            raise self._fail(key, f"must be >= {ge}")
        return v

    def number(
        self,
        key: str,
        *,
        default: float = 0.0,
        ge: float | None = None,
        gt: float | None = None,
        le: float | None = None,
    ) -> float:
        v = self._get(key, default, False)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self._fail(key, "expected a number")
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise self._fail(key, "must be finite")
        if (ge is not None and v < ge) or (gt is not None and v <= gt) or (le is not None and v > le):
            raise self._fail(key, "out of range")
        return v

    def when(self, key: str, *, required: bool = True) -> Any:
        v = self._get(key, None, required)
        if v is None and not required:
            return None
        if not isinstance(v, str):
            raise self._fail(key, "expected an ISO 8601 datetime string")
        try:
            dt = datetime.fromisoformat(v)
        except ValueError as exc:
            raise self._fail(key, f"not an ISO 8601 datetime ({exc})") from exc
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)  # naive: the fleet speaks UTC

    def obj(self, key: str) -> dict[str, Any] | None:
        v = self._get(key, None, False)
        if v is not None and not isinstance(v, dict):
            raise self._fail(key, "expected an object or null")
        return v


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What a directive asks a device to run; the hash/length must agree with the signed bundle."""

    name: str
    version: str
    release: int
    target: str
    sha256: str
    length: int
    model_url: str
    envelope_url: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def from_dict(cls, data: Any, what: str = "ModelRef") -> ModelRef:
        f = _Fields(what, data)
        sha = f.text("sha256")
        if not _SHA256_RE.match(sha):
            raise ProtocolError(f"malformed {what}: sha256: not 64 lowercase hex digits")
        length = f.integer("length")
        if length <= 0:
            raise ProtocolError(f"malformed {what}: length: must be > 0")
        return cls(
            name=f.text("name"),
            version=f.text("version"),
            release=f.integer("release"),
            target=f.text("target"),
            sha256=sha,
            length=length,
            model_url=f.text("model_url"),
            envelope_url=f.text("envelope_url"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "target": self.target,
            "sha256": self.sha256,
            "length": self.length,
            "model_url": self.model_url,
            "envelope_url": self.envelope_url,
        }


def default_of(cls: type, name: str) -> Any:
    """The default a message dataclass declares for ``name``: the one place each wire default lives
    (the decoder here and the pydantic schemas in :mod:`device_agent.protocol` read it)."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name!r}")


@dataclass(frozen=True, slots=True)
class Probation:
    """How the agent judges a freshly swapped-in model before it reports success."""

    seconds: float = 0.0
    min_inferences: int = 1
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0

    @classmethod
    def from_dict(cls, data: Any) -> Probation:
        f = _Fields("Probation", data)
        return cls(
            seconds=f.number("seconds", default=default_of(cls, "seconds"), ge=0.0),
            min_inferences=f.integer(
                "min_inferences", default=default_of(cls, "min_inferences"), required=False, ge=0
            ),
            max_error_rate=f.number(
                "max_error_rate", default=default_of(cls, "max_error_rate"), ge=0.0, le=1.0
            ),
            max_latency_ratio=f.number(
                "max_latency_ratio", default=default_of(cls, "max_latency_ratio"), gt=0.0
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "min_inferences": self.min_inferences,
            "max_error_rate": self.max_error_rate,
            "max_latency_ratio": self.max_latency_ratio,
        }


@dataclass(frozen=True, slots=True)
class Capture:
    """What a device keeps of its inferences for retraining, and where it sends it (off unless given).

    ``sample_rate`` of inferences are stored on the device with their inference id, up to
    ``quota_bytes`` on disk (the oldest go first, counted), and uploaded in batches to
    ``upload_url`` with the device's own credentials.
    """

    upload_url: str
    sample_rate: float = 0.01
    keep: str = "both"  # one of CAPTURE_KEEP
    quota_bytes: int = 64 << 20

    @classmethod
    def from_dict(cls, data: Any) -> Capture:
        f = _Fields("Capture", data)
        keep = f.text("keep", default=default_of(cls, "keep"), required=False)
        if keep not in CAPTURE_KEEP:
            raise ProtocolError(f"malformed Capture: keep must be one of {', '.join(CAPTURE_KEEP)}")
        return cls(
            upload_url=f.text("upload_url"),
            sample_rate=f.number("sample_rate", default=default_of(cls, "sample_rate"), ge=0.0, le=1.0),
            keep=keep,
            quota_bytes=f.integer(
                "quota_bytes", default=default_of(cls, "quota_bytes"), required=False, ge=1
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "upload_url": self.upload_url,
            "sample_rate": self.sample_rate,
            "keep": self.keep,
            "quota_bytes": self.quota_bytes,
        }


@dataclass(frozen=True, slots=True)
class Activation:
    """When a downloaded model may be swapped in: inside one of ``windows`` (weekly, the device's
    local time; none: any time), held at most ``max_deferral_seconds`` by an app's deferral."""

    windows: tuple[Window, ...] = ()
    max_deferral_seconds: float = 3600.0

    @classmethod
    def from_dict(cls, data: Any) -> Activation:
        f = _Fields("Activation", data)
        try:
            windows = parse_windows(f.data.get("windows", []), "windows")
        except ScheduleError as exc:
            raise ProtocolError(f"malformed Activation: {exc}") from exc
        return cls(
            windows=windows,
            max_deferral_seconds=f.number(
                "max_deferral_seconds", default=default_of(cls, "max_deferral_seconds"), ge=0.0
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "windows": [w.to_dict() for w in self.windows],
            "max_deferral_seconds": self.max_deferral_seconds,
        }


def _metered(data: dict[str, Any] | None) -> MeteredRule | None:
    if data is None:
        return None
    try:
        return MeteredRule.from_dict(data)
    except ScheduleError as exc:
        raise ProtocolError(f"malformed Directive: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Directive:
    """The desired state of one device. Signed by the fleet key; higher ``seq`` wins."""

    device_id: str
    seq: int
    issued_at: datetime
    expires_at: datetime
    model: ModelRef | None  # None: run nothing new (keep current)
    rollout_id: str | None = None
    probation_inferences: int = 1
    probation: Probation | None = None
    shadow: ModelRef | None = None
    shadow_sample_rate: float = 0.1
    not_before: datetime | None = None
    capture: Capture | None = None  # keep sampled inferences for retraining (off when None)
    activation: Activation | None = None  # swap in only inside these windows (None: at once)
    metered: MeteredRule | None = None  # what a metered link may download (None: anything)

    @classmethod
    def from_dict(cls, data: Any) -> Directive:
        f = _Fields("Directive", data)
        if "model" not in f.data:
            raise ProtocolError("malformed Directive: model: field required")
        model, shadow, probation = f.obj("model"), f.obj("shadow"), f.obj("probation")
        capture, activation = f.obj("capture"), f.obj("activation")
        return cls(
            device_id=f.text("device_id"),
            seq=f.integer("seq", ge=1),
            issued_at=f.when("issued_at"),
            expires_at=f.when("expires_at"),
            model=ModelRef.from_dict(model, "Directive.model") if model is not None else None,
            rollout_id=f.text("rollout_id", required=False),
            probation_inferences=f.integer(
                "probation_inferences", default=default_of(cls, "probation_inferences"), required=False, ge=0
            ),
            probation=Probation.from_dict(probation) if probation is not None else None,
            shadow=ModelRef.from_dict(shadow, "Directive.shadow") if shadow is not None else None,
            shadow_sample_rate=f.number(
                "shadow_sample_rate", default=default_of(cls, "shadow_sample_rate"), ge=0.0, le=1.0
            ),
            not_before=f.when("not_before", required=False),
            capture=Capture.from_dict(capture) if capture is not None else None,
            activation=Activation.from_dict(activation) if activation is not None else None,
            metered=_metered(f.obj("metered")),
        )


def decode_directive(payload: bytes) -> Directive:
    """The signed directive's payload; ProtocolError on anything malformed, however deep or large."""
    try:
        data = safejson.loads(payload, max_bytes=MAX_PAYLOAD)
    except safejson.JsonError as exc:
        raise ProtocolError(f"malformed Directive: {exc}") from exc
    return Directive.from_dict(data)


# -- encoding (what the device sends) --------------------------------------------------


def _ts(dt: datetime) -> str:
    """pydantic's JSON form of an aware UTC datetime: ISO 8601 with ``Z``."""
    s = dt.isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


@dataclass(frozen=True, slots=True)
class Status:
    device_id: str
    state: str  # "online" | "offline"
    ts: datetime = field(default_factory=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "state": self.state, "ts": _ts(self.ts)}


@dataclass(frozen=True, slots=True)
class RunningModel:
    name: str
    version: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Rejection:
    seq: int
    reason: str
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Reported:
    """Retained snapshot of a device; the server treats the latest as the truth."""

    device_id: str
    agent_version: str
    hardware_id: str
    running: RunningModel | None = None
    slots: dict[str, str | None] = field(default_factory=dict)
    active_slot: str | None = None
    deployment_seq: int = 0
    deployment_state: DeploymentState = DeploymentState.IDLE
    deployment_error: str | None = None
    served_ok: dict[str, int] = field(default_factory=dict)
    served_errors: dict[str, int] = field(default_factory=dict)
    shadow_sha256: str | None = None
    last_rejection: Rejection | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    # model sha256 -> the on-device acceptance check's verdict and figures (device_agent.acceptance)
    acceptance: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"  # IANA name: the device's maintenance windows are read in it
    link: dict[str, Any] = field(default_factory=dict)  # class, budget_bytes_per_day, used_bytes_today
    waiting: Waiting | None = None  # the directive waits for a window, a deferral or its link
    ts: datetime = field(default_factory=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "agent_version": self.agent_version,
            "hardware_id": self.hardware_id,
            "running": self.running.to_dict() if self.running else None,
            "slots": dict(self.slots),
            "active_slot": self.active_slot,
            "deployment_seq": self.deployment_seq,
            "deployment_state": DeploymentState(self.deployment_state).value,
            "deployment_error": self.deployment_error,
            "served_ok": dict(self.served_ok),
            "served_errors": dict(self.served_errors),
            "shadow_sha256": self.shadow_sha256,
            "last_rejection": self.last_rejection.to_dict() if self.last_rejection else None,
            "capabilities": self.capabilities,
            "acceptance": self.acceptance,
            "timezone": self.timezone,
            "link": self.link,
            "waiting": self.waiting.to_dict() if self.waiting else None,
            "ts": _ts(self.ts),
        }


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why directive ``seq`` waits, not failing (a ReasonCode: maintenance_window, deferred,
    metered_link, link_budget), and when the device looks again (None: when its link changes)."""

    seq: int
    reason: str
    detail: str
    until: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "reason": self.reason,
            "detail": self.detail,
            "until": _ts(self.until) if self.until else None,
        }


@dataclass(frozen=True, slots=True)
class Event:
    """A deployment state transition with its reason (not retained)."""

    device_id: str
    seq: int
    state: DeploymentState
    reason: str | None = None
    detail: str | None = None
    model_sha256: str | None = None
    ts: datetime = field(default_factory=utcnow)
    bytes_fetched: int | None = None  # model bytes this install fetched (delta + full file), once
    event_id: str | None = None  # unique per device: a resent event is stored once

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "seq": self.seq,
            "state": DeploymentState(self.state).value,
            "reason": self.reason,
            "detail": self.detail,
            "model_sha256": self.model_sha256,
            "ts": _ts(self.ts),
            "bytes_fetched": self.bytes_fetched,
            "event_id": self.event_id,
        }


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Inference statistics for one model hash within one batch window (see ``protocol.ModelStats``)."""

    inferences: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_buckets: list[int] = field(default_factory=list)
    latency_sum_us: float = 0.0
    class_hist: dict[str, int] = field(default_factory=dict)
    input_count: int = 0
    input_mean: list[float] = field(default_factory=list)
    input_m2: list[float] = field(default_factory=list)
    input_hist: list[int] = field(default_factory=list)
    output_hist: list[int] = field(default_factory=list)
    labels: int = 0
    labels_correct: int = 0
    confusion: dict[str, int] = field(default_factory=dict)
    label_delay_buckets: list[int] = field(default_factory=list)
    label_abs_error_sum: float = 0.0
    requests: int = 0
    request_errors: dict[str, int] = field(default_factory=dict)
    input_checks: dict[str, list[int]] = field(default_factory=dict)
    cpu_ms: float = 0.0
    captured: int = 0
    input_buckets: dict[str, list[int]] = field(default_factory=dict)
    outcomes: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inferences": self.inferences,
            "errors": self.errors,
            "latency_buckets": self.latency_buckets,
            "latency_sum_us": float(self.latency_sum_us),
            "class_hist": self.class_hist,
            "input_count": self.input_count,
            "input_mean": self.input_mean,
            "input_m2": self.input_m2,
            "input_hist": self.input_hist,
            "output_hist": self.output_hist,
            "labels": self.labels,
            "labels_correct": self.labels_correct,
            "confusion": self.confusion,
            "label_delay_buckets": self.label_delay_buckets,
            "label_abs_error_sum": float(self.label_abs_error_sum),
            "requests": self.requests,
            "request_errors": self.request_errors,
            "input_checks": self.input_checks,
            "cpu_ms": float(self.cpu_ms),
            "captured": self.captured,
            "input_buckets": self.input_buckets,
            "outcomes": {k: [float(x) for x in v] for k, v in self.outcomes.items()},
        }


@dataclass(frozen=True, slots=True)
class ShadowStats:
    """A shadowed candidate compared with the served model on the same sampled inputs."""

    samples: int = 0
    top1_agree: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_buckets: list[int] = field(default_factory=list)
    latency_sum_us: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "top1_agree": self.top1_agree,
            "errors": self.errors,
            "latency_buckets": self.latency_buckets,
            "latency_sum_us": float(self.latency_sum_us),
        }


@dataclass(frozen=True, slots=True)
class TelemetryBatch:
    device_id: str
    batch_id: str
    window_start: datetime
    window_end: datetime
    models: dict[str, ModelStats]
    shadow: dict[str, ShadowStats] = field(default_factory=dict)
    dropped_batches: int = 0
    labels_unmatched: dict[str, int] = field(default_factory=dict)
    capture_evicted: int = 0

    def with_dropped(self, dropped: int) -> TelemetryBatch:
        return replace(self, dropped_batches=dropped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "batch_id": self.batch_id,
            "window_start": _ts(self.window_start),
            "window_end": _ts(self.window_end),
            "models": {k: v.to_dict() for k, v in self.models.items()},
            "shadow": {k: v.to_dict() for k, v in self.shadow.items()},
            "dropped_batches": self.dropped_batches,
            "labels_unmatched": self.labels_unmatched,
            "capture_evicted": self.capture_evicted,
        }


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def encode(msg: Status | Reported | Event | TelemetryBatch) -> bytes:
    return _json(msg.to_dict())


def encode_telemetry(batch: TelemetryBatch) -> bytes:
    return zlib.compress(_json(batch.to_dict()), 6)


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
    "decode_directive",
    "delta_path",
    "delta_window_log",
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
