"""Every table of the fleet server, in one place so Alembic can generate migrations from it.

Datetimes are stored timezone-aware in UTC (``UTCDateTime`` re-attaches UTC on
SQLite, which drops the offset). JSON columns are replaced, never mutated in
place, because SQLAlchemy does not track in-place changes to plain JSON.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel
from sqlmodel.sql.sqltypes import AutoString

from device_agent.wire import EVENT_ID_MAX
from fleet_server.lifecycle import DeviceRolloutState, RolloutState


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite returns naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StateText(TypeDecorator[StrEnum]):
    """A lifecycle state stored as its plain string value and read back as its enum member.

    The column stays a VARCHAR (no database enum type, so adding a state needs no migration);
    a value the enum does not know is refused on write and reported on read.
    """

    impl = AutoString
    cache_ok = True

    def __init__(self, states: type[StrEnum]) -> None:
        super().__init__()
        self.states = states
        self._members = {m.value: m for m in states}

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if value not in self._members:
            raise ValueError(f"{value!r} is not a {self.states.__name__}")
        return str(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> StrEnum | None:
        if value is None:
            return None
        try:
            return self._members[value]
        except KeyError:
            raise ValueError(f"stored {self.states.__name__} {value!r} is unknown to this server") from None


class Device(SQLModel, table=True):
    """A registered device and the latest state it reported."""

    id: str = Field(primary_key=True, max_length=128)
    hardware_id: str = Field(index=True)
    tags: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    registered_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    online: bool = False
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    reported: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    running_sha256: str | None = None
    running_name: str | None = None
    running_version: str | None = None
    deployment_state: str | None = None
    deployment_seq: int = 0
    desired_seq: int = 0  # seq of the last directive the server published to this device
    agent_version: str | None = None
    # The device's clock minus the server's receive time, measured on its last live (not retained)
    # reported or online status message; informational only: decisions use server time alone.
    clock_offset_seconds: float | None = None
    clock_offset_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # server time measured
    # The broker shard it is on (fleet_server.shards), set at registration and never changed after:
    # its agent.toml names that broker. None: registered before the fleet had shards (the first one).
    broker_shard: str | None = Field(default=None, max_length=64)


class Model(SQLModel, table=True):
    """A verified bundle; ``sha256``/``length`` are those of the model file (manifest.files[0])."""

    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: str
    release: int
    target: str
    hardware_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    sha256: str = Field(index=True, max_length=64)
    length: int
    manifest: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    storage_path: str  # directory holding the model file(s) and bundle.dsse.json
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Rollout(SQLModel, table=True):
    """A staged rollout of one model to the devices its selector matched at creation."""

    # the list's order and keyset (ids are random, so the creation time leads)
    __table_args__ = (Index("ix_rollout_created_at_id", "created_at", "id"),)

    id: str = Field(primary_key=True, max_length=32)
    model_id: int = Field(foreign_key="model.id")
    model_ref: str  # name:version, for display
    model_sha256: str = Field(max_length=64)
    selector: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    stages: list[float] = Field(default_factory=list, sa_type=JSON)  # cumulative percents
    # The policy (fleet_server.policy): these five in columns of their own, the rest as JSON.
    soak_seconds: float
    device_timeout_seconds: float
    max_error_rate: float
    min_inferences: int
    max_failure_rate: float
    state: RolloutState = Field(default=RolloutState.RUNNING, sa_type=StateText(RolloutState), index=True)
    current_stage: int = 0
    stage_ready_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # soak started
    stage_unit: str = "percent"  # "percent" (cumulative % of targeted) or "count" (cumulative devices)
    policy: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # policy.Policy, see above
    approved_through: int = -1  # highest stage a human approved (manual gate / gate pause override)
    rollback_requested: bool = False  # operator asked to roll back; the leader's ticker carries it out
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RolloutDecision(SQLModel, table=True):
    """One engine or operator decision with the figures that caused it (audit trail)."""

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(foreign_key="rollout.id", index=True)
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    action: str
    reason: str
    figures: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class RolloutDevice(SQLModel, table=True):
    """One targeted device of a rollout: its stage, state and the model to roll back to."""

    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_rollout_device"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(foreign_key="rollout.id", index=True)
    device_id: str = Field(foreign_key="device.id", index=True)
    order_key: str  # sha256(rollout_id + device_id): deterministic assignment order
    stage: int | None = None  # index of the stage that assigned it
    state: DeviceRolloutState = Field(
        default=DeviceRolloutState.PENDING, sa_type=StateText(DeviceRolloutState)
    )
    seq: int | None = None  # seq of the directive sent with the rollout model
    notified_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    previous_sha256: str | None = None
    previous_model_id: int | None = None
    # Directives sent with the rollout model (1 + retries); counted anew from 0 when a resume sends
    # the release again to a device that could not fetch it (engine.redelivery).
    attempts: int = 0
    retry_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    reason: str | None = None
    # When its timeout clock (re)started, if not at ``notified_at``: when it began or stopped waiting
    # for its maintenance window, a deferral or its metered link (engine.py).
    timeout_from: datetime | None = Field(default=None, sa_type=UTCDateTime)


class EventRow(SQLModel, table=True):
    """A deployment event a device sent (state transitions with reasons)."""

    # The ticker finds each rollout device's events by (device_id, seq); one index per column
    # let SQLite search by seq, which a whole rollout shares (quadratic in the fleet). An agent
    # resends the events the broker did not take; the unique key stores each one once (events
    # without an id, from older agents, are all kept: NULLs never collide).
    __table_args__ = (
        Index("ix_eventrow_device_seq", "device_id", "seq"),
        UniqueConstraint("device_id", "event_id", name="uq_eventrow_device_event"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str
    seq: int
    state: str
    reason: str | None = None
    detail: str | None = None
    model_sha256: str | None = None
    ts: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    bytes_fetched: int | None = None  # what the install fetched (on the event that ended it)
    event_id: str | None = Field(default=None, max_length=EVENT_ID_MAX)  # the agent's id for it


class TelemetryBatchRow(SQLModel, table=True):
    """A received telemetry batch; the unique key makes redelivered batches count once."""

    __table_args__ = (UniqueConstraint("device_id", "batch_id", name="uq_telemetry_batch"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str  # looked up through uq_telemetry_batch (device_id first): no index of its own
    batch_id: str = Field(max_length=128)
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime)
    inferences: int = 0
    errors: int = 0
    models: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ModelAggregate(SQLModel, table=True):
    """Per (device, model hash) totals the gates read: served_ok from Reported, the rest from telemetry."""

    device_id: str = Field(primary_key=True, max_length=128)
    sha256: str = Field(primary_key=True, max_length=64)
    served_ok: int = 0  # latest cumulative count the device reported
    inferences: int = 0  # summed over telemetry batches
    errors: int = 0
    latency_buckets: list[int] = Field(default_factory=list, sa_type=JSON)  # per LATENCY_BOUNDS_US
    output_hist: list[int] = Field(default_factory=list, sa_type=JSON)  # per VALUE_BOUNDS
    class_hist: dict[str, int] = Field(default_factory=dict, sa_type=JSON)
    shadow_samples: int = 0  # as a shadowed candidate: samples compared with the served model
    shadow_agree: int = 0  # ... whose top-1 matched
    # Ground truth matched on the device (protocol.ModelStats): labelled predictions, correct ones,
    # "true:predicted" -> count, label delays per LABEL_DELAY_BOUNDS_S, |label - prediction| summed
    labels: int = 0
    labels_correct: int = 0
    confusion: dict[str, int] = Field(default_factory=dict, sa_type=JSON)
    label_delay_buckets: list[int] = Field(default_factory=list, sa_type=JSON)
    label_abs_error_sum: float = 0.0
    # Availability at the device's local API and feature availability per input (INPUT_CHECKS order)
    requests: int = 0
    request_errors: dict[str, int] = Field(default_factory=dict, sa_type=JSON)
    input_checks: dict[str, list[int]] = Field(default_factory=dict, sa_type=JSON)
    cpu_ms: float = 0.0  # agent process CPU time spent on this model's inferences
    captured: int = 0  # inferences the device kept for upload
    # input name -> its sampled values per INPUT_BUCKETS bucket of its calibration range
    input_buckets: dict[str, list[int]] = Field(default_factory=dict, sa_type=JSON)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class TelemetryMinute(SQLModel, table=True):
    """What the telemetry batches received in one minute said about one model hash on one hardware
    cohort, summed at ingest: the observability charts read a few rows per minute instead of every
    batch (thousands an hour at fleet scale). ``minute``: epoch seconds of the minute's start, by the
    server's receive time."""

    sha256: str = Field(primary_key=True, max_length=64)
    hardware_id: str = Field(primary_key=True, max_length=128)
    minute: int = Field(primary_key=True, sa_type=BigInteger)
    inferences: int = Field(default=0, sa_type=BigInteger)
    errors: int = Field(default=0, sa_type=BigInteger)
    labels: int = Field(default=0, sa_type=BigInteger)
    labels_correct: int = Field(default=0, sa_type=BigInteger)
    latency_buckets: list[int] = Field(default_factory=list, sa_type=JSON)  # per LATENCY_BOUNDS_US
    output_hist: list[int] = Field(default_factory=list, sa_type=JSON)  # per VALUE_BOUNDS


