"""The request and response bodies of ``/api/v1/experiments`` (docs/experiments.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet_server.experiment_core import is_metric
from fleet_server.policy import Policy
from fleet_server.schemas import Page, Selector

ARM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_ARMS = 8


class ArmIn(BaseModel):
    """One arm of a new experiment: the model version it serves and its share of the devices."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ARM_NAME, description="the arm's name, e.g. control, candidate")
    model: str = Field(
        pattern=r"^[^:]+:.+$", max_length=256, description="the version it serves, name:version"
    )
    weight: float = Field(gt=0, le=1000, description="its share of every hardware cohort (relative)")


class GuardrailIn(BaseModel):
    """A metric an arm may not make worse than the control by more than ``max_harm``."""

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


class ExperimentSpec(BaseModel):
    """An A/B experiment but its name: arms with weights over a selector, the first (or
    ``control``) the control. What an ``Experiment`` document declares (``fleet_server.declarative``,
    named by its ``metadata.name``) and what ``ExperimentIn`` adds a name to."""

    model_config = ConfigDict(extra="forbid")

    selector: Selector = Field(default_factory=Selector, description="which devices take part (AND)")
    arms: list[ArmIn] = Field(
        min_length=2, max_length=MAX_ARMS, description="two to eight arms, each serving its own version"
    )
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
    guardrails: list[GuardrailIn] = Field(
        default_factory=list, max_length=16, description="metrics whose breach stops an arm"
    )
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
    def _arms(self) -> ExperimentSpec:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("arm names must be unique")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control {self.control!r} is not one of the arms {names}")
        return self

    @property
    def control_arm(self) -> str:
        return self.control or self.arms[0].name


class ExperimentIn(ExperimentSpec):
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

    name: str = Field(min_length=1, max_length=128, description="a name for people (not unique)")


class StopIn(BaseModel):
    """Stop one arm (its devices go back to the control) or the whole experiment."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"arm": "candidate", "reason": "field reports"}, {"promote": True}]},
    )

    arm: str | None = Field(default=None, pattern=ARM_NAME, description="stop this arm only (default: all)")
    reason: str = Field(default="operator", max_length=512, description="why, kept in the decisions")
    promote: bool = Field(default=False, description="end the experiment by rolling its proven winner out")

    @model_validator(mode="after")
    def _one(self) -> StopIn:
        if self.promote and self.arm is not None:
            raise ValueError("promote ends the whole experiment: give no arm")
        return self


class MetricOut(BaseModel):
    """One metric of one arm: its value and a one-look 95% interval."""

    metric: str = Field(description="accuracy, error_rate, latency_ms or outcome:<name>")
    value: float | None = Field(description="the arm's value (null without data)")
    samples: int = Field(description="labels, inferences or outcomes counted")
    low: float | None = Field(description="95% interval of the value alone (one look; not for deciding)")
    high: float | None = Field(description="upper end of that interval")


class EffectOut(BaseModel):
    """An arm against the control on one metric, with its always-valid interval."""

    metric: str = Field(description="the metric compared")
    better: str = Field(description="higher or lower: which way is better")
    verdict: str = Field(description="better, worse, no_difference_yet or no_data")
    estimate: float | None = Field(description="arm minus control")
    lower: float | None = Field(description="always-valid interval of the effect at 1 - alpha")
    upper: float | None = Field(description="upper end of the always-valid interval")
    p_value: float | None = Field(description="anytime p-value of 'no effect'")
    samples: int = Field(description="the arm's samples")
    control_samples: int = Field(description="the control's samples")


class ArmOut(BaseModel):
    """An arm as it runs: its devices, the rollouts that serve it, its metrics and effects."""

    name: str = Field(description="the arm's name")
    model: str = Field(description="the version it serves, name:version")
    model_sha256: str = Field(description="that model file's signed hash")
    weight: float = Field(description="its share of every hardware cohort (relative)")
    state: str = Field(description="running, stopped or done")
    reason: str = Field(description="why it stopped (empty while running)")
    devices: int = Field(description="devices assigned to it")
    devices_by_hardware: dict[str, int] = Field(description="its devices per hardware id (the strata)")
    serving: int = Field(description="its devices that report running the arm's model")
    rollout_id: str | None = Field(description="the rollout that put its model on its devices")
    return_rollout_id: str | None = Field(
        description="the rollout that sent its devices back to the control, once stopped"
    )
    metrics: dict[str, MetricOut] = Field(description="its metrics by name")
    effects: list[EffectOut] = Field(description="against the control (empty for the control)")


class ExperimentDecisionOut(BaseModel):
    """One decision the experiment took, with the figures it read."""

    ts: datetime = Field(description="when (UTC)")
    action: str = Field(description="what was done: arm_stopped, winner, promoted, stopped, ...")
    reason: str = Field(description="why")
    figures: dict[str, Any] = Field(description="the figures the decision read")


class ExperimentOut(BaseModel):
    """An experiment with its arms, their metrics and effects, and its decisions."""

    id: str = Field(description="the experiment's id")
    name: str = Field(description="its name")
    state: str = Field(description="running, stopped or completed")
    reason: str = Field(description="why it ended (empty while running)")
    selector: dict[str, Any] = Field(description="which devices take part")
    control: str = Field(description="the control arm's name")
    metric: str = Field(description="the primary metric")
    alpha: float = Field(description="false-positive rate of the whole experiment, at any number of looks")
    alpha_per_arm: float = Field(description="alpha split over the arms compared with the control")
    auto_promote: bool = Field(
        description="whether a proven winner is rolled out to the rest of the selector"
    )
    winner: str | None = Field(description="the proven winner, once there is one")
    verdict: str = Field(description="the primary metric's verdict so far")
    promoted_rollout_id: str | None = Field(description="the rollout that promoted the winner")
    arms: list[ArmOut] = Field(description="its arms")
    guardrails: list[dict[str, Any]] = Field(description="the guardrails it was created with")
    decisions: list[ExperimentDecisionOut] = Field(description="its decisions, oldest first")
    created_at: datetime = Field(description="when it was created (UTC)")
    updated_at: datetime = Field(description="when it last changed (UTC)")


class ExperimentPage(Page[ExperimentOut]):
    """A page of experiments, newest first."""
