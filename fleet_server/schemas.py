"""Request and response bodies of the HTTP API (docs/contracts.md)."""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from typing import Annotated, Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from device_agent.protocol import DEVICE_ID_RE
from fleet_server.policy import Policy

# Bounds of a device's tags, declared as types so /openapi.json states them too.
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
TagValue = Annotated[str, StringConstraints(max_length=256)]
Tags = Annotated[dict[TagKey, TagValue], Field(max_length=64, description="at most 64 tags")]


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=DEVICE_ID_RE.pattern)
    hardware_id: str = Field(min_length=1, max_length=128)
    tags: Tags = Field(default_factory=dict)


class TagsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: Tags


class RunningModelOut(BaseModel):
    name: str | None
    version: str | None
    sha256: str


class DeviceOut(BaseModel):
    device_id: str
    hardware_id: str
    tags: dict[str, str]
    registered_at: datetime
    online: bool
    last_seen: datetime | None
    running_model: RunningModelOut | None
    deployment_state: str | None
    deployment_seq: int
    desired_seq: int
    agent_version: str | None
    inventory: dict[str, Any] = Field(default_factory=dict, description="what the device reports it has")
    clock_offset_seconds: float | None = Field(
        default=None,
        description="the device's clock minus the server's receive time, in seconds (transport delay"
        " included), from its last live reported or online status message; null until measured."
        " Informational: timeouts, soak and telemetry use the server's clock only",
    )
    clock_offset_at: datetime | None = Field(default=None, description="server time of that measurement")


class ModelOut(BaseModel):
    name: str
    version: str
    release: int
    target: str
    hardware_ids: list[str]
    sha256: str
    length: int
    manifest: dict[str, Any]
    created_at: datetime


class Selector(BaseModel):
    """Which devices a rollout targets; every given criterion must hold (AND)."""

    model_config = ConfigDict(extra="forbid")

    hardware_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    runtime: str | None = Field(default=None, description="a runtime the device reports, e.g. onnxruntime")
    agent_version: str | None = Field(default=None, description="PEP 440 specifier, e.g. '>=0.2,<1'")

    @field_validator("agent_version")
    @classmethod
    def _specifier(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                SpecifierSet(v)
            except InvalidSpecifier:
                raise ValueError(
                    f"agent_version must be a PEP 440 specifier like '>=0.2', got {v!r}"
                ) from None
        return v


class RolloutIn(Policy):
    """A rollout request: what to send where, in which stages, and its policy's fields as they are."""

    model: str = Field(pattern=r"^[^:]+:.+$", description="name:version")
    selector: Selector = Field(default_factory=Selector)
    stages: list[float] = Field(default_factory=lambda: [100.0], min_length=1, max_length=100)
    stage_unit: Literal["percent", "count"] = "percent"
    conflict: Literal["refuse", "skip"] = Field(
        default="refuse",
        description="devices already in an active rollout: refuse the rollout (409) or leave them out",
    )

    @field_validator("stages")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in pairwise(v)) or any(p <= 0 for p in v):
            raise ValueError("stages are cumulative: strictly increasing and positive")
        return v

    @model_validator(mode="after")
    def _unit(self) -> RolloutIn:
        if self.stage_unit == "percent" and self.stages[-1] > 100:
            raise ValueError("stages are cumulative percents: strictly increasing, each in (0, 100]")
        if self.stage_unit == "count" and any(p != int(p) for p in self.stages):
            raise ValueError("stages by count are whole numbers of devices")
        return self

    def policy(self) -> Policy:
        """The request's policy, as the engine reads it and the rollout stores it."""
        return Policy.model_validate(self.model_dump(include=set(Policy.model_fields)))


class StageOut(BaseModel):
    """Counts are cumulative: the devices of this stage and of every stage before it."""

    percent: float
    target_count: int
    assigned: int
    done: int
    failed: int
    state: str  # pending, running, soaking, awaiting_approval, done, paused, rolled_back, aborted


class DecisionOut(BaseModel):
    ts: datetime
    action: str
    reason: str
    figures: dict[str, Any]


class RolloutOut(BaseModel):
    id: str
    model: str
    model_sha256: str
    state: str
    current_stage: int
    selector: dict[str, Any]
    settings: dict[str, float | int]
    stage_unit: str = "percent"
    policy: dict[str, Any] = Field(default_factory=dict)
    approved_through: int = -1
    rollback_requested: bool = False
    created_at: datetime
    updated_at: datetime
    stages: list[StageOut]
    devices: dict[str, str]
    device_reasons: dict[str, str] = Field(default_factory=dict, description="why a device is in its state")
    decisions: list[DecisionOut]


class ServerOut(BaseModel):
    """This replica: does it drive the engine, which database and schema revision it runs on."""

    replica: str
    leader: bool
    database: str
    schema_revision: str | None
    mqtt_connected: bool


class AggregateOut(BaseModel):
    """Telemetry of one model on one device class, in one rollout stage (or outside any rollout)."""

    sha256: str
    model: str | None
    hardware_id: str
    stage: int | None
    devices: int
    inferences: int
    errors: int
    error_rate: float
    latency_p95_us: float | None
    served_ok: int
    shadow_samples: int
    shadow_agreement: float | None


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    """Every error: ``{"detail": {"code": ..., "message": ...}}``."""

    detail: ErrorBody


class StatsOut(BaseModel):
    malformed_messages: int
    unregistered_messages: int
    telemetry_batches: int
    duplicate_batches: int
    events: int
    reported: int
    status: int
    directives_published: int
    dropped_messages: int = 0
    mqtt_disconnects: int = Field(
        default=0, description="unexpected MQTT disconnects of this replica's clients (keepalive missed, ...)"
    )
    drift_detected: int = Field(
        default=0, description="devices seen going off their desired seq or model (GET /api/v1/drift)"
    )
    directives_republished: int = Field(default=0, description="directives sent again to drifting devices")
    directives_restored: int = Field(default=0, description="deleted retained directives put back")


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: Literal["admin", "operator", "viewer"]


class TokenOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None
    token: str | None = Field(
        default=None, description="the secret: only in the answer to the create call, never shown again"
    )


class AuditOut(BaseModel):
    id: int
    ts: datetime
    actor: str
    role: str
    method: str
    path: str
    status: int
    result: str
    detail: str


class TargetsOut(BaseModel):
    """Versions after installing release-signed targets metadata and re-publishing the repository."""

    targets_version: int
    snapshot_version: int


class HealthOut(BaseModel):
    status: Literal["ok"]


class DriftOut(BaseModel):
    """One device a replica saw off its desired state (seq or model), and what the replica did."""

    device_id: str
    drift: str = Field(description="in_sync, seq_behind, seq_ahead, model_mismatch or directive_missing")
    episodes: int = Field(description="times the device went from in sync to drifting")
    republished: int = Field(description="directives republished to it")
    restored: int = Field(description="deleted retained directives put back for it")
    since: datetime | None = Field(description="when the current drift was first seen")
    last_republish_at: datetime | None
    detail: str