class DeviceTotals(SQLModel, table=True):
    """Per device totals of what a telemetry batch counts for the device as a whole, not per model:
    labels that matched no prediction (per ``LABEL_UNMATCHED`` reason), captured inferences evicted
    to keep the disk quota, batches discarded while offline. Summed once per stored batch, like
    ``ModelAggregate``."""

    device_id: str = Field(primary_key=True, max_length=128)
    labels_unmatched: dict[str, int] = Field(default_factory=dict, sa_type=JSON)
    capture_evicted: int = 0
    dropped_batches: int = 0
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Label(SQLModel, table=True):
    """Ground truth for one inference from one source (a person, an app, a labelling service).

    The key is (inference_id, source): a source repeating itself changes nothing (the first
    label stands), while two sources may disagree and both are kept. Nothing about the
    prediction is copied here: a label may arrive before or after the inference's capture,
    so the join with ``CaptureItem`` is made when the labels are read.
    """

    inference_id: str = Field(primary_key=True, max_length=36)  # the device's UUIDv7
    source: str = Field(primary_key=True, max_length=64)
    label: Any = Field(sa_type=JSON)  # class index or name, a value, or a list (one per row)
    label_time: datetime = Field(sa_type=UTCDateTime)  # when the truth became known
    received_at: datetime = Field(sa_type=UTCDateTime)


