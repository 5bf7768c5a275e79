"""Request and response bodies of the SLO API (``/api/v1/slos``, alerts, planned windows, overrides).

Described field by field like ``fleet_server.schemas`` (the reference users read
in ``/docs``); the semantic checks of an SLO (targets, thresholds, windows) are
``fleet_server.slo.spec``'s, so the API and the core cannot disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from fleet_server.schemas import TIME_EXAMPLE, Page

LabelName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")]
LabelValue = Annotated[str, StringConstraints(max_length=128)]

SLI_HELP = (
    "availability (predictions served), error_rate (inferences without an error), latency_p95 /"
    " latency_p99 (inferences under 'threshold' ms; the share is 0.95 / 0.99 by the name), drift_psi"
    " (evaluation steps whose outputs stay within 'threshold' PSI of the model's history), accuracy"
    " (labelled predictions that were right)"
)

SLO_EXAMPLE: dict[str, Any] = {
    "name": "face-det-availability",
    "model": "face-det",
    "hardware_id": "rpi4",
    "objectives": [
        {"sli": "availability", "target": 0.995, "window": "28d"},
        {"sli": "latency_p99", "threshold": 50, "window": "28d"},
    ],
}


class ObjectiveIn(BaseModel):
    """One objective: a target share of good events over a rolling window."""

    model_config = ConfigDict(extra="forbid")

    sli: str = Field(description=SLI_HELP, max_length=32)
    target: float | None = Field(
        default=None,
        description="share of good events, between 0 and 1 (0.995 = 99.5%); set by the name for latency",
    )
    window: str = Field(
        default="28d", max_length=16, description="the budget's rolling window: 30s, 5m, 1h, 28d"
    )
    threshold: float | None = Field(
        default=None, description="latency in ms, or drift in PSI (0.25 is a big shift)"
    )
    min_events: int | None = Field(
        default=None,
        ge=1,
        description="events a rule's short window needs before it may breach (default 100; drift 3)",
    )


class RuleIn(BaseModel):
    """A burn-rate rule: breach when the budget burns faster than 'factor' over both windows."""

    model_config = ConfigDict(extra="forbid")

    severity: str = Field(description="page or ticket", max_length=16)
    factor: float = Field(
        description="burn rate, in multiples of the rate that spends the budget exactly", gt=0
    )
    long: str = Field(description="the long window (1h)", max_length=16)
    short: str = Field(
        description="the short window (5m): the alert stops soon after the burn does", max_length=16
    )
    min_events: int | None = Field(
        default=None,
        ge=0,
        description="events the short window must hold before the rule may breach, on top of the"
        " objective's min_events (the larger counts); the default fast page tier asks 300",
    )


class SloIn(BaseModel):
    """An SLO to create. Without 'rules' the default policy applies: a fast page tier and the SRE
    workbook's three rules (docs/slo.md)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [SLO_EXAMPLE]})

    name: str = Field(
        description="unique: lower-case letters, digits, '.', '_', '-', at most 64", max_length=64
    )
    model: str = Field(description="the model's name: every version of it counts", max_length=128)
    hardware_id: str | None = Field(
        default=None, max_length=128, description="one hardware cohort; null: every one"
    )
    objectives: list[ObjectiveIn] = Field(description="at least one, one per SLI", min_length=1, max_length=6)
    rules: list[RuleIn] | None = Field(
        default=None, max_length=8, description="burn-rate rules; null: the defaults"
    )
    labels: dict[LabelName, LabelValue] = Field(
        default_factory=dict, max_length=16, description="extra labels on this SLO's alerts (team, service)"
    )


class SloOut(BaseModel):
    """A stored SLO, with every default filled in."""

    model_config = ConfigDict(json_schema_extra={"examples": [{**SLO_EXAMPLE, "created_at": TIME_EXAMPLE}]})

    name: str = Field(description="the SLO's name")
    model: str = Field(description="the model's name")
    hardware_id: str | None = Field(description="the hardware cohort; null: every one")
    objectives: list[dict[str, Any]] = Field(
        description="the objectives: sli, target, window, threshold, min_events"
    )
    rules: list[dict[str, Any]] = Field(
        description="the burn-rate rules: severity, factor, long, short (and min_events when set)"
    )
    labels: dict[str, str] = Field(description="extra labels on its alerts")
    created_at: datetime = Field(description="when it was created")
    created_by: str = Field(description="who created it")


class SloPage(Page[SloOut]):
    """A page of SLOs, oldest first."""


class RuleStatusOut(BaseModel):
    """One burn-rate rule of one objective, at this evaluation."""

    name: str = Field(description="severity-factor-long window")
    severity: str = Field(description="page or ticket")
    factor: float = Field(description="the rule's burn-rate threshold")
    long_burn: float = Field(description="burn rate over the long window")
    short_burn: float = Field(description="burn rate over the short window")
    breaching: bool = Field(description="both burn rates over the factor, with enough events")


