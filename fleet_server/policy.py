"""The rollout policy: every setting that steers a rollout after its targets and stages, each
with its default, declared once.

The API request (``schemas.RolloutIn``) takes these fields as they are, the engine and the
gates read them from the same model, and a stored rollout is read back into it. Unknown keys
are refused, never dropped: a misspelt gate would otherwise leave a rollout unprotected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from device_agent import protocol


class GateAction(StrEnum):
    """What a tripped gate does: roll the devices back, or pause so that a human decides."""

    ROLL_BACK = "roll_back"
    PAUSE = "pause"


class ClassFailure(StrEnum):
    """What a deploy does with a hardware class it cannot compile or whose bundle misses the gate."""

    ABORT = "abort"  # nothing is pushed, no rollout starts: the fleet stays as it was
    SKIP = "skip"  # the class is left out (and named); the other classes roll out


class ServerFailure(StrEnum):
    """The failure classes the server assigns (the others are the agent's reason codes)."""

    TIMED_OUT = "timed_out"  # no serving proof within ``device_timeout_seconds``
    REVERTED = "reverted"  # the agent went back to its previous model by itself (probation)


ANY_FAILURE = "*"
"""Retry-limit key for every failure class the map does not name."""

AGENT_REASON_CODES = frozenset(protocol.ReasonCode)
"""The reason codes the device agent reports in events and rejections (its wire enum)."""

FAILURE_CLASSES = AGENT_REASON_CODES | set(ServerFailure)
"""What a ``retry_limits`` key may name: a reason code, or one of the two classes the server assigns."""

DELIVERY_FAILURES = frozenset(
    {
        protocol.ReasonCode.DELIVERY_UNAVAILABLE,  # repository or mirror out of reach, or an HTTP error
        protocol.ReasonCode.UNAVAILABLE,  # fetched nothing, judged nothing (signing.errors.Unavailable)
        protocol.ReasonCode.DOWNLOAD_FAILED,  # the artifact server answered with an error status
        protocol.ReasonCode.DOWNLOAD_INCOMPLETE,  # the connection ended before the signed length arrived
    }
)
"""The failure classes that say the delivery path (server, mirror, CDN, link) could not hand the
release over: nothing was fetched, so nothing about the model was judged. The install gates
hold a rollout on these (``delivery_action``) instead of blaming the model, and they are retried
by default (``delivery_retries``). A verdict on what *was* fetched (``digest_mismatch``,
``bad_signature``, ``metadata_expired``, ``target_mismatch``, ...) is never one of them: a
tampered or frozen mirror is a security failure, not an outage."""

RetryCount = Annotated[int, Field(ge=0, le=20)]


PROBATION_FIELDS = {
    "seconds": "watch window after the swap, in seconds (0: judge on the first inferences)",
    "min_inferences": "successful inferences needed before the device reports success",
    "max_error_rate": "error rate (runtime errors, non-finite outputs) above which it reverts, 0 to 1",
    "max_latency_ratio": "p95 latency of the new model / of the old one on this device, above which it"
    " reverts",
}
"""What each probation field means, for /openapi.json (the wire model states them in comments)."""


def _describe_probation(schema: dict[str, Any]) -> None:
    properties = schema.get("properties", {})
    if set(properties) != set(PROBATION_FIELDS):  # a new wire field must be described here
        raise AssertionError(
            f"describe every probation field: {sorted(set(properties) ^ set(PROBATION_FIELDS))}"
        )
    for name, text in PROBATION_FIELDS.items():
        properties[name]["description"] = text


class ProbationPolicy(protocol.Probation):
    """The agent's probation: it watches the new model after the swap and goes back to the
    previous one by itself when the model misbehaves (the wire's ``Probation``, its fields and
    defaults, refusing unknown keys like the rest of the policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_describe_probation)


class CapturePolicy(BaseModel):
    """What the rollout's devices keep of their inferences for retraining (``protocol.Capture``
    without the upload URL: the server names its own, ``<public_url>/api/v1/captures``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: float = Field(
        default=protocol.Capture.model_fields["sample_rate"].default,
        gt=0,
        le=1,
        description="share of inferences each device keeps, 0 to 1",
    )
    keep: Literal["inputs", "outputs", "both"] = Field(
        default=protocol.Capture.model_fields["keep"].default,
        description="what of each: inputs, outputs, both",
    )
    quota_bytes: int = Field(
        default=protocol.Capture.model_fields["quota_bytes"].default,
        ge=4096,
        description="disk each device may use for captures not yet uploaded, bytes (the oldest go first)",
    )


class WindowPolicy(protocol.Window):
    """A weekly maintenance window in each device's own local time (the time zone it reports):
    ``days`` (mon..sun), ``start`` and ``end`` as ``HH:MM``; an end at or before the start crosses
    midnight (the window belongs to the day it opens), ``start == end`` is the whole day."""

    model_config = ConfigDict(extra="forbid", frozen=True)


WindowName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
"""The name of a ``MaintenanceWindow`` document (``fleet_server.declarative``)."""

NAMED_WINDOWS_DESCRIPTION = (
    "names of applied MaintenanceWindow documents whose windows are added to 'windows' when the"
    " rollout is created (the rollout keeps the windows themselves, not the names)"
)

MB = 1_000_000  # max_mb_per_day counts decimal megabytes, as link plans do


class MeteredPolicy(BaseModel):
    """What a device on a metered link (it reports its link class) may download for this rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    download: Literal["any", "unmetered_only"] = Field(
        default="any", description="'unmetered_only': a metered device waits for an unmetered link"
    )
    max_mb_per_day: float | None = Field(
        default=None,
        gt=0,
        description="megabytes a metered device may fetch per local day (its own budget may be smaller);"
        " a download that does not fit waits for the next day",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> MeteredPolicy:
        if self.download == "unmetered_only" and self.max_mb_per_day is not None:
            raise ValueError("download 'unmetered_only' never uses a metered link: drop max_mb_per_day")
        return self

    def rule(self) -> protocol.MeteredRule:
        """The rule as the directive carries it (bytes per day)."""
        cap = None if self.max_mb_per_day is None else max(1, int(self.max_mb_per_day * MB))
        return protocol.MeteredRule(download=self.download, max_bytes_per_day=cap)


class CohortSchedule(BaseModel):
    """Windows, deferral and metered rule for the devices one cohort matches (the first that
    matches wins); a field left out takes the rollout's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware_id: str | None = Field(default=None, description="devices of this hardware class")
    tags: dict[str, str] = Field(default_factory=dict, description="devices with all these tag values")
    windows: list[WindowPolicy] | None = Field(default=None, description="this cohort's windows")
    maintenance_windows: list[WindowName] = Field(
        default_factory=list, max_length=16, description=NAMED_WINDOWS_DESCRIPTION
    )
    max_deferral_seconds: float | None = Field(default=None, ge=0, description="this cohort's cap")
    metered: MeteredPolicy | None = Field(default=None, description="this cohort's metered-link rule")

    @model_validator(mode="after")
    def _selects(self) -> CohortSchedule:
        if self.hardware_id is None and not self.tags:
            raise ValueError(
                "a cohort names a hardware_id or tags (the rollout's own fields cover every device)"
            )
        return self

    def matches(self, hardware_id: str, tags: Mapping[str, str]) -> bool:
        if self.hardware_id is not None and hardware_id != self.hardware_id:
            return False
        return all(tags.get(k) == v for k, v in self.tags.items())


class Policy(BaseModel):
    """How a rollout proceeds: stage timing, the health gates with their actions, retries, rate
    limit, shadowing and the agent-side probation (docs/rollouts.md, "Gates")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # stages: soak after a stage finished; a device without serving proof by then has timed out
    soak_seconds: float = Field(
        default=0.0, ge=0, description="seconds a finished stage is watched before the next one starts"
    )
    device_timeout_seconds: float = Field(
        default=60.0, gt=0, description="seconds a notified device has to prove it serves the model"
    )
    # install: failure rate and count over the devices assigned, success threshold at a stage's end
    max_failure_rate: float = Field(
        default=0.0, ge=0, le=1, description="failed / assigned devices above which the install gate trips"
    )
    max_failures: int | None = Field(
        default=None, ge=0, description="failed devices above which the install gate trips, whatever the rate"
    )
    min_success_rate: float = Field(default=0.0, ge=0, le=1, description="done/assigned when a stage ends")
    failure_action: GateAction = Field(
        default=GateAction.ROLL_BACK, description="when the install gate trips"
    )
    delivery_action: GateAction = Field(
        default=GateAction.PAUSE,
        description="when the install gate trips only because devices could not fetch the release"
        " (delivery_unavailable, unavailable, download_failed, download_incomplete): an outage of the"
        " delivery path says nothing about the model",
    )
    # errors: inference error rate of the new model, judged from a minimum sample
    max_error_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="inference error rate of the new model above which the gate trips",
    )
    min_inferences: int = Field(
        default=20, ge=1, description="inferences needed before the error gate judges"
    )
    error_action: GateAction = Field(default=GateAction.ROLL_BACK, description="when the error gate trips")
    # latency: p95 of the new model / p95 of the replaced model on the same hardware id
    max_latency_ratio: float | None = Field(
        default=None,
        gt=0,
        description="p95 latency of the new / the replaced model on the same hardware above"
        " which the latency gate trips (null: no latency gate)",
    )
    min_latency_samples: int = Field(
        default=50, ge=1, description="latency samples of each model needed before the latency gate judges"
    )
    latency_action: GateAction = Field(
        default=GateAction.ROLL_BACK, description="when the latency gate trips"
    )
    # drift: PSI of the new model's output histogram vs the replaced model's
    max_output_psi: float | None = Field(
        default=None,
        gt=0,
        description="population stability index of the new model's outputs against the"
        " replaced model's above which the drift gate trips (null: no drift gate)",
    )
    min_drift_samples: int = Field(
        default=200, ge=1, description="output samples of each model needed before the drift gate judges"
    )
    drift_action: GateAction = Field(default=GateAction.PAUSE, description="when the drift gate trips")
    # shadow: each device first runs the new model beside its own on sampled inputs, never serving it
    min_shadow_agreement: float | None = Field(
        default=None, ge=0, le=1, description="shadow the model first; promote at this top-1 agreement"
    )
    min_shadow_samples: int = Field(
        default=50, ge=1, description="shadow samples needed before the shadow gate judges"
    )
    shadow_action: GateAction = Field(default=GateAction.ROLL_BACK, description="when the shadow gate trips")
    # accuracy: labelled predictions of the new model vs the replaced model's on the same hardware,
    # an always-valid one-sided test (fleet_server/accuracy_stats.py), so looking every tick is free
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="accuracy (0 to 1) the new model may lose against the replaced model on the same"
        " hardware; the accuracy gate trips when a one-sided test proves a larger loss (null: no"
        " accuracy gate; 0: any loss the test proves)",
    )
    accuracy_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=0.5,
        description="false-alarm rate of the accuracy gate over the whole rollout: the chance it ever"
        " trips while the new model is no worse than max_accuracy_drop allows",
    )
    min_labels: int = Field(
        default=500,
        ge=1,
        description="labelled predictions of each model needed before the accuracy gate judges; a"
        " stage does not finish without them",
    )
    max_label_wait_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="seconds a finished stage waits for min_labels before it pauses for a human",
    )
    accuracy_action: GateAction = Field(
        default=GateAction.ROLL_BACK, description="when the accuracy gate trips"
    )
    shadow_sample_rate: float = Field(
        # a rollout that says nothing samples at the rate an agent assumes when a directive says nothing
        default=protocol.Directive.model_fields["shadow_sample_rate"].default,
        gt=0,
        le=1,
        description="share of inputs a shadowing device also runs through the new model",
    )
    # a human approves each next stage (manual gate)
    require_approval: bool = Field(default=False, description="a human approves each next stage")
    # one-command deploy: a hardware class whose compile or quality gate fails
    on_class_failure: ClassFailure = Field(
        default=ClassFailure.ABORT,
        description="edgefleet deploy: a hardware class whose compile or quality gate fails stops the"
        " whole deploy before anything is pushed (abort), or is left out while the other classes roll"
        " out (skip)",
    )
    # retries per failure class with exponential backoff
    retry_limits: dict[str, RetryCount] = Field(
        default_factory=dict,
        description="failure class (an agent reason code, 'timed_out', 'reverted', or '*' for any"
        " other) -> retries, e.g. {'timed_out': 2}",
    )
    retry_backoff_seconds: float = Field(
        default=30.0, ge=0, description="seconds before the first retry; doubles with each further retry"
    )
    delivery_retries: RetryCount = Field(
        default=2,
        description="retries of a device that could not fetch the release (a delivery failure class)"
        " when retry_limits names neither its class nor '*'",
    )
    # rate limit: devices notified per minute, ramping by a factor per minute up to a maximum
    rate_per_minute: int | None = Field(default=None, ge=1, description="devices notified per minute")
    rate_increment_factor: float = Field(default=1.0, ge=1.0, description="rate x factor each minute")
    max_rate_per_minute: int | None = Field(
        default=None, ge=1, description="the ramp's ceiling, devices per minute"
    )
    # the agent watches the new model after the swap and reverts by itself on misbehaviour
    probation: ProbationPolicy | None = Field(default=None, description="agent-side watch after the swap")
    # capture for retraining: the rollout's devices keep a sample of their inferences and upload it
    capture: CapturePolicy | None = Field(
        default=None,
        description="devices serving the model keep a sample of their inferences and upload it to"
        " this server (GET /api/v1/captures; null: nothing captured)",
    )
    # maintenance windows: devices download at once, swap the model in only inside a window of
    # their own local time; an app on the device may defer the swap, up to a maximum
    windows: list[WindowPolicy] = Field(
        default_factory=list,
        description="weekly windows in each device's local time in which it may swap the model in"
        " (empty: any time); it downloads and verifies before",
    )
    maintenance_windows: list[WindowName] = Field(
        default_factory=list, max_length=16, description=NAMED_WINDOWS_DESCRIPTION
    )
    max_deferral_seconds: float = Field(
        default=protocol.Activation.model_fields["max_deferral_seconds"].default,
        ge=0,
        description="how long an app on the device may hold the swap once it could happen"
        " (POST /v1/defer); then it goes in at the next chance inside a window",
    )
    metered: MeteredPolicy | None = Field(
        default=None,
        description="what devices on a metered link may download (null: as on any link, within"
        " the device's own budget)",
    )
    cohorts: list[CohortSchedule] = Field(
        default_factory=list,
        max_length=100,
        description="windows, deferral and metered rule per hardware class or tags; the first match wins",
    )
    max_wait_seconds: float = Field(
        default=8 * 86400.0,
        gt=0,
        description="seconds a device may wait (window, deferral, metered link) before it counts as"
        " timed out; the device timeout itself counts from when the wait ends",
    )

    @field_validator("retry_limits")
    @classmethod
    def _known_classes(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(v) - FAILURE_CLASSES - {ANY_FAILURE})
        if unknown:
            raise ValueError(
                f"unknown failure class(es) {', '.join(map(repr, unknown))}: a key is an agent reason"
                f" code ({', '.join(sorted(AGENT_REASON_CODES))}), {', '.join(map(repr, ServerFailure))} or"
                f" {ANY_FAILURE!r}"
            )
        return v


def window_names(p: Policy) -> list[str]:
    """Every ``MaintenanceWindow`` name ``p`` refers to (its own and its cohorts'), in order, once."""
    names = [*p.maintenance_windows, *(n for c in p.cohorts for n in c.maintenance_windows)]
    return list(dict.fromkeys(names))


P = TypeVar("P", bound="Policy")


def _merged(own: Sequence[WindowPolicy], named: Sequence[WindowPolicy]) -> list[WindowPolicy]:
    out: dict[str, WindowPolicy] = {}
    for w in [*own, *named]:  # a window given twice (declared and named, or by two names) counts once
        out.setdefault(w.model_dump_json(), w)
    return list(out.values())


def resolve_windows(p: P, named: Mapping[str, Sequence[WindowPolicy]]) -> P:
    """``p`` with every window name replaced by the windows it names (added to the policy's or the
    cohort's own ``windows``). A cohort that names windows and declares none takes only the named
    ones. Raises ``KeyError`` for a name ``named`` lacks: the caller says where names come from."""
    if not window_names(p):
        return p

    def windows_of(names: Sequence[str]) -> list[WindowPolicy]:
        return [w for n in names for w in named[n]]

    cohorts = [
        c.model_copy(
            update={
                "windows": _merged(c.windows or [], windows_of(c.maintenance_windows)),
                "maintenance_windows": [],
            }
        )
        if c.maintenance_windows
        else c
        for c in p.cohorts
    ]
    return p.model_copy(
        update={
            "windows": _merged(p.windows, windows_of(p.maintenance_windows)),
            "maintenance_windows": [],
            "cohorts": cohorts,
        }
    )


def _schedule(
    p: Policy, hardware_id: str, tags: Mapping[str, str]
) -> tuple[list[WindowPolicy], float, MeteredPolicy | None]:
    c = next((c for c in p.cohorts if c.matches(hardware_id, tags)), None)
    windows = c.windows if c is not None and c.windows is not None else p.windows
    defer = (
        c.max_deferral_seconds
        if c is not None and c.max_deferral_seconds is not None
        else p.max_deferral_seconds
    )
    metered = c.metered if c is not None and c.metered is not None else p.metered
    return windows, defer, metered


def activation_for(p: Policy, hardware_id: str, tags: Mapping[str, str]) -> protocol.Activation:
    """The activation rule a device of this hardware class and tags gets in its directive."""
    windows, defer, _ = _schedule(p, hardware_id, tags)
    return protocol.Activation(
        windows=[protocol.Window.model_validate(w.model_dump()) for w in windows], max_deferral_seconds=defer
    )


def metered_for(p: Policy, hardware_id: str, tags: Mapping[str, str]) -> protocol.MeteredRule | None:
    """The metered-link rule a device of this hardware class and tags gets (None: no rule)."""
    _, _, metered = _schedule(p, hardware_id, tags)
    return metered.rule() if metered is not None else None


COLUMN_FIELDS = (
    "soak_seconds",
    "device_timeout_seconds",
    "max_error_rate",
    "min_inferences",
    "max_failure_rate",
)
"""The policy fields the ``rollout`` table keeps in columns of their own (the rest is its JSON
``policy`` column); the status view shows them as ``settings``."""


class PolicyRow(Protocol):
    """What a stored rollout holds of its policy (``models.Rollout``)."""

    soak_seconds: float
    device_timeout_seconds: float
    max_error_rate: float
    min_inferences: int
    max_failure_rate: float
    policy: dict[str, Any]


def to_row(p: Policy) -> dict[str, Any]:
    """The ``Rollout`` column values that store ``p``: the whole policy, defaults included, so a
    stored rollout keeps the policy it started with whatever later versions default to."""
    return {**settings(p), "policy": document(p)}


def from_row(row: PolicyRow) -> Policy:
    """The policy a stored rollout runs with (raises ``pydantic.ValidationError`` on a bad row)."""
    return Policy.model_validate({**row.policy, **{k: getattr(row, k) for k in COLUMN_FIELDS}})


def settings(p: Policy) -> dict[str, Any]:
    """The fields stored in columns of their own, shown as the status view's ``settings``."""
    return {k: getattr(p, k) for k in COLUMN_FIELDS}


def document(p: Policy) -> dict[str, Any]:
    """The rest, stored as the JSON ``policy`` column and shown as the status view's ``policy``."""
    return p.model_dump(mode="json", exclude=set(COLUMN_FIELDS))