class CaptureBatch(SQLModel, table=True):
    """A batch of captured inferences a device uploaded, stored as its body in the capture directory.

    The key is the device's (device_id, batch_id): a resend of the same body is recognised by
    ``body_sha256`` (200, nothing stored twice), another body under the same id is refused. The
    model, hardware cohort and rollout stage are those at upload time.
    """

    device_id: str = Field(primary_key=True, max_length=128)
    batch_id: str = Field(primary_key=True, max_length=64)
    body_sha256: str = Field(max_length=64)
    model_sha256: str = Field(max_length=64, index=True)
    hardware_id: str = Field(max_length=128)
    rollout_id: str | None = Field(default=None, max_length=32)
    stage: int | None = None
    items: int = 0
    path: str = Field(max_length=512)  # the body's file, relative to the capture directory
    first_ts: datetime | None = Field(default=None, sa_type=UTCDateTime)  # oldest inference in it
    last_ts: datetime | None = Field(default=None, sa_type=UTCDateTime)
    received_at: datetime = Field(sa_type=UTCDateTime)


class CaptureItem(SQLModel, table=True):
    """One captured inference: where its arrays are (batch and position) and what it is attributed to.

    Labels join on ``inference_id``; exports read by model and inference time
    (``ix_captureitem_model_ts``). ``predicted`` is the top-1 class of the first output row when
    outputs were captured, so a label can be scored without reading the batch file.
    """

    __table_args__ = (Index("ix_captureitem_model_ts", "model_sha256", "ts"),)

    inference_id: str = Field(primary_key=True, max_length=36)
    device_id: str = Field(max_length=128)
    batch_id: str = Field(max_length=64)
    position: int  # index in the batch's items
    model_sha256: str = Field(max_length=64)
    hardware_id: str = Field(max_length=128)
    rollout_id: str | None = Field(default=None, max_length=32)
    stage: int | None = None
    ts: datetime = Field(sa_type=UTCDateTime)  # the inference's time (its UUIDv7's)
    predicted: str | None = Field(default=None, max_length=64)


