"""Request and response bodies of the HTTP API (docs/contracts.md)."""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    model_config = ConfigDict(extra="forbid")

    hardware_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


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

    @field_validator("stages")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(not 0 < p <= 100 for p in v) or any(b <= a for a, b in pairwise(v)):
            raise ValueError("stages are cumulative percents: strictly increasing, each in (0, 100]")
        return v


class StageOut(BaseModel):
    """Counts are cumulative: the devices of this stage and of every stage before it."""

    percent: float
    target_count: int
    assigned: int
    done: int
    failed: int
    state: str  # pending, running, soaking, done, rolled_back, aborted


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
    created_at: datetime
    updated_at: datetime
    stages: list[StageOut]
    devices: dict[str, str]
    decisions: list[DecisionOut]


class StatsOut(BaseModel):
    malformed_messages: int
    unregistered_messages: int
    telemetry_batches: int
    duplicate_batches: int
    events: int
    reported: int
    status: int
    directives_published: int