class ObjectiveStatusOut(BaseModel):
    """One objective at this evaluation."""

    sli: str = Field(description="which SLI")
    target: float = Field(description="the target share of good events")
    window: str = Field(description="the budget's window")
    threshold: float | None = Field(description="latency ms or drift PSI; null for the others")
    value: float | None = Field(description="share of good events over the window; null without events")
    events: int = Field(description="events in the window")
    bad: int = Field(description="bad events in the window")
    budget_remaining: float = Field(
        description="share of the budget left: 1 untouched, 0 spent, below 0 overspent"
    )
    rules: list[RuleStatusOut] = Field(description="each burn-rate rule")


class SloStatusOut(BaseModel):
    """An SLO evaluated now from its stored samples."""

    name: str = Field(description="the SLO's name")
    model: str = Field(description="the model's name")
    hardware_id: str | None = Field(description="the cohort; null: every one")
    at: datetime = Field(description="when it was evaluated")
    samples: int = Field(description="samples of its totals kept")
    budget_spent: bool = Field(
        description="an objective's budget is spent: new rollouts of the model are refused"
    )
    severity: str | None = Field(description="the most urgent severity a rule breaches at; null: none")
    objectives: list[ObjectiveStatusOut] = Field(description="each objective")


class AlertOut(BaseModel):
    """One alert: a model and cohort burning budget at one severity."""

    id: str = Field(description="model/cohort-or-*/severity")
    model: str = Field(description="the model's name")
    hardware_id: str = Field(description="the cohort; empty: every one")
    severity: str = Field(description="page or ticket")
    state: str = Field(description="pending, firing or resolved")
    since: datetime = Field(description="when it entered its state")
    fired_at: datetime | None = Field(description="when it last started firing")
    resolved_at: datetime | None = Field(description="when it last resolved")
    causes: list[str] = Field(description="the SLOs, objectives and rules that breach, with their burn rates")
    silenced: bool = Field(description="in a planned-rollout window: not notified")
    notified: bool = Field(description="receivers were told it fires (and not yet that it resolved)")


class AlertPage(Page[AlertOut]):
    """A page of alerts, by id."""


class DeliveryOut(BaseModel):
    """One notification to one receiver and how its delivery went."""

    id: int = Field(description="the delivery's id")
    alert_id: str = Field(description="the alert")
    status: str = Field(description="firing or resolved")
    receiver: str = Field(description="alertmanager:URL or webhook:URL")
    created_at: datetime = Field(description="when it was queued")
    attempts: int = Field(description="tries so far")
    delivered_at: datetime | None = Field(description="when a receiver accepted it; null: not yet")
    last_error: str = Field(description="why the last try failed; empty when none did")
    gave_up: bool = Field(description="no more tries")


class DeliveryPage(Page[DeliveryOut]):
    """A page of the delivery log, oldest first."""


class PlannedWindowIn(BaseModel):
    """A planned-rollout window: the model's alerts go through their lifecycle but are not notified."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "face-det", "minutes": 60, "reason": "face-det:8 rollout"}]
        },
    )

    model: str = Field(description="the model's name", min_length=1, max_length=128)
    hardware_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="one cohort; null: every one"
    )
    starts: AwareDatetime | None = Field(
        default=None, description="when it starts (ISO 8601 with an offset); null: now"
    )
    minutes: float = Field(description="how long it lasts", gt=0, le=7 * 24 * 60)
    reason: str = Field(
        description="why (shown to whoever wonders why nobody was paged)", min_length=1, max_length=512
    )

    @field_validator("starts", mode="before")
    @classmethod
    def _text_time(cls, value: Any) -> Any:
        """A time as text only: a bare number would be read as seconds since 1970."""
        if value is not None and not isinstance(value, str):
            raise ValueError("an ISO 8601 time with an offset, like 2026-03-14T09:00:00Z")
        return value


class PlannedWindowOut(BaseModel):
    """A stored planned-rollout window."""

    id: int = Field(description="its id")
    model: str = Field(description="the model's name")
    hardware_id: str | None = Field(description="the cohort; null: every one")
    starts: datetime = Field(description="when it starts")
    ends: datetime = Field(description="when it ends")
    reason: str = Field(description="why")
    created_by: str = Field(description="who declared it")


class PlannedWindowPage(Page[PlannedWindowOut]):
    """A page of planned-rollout windows, by id."""


class OverrideIn(BaseModel):
    """Let rollouts of a model whose error budget is spent go ahead, for a while, for a reason."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "face-det", "reason": "fix for the latency regression, INC-231", "hours": 24}
            ]
        },
    )

    model: str = Field(description="the model's name", min_length=1, max_length=128)
    reason: str = Field(description="why (kept in the audit log)", min_length=3, max_length=512)
    hours: float = Field(default=24.0, gt=0, le=24 * 14, description="how long the override holds")


class OverrideOut(BaseModel):
    """A stored override of the error-budget policy."""

    id: int = Field(description="its id")
    model: str = Field(description="the model's name")
    reason: str = Field(description="why")
    actor: str = Field(description="who")
    created_at: datetime = Field(description="when")
    expires_at: datetime = Field(description="until when it holds")