class ServerLabelCount(SQLModel, table=True):
    """Labels posted to the server that met a captured prediction, per model hash and hardware
    cohort, and how many of them the prediction got right: the accuracy SLI adds these to the
    labels devices matched themselves (``ModelAggregate.labels``).

    Counted when a label and its capture meet, whichever arrives second (``fleet_server.
    server_label_counts``), so the SLO pass reads one small row per cohort instead of joining
    every label with its capture each minute.
    """

    model_sha256: str = Field(primary_key=True, max_length=64)
    hardware_id: str = Field(primary_key=True, max_length=128)
    labels: int = 0
    labels_correct: int = 0
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    """An admin API credential. Only the SHA-256 of the token is stored (tokens are 256-bit random,
    so a fast hash is enough: there is nothing to brute-force, unlike a password)."""

    __table_args__ = (Index("ix_apitoken_created_at_id", "created_at", "id"),)  # the list's order and keyset

    id: str = Field(primary_key=True, max_length=32)  # public handle, shown in lists and the audit log
    name: str = Field(max_length=128)
    role: str = Field(max_length=16)  # admin | operator | viewer
    token_hash: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(default="", max_length=160)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditEntry(SQLModel, table=True):
    """One mutating admin call: who, what, when, result. Append-only: nothing updates or deletes rows."""

    id: int | None = Field(default=None, primary_key=True)
    ts: datetime = Field(sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=160)  # token id + name, "bootstrap-admin" or "anonymous"
    role: str = Field(default="", max_length=16)
    method: str = Field(max_length=8)
    path: str = Field(max_length=512)
    status: int
    result: str = Field(default="", max_length=64)  # "ok" or the error code
    detail: str = Field(default="", max_length=512)


class Slo(SQLModel, table=True):
    """A service level objective of one model, optionally one hardware cohort (fleet_server.slo.spec)."""

    __table_args__ = (Index("ix_slo_created_at_name", "created_at", "name"),)  # the list's order and keyset

    name: str = Field(primary_key=True, max_length=64)
    model: str = Field(index=True, max_length=128)
    hardware_id: str | None = Field(default=None, max_length=128)
    spec: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # spec_as_dict: objectives, rules
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str = Field(default="", max_length=160)


class SloSample(SQLModel, table=True):
    """The running totals of an SLO's model and cohort at one time (fleet_server.slo.series.Sample);
    thinned with age, so a window's events are the difference of two rows."""

    __table_args__ = (UniqueConstraint("slo", "t", name="uq_slo_sample"),)

    id: int | None = Field(default=None, primary_key=True)
    slo: str = Field(foreign_key="slo.name", max_length=64)  # looked up through uq_slo_sample
    t: datetime = Field(sa_type=UTCDateTime)
    totals: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    drift_bad: int = 0
    drift_steps: int = 0


class SloAlert(SQLModel, table=True):
    """One alert per (model, cohort, severity) and where it is in its lifecycle (fleet_server.slo.alerts)."""

    id: str = Field(primary_key=True, max_length=300)  # model/cohort-or-*/severity
    model: str = Field(max_length=128)
    hardware_id: str = Field(default="", max_length=128)
    severity: str = Field(max_length=16)
    state: str = Field(max_length=16, index=True)
    since: datetime = Field(sa_type=UTCDateTime)
    fired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    causes: list[str] = Field(default_factory=list, sa_type=JSON)
    silenced: bool = False
    notified: bool = False
    clear_since: datetime | None = Field(default=None, sa_type=UTCDateTime)  # firing, no breach since
    quiet_s: float = 0.0  # how long it must stay clear to resolve
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PlannedWindow(SQLModel, table=True):
    """A declared planned-rollout window: alerts of the model (one cohort, or all) are not notified in it."""

    id: int | None = Field(default=None, primary_key=True)
    model: str = Field(index=True, max_length=128)
    hardware_id: str | None = Field(default=None, max_length=128)
    starts: datetime = Field(sa_type=UTCDateTime)
    ends: datetime = Field(sa_type=UTCDateTime)
    reason: str = Field(default="", max_length=512)
    created_by: str = Field(default="", max_length=160)


