"""Request and response bodies of the HTTP API (docs/contracts.md)."""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from device_agent.protocol import DEVICE_ID_RE


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    hardware_id: str = Field(min_length=1, max_length=128)
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("device_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not DEVICE_ID_RE.match(v):
            raise ValueError("device_id must match [A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
        return v


class TagsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: dict[str, str]

    @field_validator("tags")
    @classmethod
    def _bounded(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 64 or any(not 0 < len(k) <= 64 or len(x) > 256 for k, x in v.items()):
            raise ValueError("at most 64 tags, keys 1..64 and values up to 256 characters")
        return v


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


GateAction = Literal["roll_back", "pause"]


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=r"^[^:]+:.+$", description="name:version")
    selector: Selector = Field(default_factory=Selector)
    stages: list[float] = Field(default_factory=lambda: [100.0], min_length=1, max_length=100)
    soak_seconds: float = Field(default=0.0, ge=0)
    device_timeout_seconds: float = Field(default=60.0, gt=0)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    min_inferences: int = Field(default=20, ge=1)
    max_failure_rate: float = Field(default=0.0, ge=0, le=1)
    # issue 6: stages by count, conflicts, gates and their actions, retries, rate, probation
    stage_unit: Literal["percent", "count"] = "percent"
    conflict: Literal["refuse", "skip"] = Field(
        default="refuse",
        description="devices already in an active rollout: refuse the rollout (409) or leave them out",
    )
    min_success_rate: float = Field(default=0.0, ge=0, le=1, description="done/assigned when a stage ends")
    max_failures: int | None = Field(default=None, ge=0, description="absolute cap of failed devices")
    failure_action: GateAction = "roll_back"
    error_action: GateAction = "roll_back"
    max_latency_ratio: float | None = Field(default=None, gt=0, description="p95 new / p95 replaced model")
    min_latency_samples: int = Field(default=50, ge=1)
    latency_action: GateAction = "roll_back"
    max_output_psi: float | None = Field(default=None, gt=0, description="PSI of outputs vs replaced model")
    min_drift_samples: int = Field(default=200, ge=1)
    drift_action: GateAction = "pause"
    min_shadow_agreement: float | None = Field(
        default=None, ge=0, le=1, description="shadow the model first; promote at this top-1 agreement"
    )
    min_shadow_samples: int = Field(default=50, ge=1)
    shadow_action: GateAction = "roll_back"
    shadow_sample_rate: float = Field(default=0.1, gt=0, le=1)
    require_approval: bool = Field(default=False, description="a human approves each next stage")
    retry_limits: dict[str, int] = Field(
        default_factory=dict, description="failure class (or '*') -> retries, e.g. {'timed_out': 2}"
    )
    retry_backoff_seconds: float = Field(default=30.0, ge=0)
    rate_per_minute: int | None = Field(default=None, ge=1, description="devices notified per minute")
    rate_increment_factor: float = Field(default=1.0, ge=1.0, description="rate x factor each minute")
    max_rate_per_minute: int | None = Field(default=None, ge=1)
    probation_seconds: float | None = Field(default=None, ge=0, description="agent-side watch after swap")
    probation_min_inferences: int = Field(default=1, ge=0)
    probation_max_error_rate: float = Field(default=0.05, ge=0, le=1)
    probation_max_latency_ratio: float = Field(default=3.0, gt=0)

    @field_validator("stages")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in pairwise(v)) or any(p <= 0 for p in v):
            raise ValueError("stages are cumulative: strictly increasing and positive")
        return v

    @field_validator("retry_limits")
    @classmethod
    def _retries(cls, v: dict[str, int]) -> dict[str, int]:
        if any(n < 0 or n > 20 for n in v.values()):
            raise ValueError("retry_limits values must be 0..20")
        return v

    @model_validator(mode="after")
    def _unit(self) -> RolloutIn:
        if self.stage_unit == "percent" and self.stages[-1] > 100:
            raise ValueError("stages are cumulative percents: strictly increasing, each in (0, 100]")
        if self.stage_unit == "count" and any(p != int(p) for p in self.stages):
            raise ValueError("stages by count are whole numbers of devices")
        return self

    def policy(self) -> dict[str, Any]:
        """The fields beyond the skeleton's, as stored in ``Rollout.policy`` (engine ``Policy``)."""
        skip = {"model", "selector", "stages", "stage_unit", "conflict"} | SKELETON_FIELDS
        return {k: v for k, v in self.model_dump().items() if k not in skip}


SKELETON_FIELDS = {
    "soak_seconds",
    "device_timeout_seconds",
    "max_error_rate",
    "min_inferences",
    "max_failure_rate",
}


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
