"""The request and response bodies of ``/api/v1/experiments`` (docs/experiments.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet_server.experiment_core import is_metric
from fleet_server.policy import Policy
from fleet_server.schemas import Selector

ARM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_ARMS = 8


class ArmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ARM_NAME, description="the arm's name, e.g. control, candidate")
    model: str = Field(
        pattern=r"^[^:]+:.+$", max_length=256, description="the version it serves, name:version"
    )
    weight: float = Field(gt=0, le=1000, description="its share of every hardware cohort (relative)")


class GuardrailIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="accuracy, error_rate, latency_ms or outcome:<name>")
    max_harm: float = Field(
        default=0.0,
        ge=0,
        description="how much worse than the control the arm may be before it is stopped, in the metric's"
        " unit (0.01: one point of accuracy or error rate; 5: 5 ms)",
    )
    better: Literal["higher", "lower"] | None = Field(
        default=None, description="for an outcome: which way is better (default higher)"
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not is_metric(v):
            raise ValueError("a metric is accuracy, error_rate, latency_ms or outcome:<name>")
        return v


class ExperimentIn(BaseModel):
    """An A/B experiment: arms with weights over a selector, the first (or ``control``) the control."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "digits-v3-vs-v2",
                    "selector": {"tags": {"app": "ocr"}},
                    "arms": [
                        {"name": "control", "model": "digits:2", "weight": 1},
                        {"name": "candidate", "model": "digits:3", "weight": 1},
                    ],
                    "metric": "accuracy",
                    "guardrails": [{"metric": "latency_ms", "max_harm": 5}, {"metric": "error_rate"}],
                    "auto_promote": True,
                }
            ]
        },
    )

    name: str = Field(min_length=1, max_length=128)
    selector: Selector = Field(default_factory=Selector, description="which devices take part (AND)")
    arms: list[ArmIn] = Field(min_length=2, max_length=MAX_ARMS)
    control: str | None = Field(
        default=None, pattern=ARM_NAME, description="the control arm (default: first)"
    )
    metric: str = Field(default="accuracy", description="the primary metric the winner is decided on")
    better: Literal["higher", "lower"] | None = Field(
        default=None, description="for an outcome metric: which way is better (default higher)"
    )
    alpha: float = Field(
        default=0.05, gt=0, lt=0.5, description="false-positive rate, at any number of looks"
    )
    min_samples: int = Field(
        default=200, ge=10, le=10_000_000, description="primary-metric samples per arm before any verdict"
    )
    design_samples: int = Field(
        default=1000, ge=10, le=100_000_000, description="samples per arm where the intervals are narrowest"
    )
    guardrails: list[GuardrailIn] = Field(default_factory=list, max_length=16)
    auto_promote: bool = Field(
        default=False, description="once a winner is proven, roll it out to the rest of the selector"
    )
    policy: Policy = Field(
        default_factory=Policy, description="the rollout policy the arms' rollouts run under"
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not is_metric(v):
            raise ValueError("a metric is accuracy, error_rate, latency_ms or outcome:<name>")
        return v

    @model_validator(mode="after")
    def _arms(self) -> ExperimentIn:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("arm names must be unique")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control {self.control!r} is not one of the arms {names}")
        return self

    @property
    def control_arm(self) -> str:
        return self.control or self.arms[0].name


class StopIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arm: str | None = Field(default=None, pattern=ARM_NAME, description="stop this arm only (default: all)")
    reason: str = Field(default="operator", max_length=512)
    promote: bool = Field(default=False, description="end the experiment by rolling its proven winner out")

    @model_validator(mode="after")
    def _one(self) -> StopIn:
        if self.promote and self.arm is not None:
            raise ValueError("promote ends the whole experiment: give no arm")
        return self


class MetricOut(BaseModel):
    metric: str
    value: float | None
    samples: int
    low: float | None = Field(description="95% interval of the value alone (one look; not for deciding)")
    high: float | None


class EffectOut(BaseModel):
    metric: str
    better: str
    verdict: str = Field(description="better, worse, no_difference_yet or no_data")
    estimate: float | None = Field(description="arm minus control")
    lower: float | None = Field(description="always-valid interval of the effect at 1 - alpha")
    upper: float | None
    p_value: float | None = Field(description="anytime p-value of 'no effect'")
    samples: int
    control_samples: int


class ArmOut(BaseModel):
    name: str
    model: str
    model_sha256: str
    weight: float
    state: str
    reason: str
    devices: int
    devices_by_hardware: dict[str, int]
    serving: int = Field(description="its devices that report running the arm's model")
    rollout_id: str | None
    return_rollout_id: str | None
    metrics: dict[str, MetricOut]
    effects: list[EffectOut] = Field(description="against the control (empty for the control)")


class ExperimentDecisionOut(BaseModel):
    ts: datetime
    action: str
    reason: str
    figures: dict[str, Any]


class ExperimentOut(BaseModel):
    id: str
    name: str
    state: str
    reason: str
    selector: dict[str, Any]
    control: str
    metric: str
    alpha: float
    alpha_per_arm: float
    auto_promote: bool
    winner: str | None
    verdict: str
    promoted_rollout_id: str | None
    arms: list[ArmOut]
    guardrails: list[dict[str, Any]]
    decisions: list[ExperimentDecisionOut]
    created_at: datetime
    updated_at: datetime


class ExperimentPage(BaseModel):
    items: list[ExperimentOut]
    next: str | None = None