class BudgetOverride(SQLModel, table=True):
    """A person's decision to roll a model out although its error budget is spent, with the reason."""

    id: int | None = Field(default=None, primary_key=True)
    model: str = Field(index=True, max_length=128)
    reason: str = Field(max_length=512)
    actor: str = Field(max_length=160)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class AlertDelivery(SQLModel, table=True):
    """One alert notification to one receiver, and every try to deliver it (the delivery log)."""

    id: int | None = Field(default=None, primary_key=True)
    alert_id: str = Field(max_length=300, index=True)
    status: str = Field(max_length=16)  # firing | resolved
    receiver: str = Field(max_length=512)  # alertmanager:URL or webhook:URL
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str = Field(default="", max_length=512)
    gave_up: bool = False


class ConfigDocument(SQLModel, table=True):
    """The live declarative configuration: one document per (kind, name) as last applied
    (``fleet_server.declarative``); ``generation`` counts the applies that changed it."""

    kind: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    body: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # apiVersion, kind, metadata, spec
    sha256: str = Field(max_length=64)  # declarative.digest(body): equal documents, equal digests
    generation: int = 1
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_by: str = Field(default="", max_length=160)
    apply_id: int = 0  # the ConfigApply that last changed it


class ConfigApply(SQLModel, table=True):
    """One apply, kept for its history whatever it changed: who, when, from which file, the
    documents as sent and what each did (action and diff). Never updated or deleted."""

    id: int | None = Field(default=None, primary_key=True)
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    actor: str = Field(default="", max_length=160)
    source: str = Field(default="", max_length=512)
    documents: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    changes: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)


class Experiment(SQLModel, table=True):
    """An A/B experiment between model versions over a selector (``fleet_server.experiments``).

    ``spec`` is what it is judged by (``experiment_core.Spec``: primary metric, alpha, minimum
    sample, guardrails); ``policy`` the rollout policy its arms' rollouts run under; ``decision``
    the last verdict with its figures. ``state``: running, stopped or completed."""

    __table_args__ = (Index("ix_experiment_created_at_id", "created_at", "id"),)  # the list's order

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128)
    selector: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    control: str = Field(max_length=64)  # the control arm's name
    spec: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    policy: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    auto_promote: bool = False
    state: str = Field(default="running", max_length=16, index=True)
    reason: str = Field(default="", max_length=1024)
    decision: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    promoted_rollout_id: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ExperimentArm(SQLModel, table=True):
    """One arm: the model version it serves, its weight, the rollout that put the model on its
    devices, and (once stopped) why and the rollout that sent them back to the control."""

    __table_args__ = (UniqueConstraint("experiment_id", "name", name="uq_experiment_arm"),)

    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(foreign_key="experiment.id", index=True, max_length=32)
    name: str = Field(max_length=64)
    model_id: int = Field(foreign_key="model.id")
    model_ref: str = Field(max_length=256)
    model_sha256: str = Field(max_length=64)
    weight: float
    state: str = Field(default="running", max_length=16)  # running | stopped | done
    reason: str = Field(default="", max_length=1024)
    rollout_id: str | None = Field(default=None, max_length=32, index=True)
    return_rollout_id: str | None = Field(default=None, max_length=32, index=True)
    stopped_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ExperimentDevice(SQLModel, table=True):
    """A device's arm, and the cumulative counts of that arm's model on it when it joined (what the
    experiment's figures subtract, so that history from before the experiment does not count)."""

    experiment_id: str = Field(foreign_key="experiment.id", primary_key=True, max_length=32)
    device_id: str = Field(foreign_key="device.id", primary_key=True, max_length=128, index=True)
    arm: str = Field(max_length=64)
    hardware_id: str = Field(max_length=128)
    start: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class ExperimentDecision(SQLModel, table=True):
    """One decision on an experiment (created, guardrail stop, winner, promote, operator stop)."""

    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(foreign_key="experiment.id", index=True, max_length=32)
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    action: str = Field(max_length=64)
    reason: str = Field(max_length=1024)
    figures: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class OutcomeAggregate(SQLModel, table=True):
    """An app's outcome metric per (device, model hash): count, sum and sum of squares of the values
    the device joined to that model's predictions (``POST /v1/outcomes`` on the device)."""

    device_id: str = Field(primary_key=True, max_length=128)
    sha256: str = Field(primary_key=True, max_length=64)
    metric: str = Field(primary_key=True, max_length=64)
    n: int = Field(default=0, sa_type=BigInteger)
    total: float = 0.0
    total_sq: float = 0.0
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
