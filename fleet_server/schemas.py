"""Request and response bodies of the HTTP API (docs/contracts.md).

Every model and field carries a description (what it means, its unit and
bounds): they are the reference a user reads in ``/docs``, and
``tests/server/test_openapi_docs.py`` fails on any that lacks one. Request
bodies and the main responses carry an example, which ``/docs`` shows and
pre-fills. The document leaves out null values, so an example gives a value
to every required field.
"""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from device_agent.protocol import DEVICE_ID_RE, DeploymentState
from fleet_server.lifecycle import DeviceRolloutState, RolloutState
from fleet_server.paging import encode_cursor
from fleet_server.policy import Policy
from fleet_server.selector_syntax import check_agent_specifier

# Bounds of a device's tags, declared as types so /openapi.json states them too.
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
TagValue = Annotated[str, StringConstraints(max_length=256)]
Tags = Annotated[
    dict[TagKey, TagValue],
    Field(
        max_length=64,
        description="free-form labels a selector matches (site, line, customer, ...): at most 64,"
        " keys 1 to 64 characters, values at most 256",
    ),
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

SHA_EXAMPLE = "9f2c4e0b7d1a3f5e8c6b4a2d0f1e3c5b7a9d8e6f4c2b0a1d3e5f7c9b8a6d4e2f"
TIME_EXAMPLE = "2026-03-14T09:26:53.589000Z"
DEVICE_STATES = ", ".join(DeploymentState)
ROLLOUT_STATES = ", ".join(RolloutState)
ROLLOUT_DEVICE_STATES = ", ".join(DeviceRolloutState)


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class DeviceIn(BaseModel):
    """A device to register. Registering again with the same attributes is a no-op (200)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"device_id": "cam-0042", "hardware_id": "rpi4", "tags": {"site": "lab", "line": "3"}}
            ]
        },
    )

    device_id: str = Field(
        pattern=DEVICE_ID_RE.pattern,
        description="the device's id, also its MQTT client id and username: 1 to 128 letters, digits,"
        " '_', '.' or '-', starting with a letter or digit",
    )
    hardware_id: str = Field(
        min_length=1,
        max_length=128,
        description="its hardware class (e.g. rpi4): a model is sent only to devices whose hardware id"
        " its bundle lists",
    )
    tags: Tags = Field(default_factory=dict)


class TagsIn(BaseModel):
    """A device's new tags; they replace the old ones whole."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tags": {"site": "berlin"}}]})

    tags: Tags


class RunningModelOut(BaseModel):
    """The model a device reports it serves."""

    name: str | None = Field(description="model name from its bundle manifest; null if not reported")
    version: str | None = Field(description="model version from its bundle manifest; null if not reported")
    sha256: str = Field(description="SHA-256 of the model file, lowercase hex")


DEVICE_EXAMPLE: dict[str, Any] = {
    "device_id": "cam-0042",
    "hardware_id": "rpi4",
    "tags": {"site": "lab", "line": "3"},
    "registered_at": TIME_EXAMPLE,
    "online": True,
    "last_seen": TIME_EXAMPLE,
    "running_model": {"name": "face-det", "version": "7", "sha256": SHA_EXAMPLE},
    "deployment_state": "serving",
    "deployment_seq": 12,
    "desired_seq": 12,
    "agent_version": "0.3.1",
    "inventory": {
        "capabilities": {"runtimes": {"onnxruntime": "1.32.0"}},
        "slots": {"a": SHA_EXAMPLE, "b": None},
        "active_slot": "a",
        "shadow_sha256": None,
    },
    "clock_offset_seconds": 0.042,
    "clock_offset_at": TIME_EXAMPLE,
}


class DeviceOut(BaseModel):
    """A registered device and the latest state it reported."""

    model_config = _examples(DEVICE_EXAMPLE)

    device_id: str = Field(description="the device's id (its MQTT identity)")
    hardware_id: str = Field(description="its hardware class, matched against a model's hardware ids")
    tags: dict[str, str] = Field(description="its labels, as registered or last set")
    registered_at: datetime = Field(description="when it was registered (UTC)")
    online: bool = Field(description="whether its MQTT session is up (its last status message; LWT)")
    last_seen: datetime | None = Field(description="server time of its last message; null if never seen")
    running_model: RunningModelOut | None = Field(
        description="the model it serves; null until it reports one"
    )
    deployment_state: str | None = Field(
        description=f"its agent's state for the latest directive ({DEVICE_STATES}); null until reported"
    )
    deployment_seq: int = Field(description="seq of the latest directive the device reports acting on")
    desired_seq: int = Field(description="seq of the latest directive the server published to it (0: none)")
    agent_version: str | None = Field(description="its agent's version (PEP 440); null until reported")
    broker_shard: str | None = Field(
        default=None,
        description="the broker shard it is on, fixed at registration (null: registered before the"
        " fleet had shards, so on the first one)",
    )
    inventory: dict[str, Any] = Field(
        default_factory=dict,
        description="what the device reports it has: capabilities (runtimes, ...), slots (slot -> model"
        " sha256), active_slot, shadow_sha256 (a candidate it runs in shadow), acceptance (model sha256 ->"
        " its on-device acceptance check: passed, figures)",
    )
    clock_offset_seconds: float | None = Field(
        default=None,
        description="the device's clock minus the server's receive time, in seconds (transport delay"
        " included), from its last live reported or online status message; null until measured."
        " Informational: timeouts, soak and telemetry use the server's clock only",
    )
    clock_offset_at: datetime | None = Field(default=None, description="server time of that measurement")


MODEL_EXAMPLE: dict[str, Any] = {
    "name": "face-det",
    "version": "7",
    "release": 7,
    "target": "arm64-cpu",
    "hardware_ids": ["rpi4", "rpi5"],
    "sha256": SHA_EXAMPLE,
    "length": 2_412_544,
    "manifest": {
        "name": "face-det",
        "version": "7",
        "files": [{"path": "model.onnx", "sha256": SHA_EXAMPLE}],
    },
    "created_at": TIME_EXAMPLE,
}


class ModelOut(BaseModel):
    """A verified, signed bundle the server holds and can roll out."""

    model_config = _examples(MODEL_EXAMPLE)

    name: str = Field(description="model name (a family of versions)")
    version: str = Field(description="model version; name:version is unique")
    release: int = Field(
        description="release counter of the family: devices refuse releases below the signed revocation floor"
    )
    target: str = Field(description="the compile target it was built and checked for, e.g. arm64-cpu")
    hardware_ids: list[str] = Field(description="hardware classes it may be sent to")
    sha256: str = Field(description="SHA-256 of the model file (lowercase hex): its id in /artifacts")
    length: int = Field(description="size of the model file, in bytes")
    manifest: dict[str, Any] = Field(
        description="the signed bundle manifest: files with hashes, io signature, quantization report,"
        " provenance"
    )
    created_at: datetime = Field(description="when the server accepted the upload (UTC)")


class Selector(BaseModel):
    """Which devices a rollout targets; every given criterion must hold (AND).

    The model's hardware ids always apply too. The text form ``hw=rpi4,site=lab`` (the CLI's
    ``--selector``, the device list's ``?selector=``) says the same.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"hardware_id": "rpi4", "tags": {"site": "lab"}}]},
    )

    hardware_id: str | None = Field(default=None, description="only devices of this hardware class")
    tags: dict[str, str] = Field(default_factory=dict, description="only devices with all these tag values")
    runtime: str | None = Field(default=None, description="a runtime the device reports, e.g. onnxruntime")
    agent_version: str | None = Field(default=None, description="PEP 440 specifier, e.g. '>=0.2,<1'")

    @field_validator("agent_version")
    @classmethod
    def _specifier(cls, v: str | None) -> str | None:
        return None if v is None else check_agent_specifier(v)


class RolloutPlan(Policy):
    """How a rollout proceeds, whatever it rolls out and wherever: its stages and the policy.

    What a ``RolloutPolicy`` document declares (``fleet_server.declarative``) and what
    ``RolloutIn`` adds a model and a selector to.
    """

    stages: list[float] = Field(
        default_factory=lambda: [100.0],
        min_length=1,
        max_length=100,
        description="cumulative stage sizes, strictly increasing: percents of the targeted devices in"
        " (0, 100], or whole device counts with stage_unit 'count'",
    )
    stage_unit: Literal["percent", "count"] = Field(default="percent", description="what stages count")
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
    def _unit(self) -> RolloutPlan:
        if self.stage_unit == "percent" and self.stages[-1] > 100:
            raise ValueError("stages are cumulative percents: strictly increasing, each in (0, 100]")
        if self.stage_unit == "count" and any(p != int(p) for p in self.stages):
            raise ValueError("stages by count are whole numbers of devices")
        return self


class RolloutIn(RolloutPlan):
    """A rollout request: which model to send where, in which stages, and its policy.

    The policy fields (gates, timing, retries, rate, probation) are the rollout policy's,
    each with its default; unknown fields are refused.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "face-det:7",
                    "selector": {"hardware_id": "rpi4", "tags": {"site": "lab"}},
                    "stages": [1, 10, 50, 100],
                    "soak_seconds": 600,
                    "max_error_rate": 0.02,
                    "max_latency_ratio": 1.5,
                    "retry_limits": {"timed_out": 2},
                }
            ]
        }
    )

    model: str = Field(pattern=r"^[^:]+:.+$", description="the model to roll out, as name:version")
    selector: Selector = Field(default_factory=Selector, description="which devices it targets (AND)")

    def policy(self) -> Policy:
        """The request's policy, as the engine reads it and the rollout stores it."""
        return Policy.model_validate(self.model_dump(include=set(Policy.model_fields)))


class StageOut(BaseModel):
    """One stage of a rollout. Counts are cumulative: this stage's devices and every earlier one's."""

    percent: float = Field(
        description="the stage's cumulative size: a percent, or a device count when the"
        " rollout's stage_unit is 'count'"
    )
    target_count: int = Field(description="devices this stage covers, cumulative")
    assigned: int = Field(description="devices assigned so far, cumulative")
    done: int = Field(description="assigned devices that proved they serve the new model")
    failed: int = Field(description="assigned devices that failed or timed out")
    waiting: int = Field(
        default=0,
        description="assigned devices waiting for their maintenance window, an app's deferral or their"
        " metered link (not failures, not timed out)",
    )
    state: str = Field(
        description="pending, running, waiting (every device still on its way waits for its window, a"
        " deferral or its link), soaking, awaiting_approval, done, paused, rolled_back or aborted"
    )


class DeliveryOut(BaseModel):
    """What the rollout's installs fetched, as the devices reported it (``Event.bytes_fetched``)."""

    bytes_fetched: int = Field(description="bytes every install of this rollout fetched, retries included")
    installs: int = Field(description="installs that reported their bytes (a model found in a slot: 0)")
    bytes_per_install: float | None = Field(description="bytes_fetched / installs (null: none yet)")


class DecisionOut(BaseModel):
    """One decision of the engine or an operator on a rollout, with the figures behind it."""

    ts: datetime = Field(description="when it was taken (server time, UTC)")
    action: str = Field(description="what was decided, e.g. created, next_stage, pause, roll_back, joined")
    reason: str = Field(description="why, in words")
    figures: dict[str, Any] = Field(description="the numbers the decision read (rates, samples, PSI, ...)")


ROLLOUT_EXAMPLE: dict[str, Any] = {
    "id": "3f9a1c2b7d4e",
    "model": "face-det:7",
    "model_sha256": SHA_EXAMPLE,
    "state": "running",
    "current_stage": 1,
    "selector": {"hardware_id": "rpi4", "tags": {"site": "lab"}, "runtime": None, "agent_version": None},
    "settings": {
        "soak_seconds": 600.0,
        "device_timeout_seconds": 60.0,
        "max_error_rate": 0.02,
        "min_inferences": 20,
        "max_failure_rate": 0.0,
    },
    "stage_unit": "percent",
    "policy": {"max_latency_ratio": 1.5, "retry_limits": {"timed_out": 2}},
    "approved_through": -1,
    "rollback_requested": False,
    "created_at": TIME_EXAMPLE,
    "updated_at": TIME_EXAMPLE,
    "stages": [
        {"percent": 1.0, "target_count": 1, "assigned": 1, "done": 1, "failed": 0, "state": "done"},
        {"percent": 10.0, "target_count": 10, "assigned": 10, "done": 4, "failed": 0, "state": "running"},
    ],
    "devices": {"cam-0042": "done", "cam-0043": "installing"},
    "device_reasons": {},
    "decisions": [
        {
            "ts": TIME_EXAMPLE,
            "action": "created",
            "reason": "100 device(s) targeted",
            "figures": {"targeted": 100},
        }
    ],
}


class RolloutOut(BaseModel):
    """A rollout's status: its stages with counts, every targeted device's state, every decision."""

    model_config = _examples(ROLLOUT_EXAMPLE)

    id: str = Field(description="the rollout's id (12 hex characters)")
    model: str = Field(description="the model rolled out, name:version")
    model_sha256: str = Field(description="SHA-256 of that model's file")
    state: str = Field(description=f"one of {ROLLOUT_STATES}")
    current_stage: int = Field(
        description="index of the stage in progress (0-based; the CLI shows it 1-based)"
    )
    selector: dict[str, Any] = Field(description="the selector it was created with (see Selector)")
    settings: dict[str, float | int] = Field(
        description="the policy fields kept in columns of their own: soak_seconds,"
        " device_timeout_seconds, max_error_rate, min_inferences, max_failure_rate"
    )
    stage_unit: str = Field(default="percent", description="'percent' or 'count': what stages' percent holds")
    policy: dict[str, Any] = Field(
        default_factory=dict, description="the rest of its policy, defaults included"
    )
    approved_through: int = Field(default=-1, description="highest stage index a human approved (-1: none)")
    rollback_requested: bool = Field(
        default=False,
        description="an operator asked to roll back; the engine carries it out on its next tick",
    )
    created_at: datetime = Field(description="when it was created (UTC)")
    updated_at: datetime = Field(description="when its state last changed (UTC)")
    stages: list[StageOut] = Field(description="its stages, in order")
    devices: dict[str, str] = Field(
        description=f"targeted device id -> its state in this rollout ({ROLLOUT_DEVICE_STATES}); page"
        " through them with /rollouts/{id}/devices"
    )
    device_reasons: dict[str, str] = Field(default_factory=dict, description="why a device is in its state")
    waiting: dict[str, int] = Field(
        default_factory=dict,
        description="devices waiting, per reason: maintenance_window, deferred, metered_link, link_budget,"
        " not_before",
    )
    delivery: DeliveryOut = Field(
        default_factory=lambda: DeliveryOut(bytes_fetched=0, installs=0, bytes_per_install=None),
        description="bytes the installs fetched, in total and per install",
    )
    decisions: list[DecisionOut] = Field(
        description="every decision, oldest first; page through them with /rollouts/{id}/decisions"
    )


class RolloutDeviceOut(BaseModel):
    """One device targeted by a rollout, and where it stands in it."""

    device_id: str = Field(description="the device's id")
    state: str = Field(description=f"one of {ROLLOUT_DEVICE_STATES}")
    stage: int | None = Field(description="index of the stage that assigned it; null while unassigned")
    attempts: int = Field(
        description="directives sent to it with the rollout's model (1 + retries); counted anew when a"
        " resume sends the release again to a device that could not fetch it (0 until it is sent)"
    )
    reason: str | None = Field(description="why it is in its state (a reason code); null when nothing to say")
    updated_at: datetime = Field(description="when its state last changed (UTC)")


class ServerOut(BaseModel):
    """This replica: does it drive the engine, which database and schema revision it runs on."""

    replica: str = Field(description="this replica's MQTT client id")
    leader: bool = Field(description="whether it holds the leader lock and drives the rollout engine")
    database: str = Field(description="database dialect: sqlite or postgresql")
    schema_revision: str | None = Field(description="the Alembic revision of the database schema")
    mqtt_connected: bool = Field(description="whether its MQTT bridge is connected to the broker")
    mqtt_shards: dict[str, bool] = Field(
        default_factory=dict,
        description="per broker shard (one, 'default', without a shards file): is it connected to it",
    )


AGGREGATE_EXAMPLE: dict[str, Any] = {
    "sha256": SHA_EXAMPLE,
    "model": "face-det:7",
    "hardware_id": "rpi4",
    "stage": 1,
    "devices": 10,
    "inferences": 48_210,
    "errors": 12,
    "error_rate": 0.000249,
    "latency_p95_us": 6_553.6,
    "served_ok": 48_198,
    "shadow_samples": 500,
    "shadow_agreement": 0.994,
}


class AggregateOut(BaseModel):
    """Telemetry of one model on one device class, in one rollout stage (or outside any rollout)."""

    model_config = _examples(AGGREGATE_EXAMPLE)

    sha256: str = Field(description="SHA-256 of the model file")
    model: str | None = Field(description="name:version of that file; null if the server does not hold it")
    hardware_id: str = Field(description="the device class")
    stage: int | None = Field(description="rollout stage index (rollout telemetry only); null otherwise")
    devices: int = Field(description="devices that reported telemetry for this model")
    inferences: int = Field(description="inferences counted in their telemetry")
    errors: int = Field(description="of which failed (runtime errors, non-finite outputs)")
    error_rate: float = Field(description="errors / inferences, 0 to 1 (0 when no inference)")
    latency_p95_us: float | None = Field(
        description="95th percentile latency in microseconds (upper bound of its histogram bucket); null"
        " without samples"
    )
    served_ok: int = Field(description="successful inferences the devices reported serving with it")
    shadow_samples: int = Field(description="inputs it ran on in shadow beside the served model")
    shadow_agreement: float | None = Field(
        description="share of those whose top-1 matched the served model, 0 to 1; null without samples"
    )


class ErrorBody(BaseModel):
    """What went wrong."""

    code: str = Field(
        description="stable snake_case reason to branch on, e.g. invalid_cursor, device_not_found"
    )
    message: str = Field(description="for people: what was wrong and, where it helps, what to do")


class ErrorOut(BaseModel):
    """Every error: ``{"detail": {"code": ..., "message": ...}}``."""

    model_config = _examples(
        {
            "detail": {
                "code": "invalid_request",
                "message": "query.limit: Input should be less than or equal to 1000",
            }
        }
    )

    detail: ErrorBody = Field(description="the error")


class StatsOut(BaseModel):
    """This process's ingest counters since it started, summed over its ingest workers."""

    malformed_messages: int = Field(description="MQTT messages that did not parse as the protocol's")
    unregistered_messages: int = Field(description="messages from device ids that are not registered")
    telemetry_batches: int = Field(description="telemetry batches stored")
    duplicate_batches: int = Field(description="telemetry batches received again and counted once")
    events: int = Field(description="deployment events received (one sent again is stored once)")
    reported: int = Field(description="reported-state messages applied")
    status: int = Field(description="online/offline status messages applied")
    directives_published: int = Field(description="signed directives published to devices")
    dropped_messages: int = Field(default=0, description="messages dropped because the ingest queue was full")
    mqtt_disconnects: int = Field(
        default=0, description="unexpected MQTT disconnects of this replica's clients (keepalive missed, ...)"
    )
    drift_detected: int = Field(
        default=0, description="devices seen going off their desired seq or model (GET /api/v1/drift)"
    )
    directives_republished: int = Field(default=0, description="directives sent again to drifting devices")
    directives_restored: int = Field(default=0, description="deleted retained directives put back")
    directives_unroutable: int = Field(
        default=0,
        description="directives not published: the device's record names a broker shard the shards file"
        " does not list",
    )
    ingest_lag_seconds: float = Field(
        default=0.0,
        description="how long a message reaching the broker now waits before it is stored (the broker's"
        " queue for the ingest workers included; the edgefleet_ingest_lag_seconds metric)",
    )
    ingest_events_lag_seconds: float = Field(
        default=0.0,
        description="ingest_lag_seconds for the events alone: they have an ingest worker (a broker"
        " queue) of their own, so a telemetry backlog does not delay them (0 with ingest_workers=0)",
    )
    ingest_telemetry_lag_seconds: float = Field(
        default=0.0, description="ingest_lag_seconds for the telemetry alone (0 with ingest_workers=0)"
    )
    ingest_backlog_messages: int = Field(default=0, description="messages received, not stored yet")


class TokenIn(BaseModel):
    """An API token to create."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "ci-deployer", "role": "operator"}]}
    )

    name: str = Field(
        min_length=1, max_length=128, description="what it is for, shown in lists and the audit log"
    )
    role: Literal["admin", "operator", "viewer", "labeler"] = Field(
        description="viewer reads; operator also registers devices, uploads models, runs rollouts;"
        " admin also manages tokens; labeler only posts labels (POST /api/v1/labels) and reads nothing"
    )


class TokenOut(BaseModel):
    """An API token (never its secret, except once in the answer that creates it)."""

    model_config = _examples(
        {
            "id": "a1b2c3d4e5f6",
            "name": "ci-deployer",
            "role": "operator",
            "created_at": TIME_EXAMPLE,
            "created_by": "bootstrap-admin",
            "revoked_at": None,
            "token": None,
        }
    )

    id: str = Field(description="the token's public handle (12 hex characters), used to revoke it")
    name: str = Field(description="what it is for")
    role: str = Field(description="admin, operator, viewer or labeler")
    created_at: datetime = Field(description="when it was created (UTC)")
    created_by: str = Field(description="the actor who created it")
    revoked_at: datetime | None = Field(default=None, description="when it was revoked; null while valid")
    token: str | None = Field(
        default=None, description="the secret: only in the answer to the create call, never shown again"
    )


class AuditOut(BaseModel):
    """One mutating admin call (POST, PUT, PATCH, DELETE under /api/v1/), whatever its outcome."""

    model_config = _examples(
        {
            "id": 1042,
            "ts": TIME_EXAMPLE,
            "actor": "a1b2c3d4e5f6 (ci-deployer)",
            "role": "operator",
            "method": "POST",
            "path": "/api/v1/rollouts",
            "status": 201,
            "result": "ok",
            "detail": "",
        }
    )

    id: int = Field(description="increasing entry number")
    ts: datetime = Field(description="when the call was answered (UTC)")
    actor: str = Field(description="who: token id and name, 'bootstrap-admin' or 'anonymous'")
    role: str = Field(description="the caller's role; empty when not authenticated")
    method: str = Field(description="HTTP method")
    path: str = Field(description="request path")
    status: int = Field(description="HTTP status of the answer")
    result: str = Field(description="'ok' or the error code of the answer")
    detail: str = Field(description="what the call changed, where the route says (e.g. the token it made)")


class TargetsOut(BaseModel):
    """Versions after installing release-signed targets metadata and re-publishing the repository."""

    targets_version: int = Field(description="version of the TUF targets metadata now published")
    snapshot_version: int = Field(description="version of the TUF snapshot metadata now published")


class HealthOut(BaseModel):
    """The server answers HTTP (for load balancers and container health checks)."""

    status: Literal["ok"] = Field(description="always 'ok'")


class ReadyCheck(BaseModel):
    """One readiness check."""

    ok: bool = Field(description="whether it passes")
    detail: str = Field(description="what was found")
    required: bool = Field(
        default=True,
        description="a failing required check makes the replica not ready (503); a failing advisory one"
        " only degraded (200)",
    )


class ReadyOut(BaseModel):
    """Whether this replica should get traffic: its database answers and its broker connection is up.
    Ingest lag is advisory: a replica behind on telemetry still serves the API and the downloads
    (taking it out of a load balancer would not speed its ingest up, and with one replica it would
    take the whole API down); it says ``degraded``, and the ingest-lag alert pages about it. Its
    leader state is reported, never a failure (followers serve the API)."""

    model_config = _examples(
        {
            "status": "ready",
            "checks": {
                "database": {"ok": True, "detail": "postgresql"},
                "broker": {"ok": True, "detail": "connected"},
                "ingest_lag": {"ok": True, "detail": "0s (limit 60s)", "required": False},
                "leader": {"ok": True, "detail": "leader"},
            },
        }
    )

    status: Literal["ready", "degraded", "not_ready"] = Field(
        description="ready when every check passes, degraded when only advisory ones fail (still 200)"
    )
    checks: dict[str, ReadyCheck] = Field(description="database, broker, ingest_lag, leader")


# ---------------------------------------------------------------- pages of lists

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """A page of a list: up to ``limit`` entries in the list's order, and where the next starts."""

    items: list[T] = Field(description="this page's entries, in the list's order")
    next: str | None = Field(
        description="opaque cursor of the next page: pass it as 'cursor' with the same filters; null"
        " on the last page. Entries added while paging appear at most once, later pages may hold them"
    )


class DevicePage(Page[DeviceOut]):
    """A page of devices, by device id."""

    model_config = _examples({"items": [DEVICE_EXAMPLE], "next": encode_cursor("devices", ("cam-0042",))})


class ModelPage(Page[ModelOut]):
    """A page of models, by name, then upload order."""

    model_config = _examples({"items": [MODEL_EXAMPLE], "next": encode_cursor("models", ("face-det", 7))})


class RolloutPage(Page[RolloutOut]):
    """A page of rollouts, oldest first."""

    model_config = _examples(
        {
            "items": [ROLLOUT_EXAMPLE],
            "next": encode_cursor("rollouts", (datetime.fromisoformat(TIME_EXAMPLE), ROLLOUT_EXAMPLE["id"])),
        }
    )


class RolloutDevicePage(Page[RolloutDeviceOut]):
    """A page of a rollout's devices, by device id."""


class DecisionPage(Page[DecisionOut]):
    """A page of a rollout's decisions, oldest first."""


class AggregatePage(Page[AggregateOut]):
    """A page of telemetry aggregates, by model sha256, hardware id, then stage."""

    model_config = _examples(
        {"items": [AGGREGATE_EXAMPLE], "next": encode_cursor("telemetry", (SHA_EXAMPLE, "rpi4", 1))}
    )


class TokenPage(Page[TokenOut]):
    """A page of API tokens, oldest first."""


class AuditPage(Page[AuditOut]):
    """A page of the audit log, oldest first."""


class DriftOut(BaseModel):
    """One device a replica saw off its desired state (seq or model), and what the replica did."""

    device_id: str = Field(description="the device")
    drift: str = Field(description="in_sync, seq_behind, seq_ahead, model_mismatch or directive_missing")
    episodes: int = Field(description="times the device went from in sync to drifting")
    republished: int = Field(description="directives republished to it")
    restored: int = Field(description="deleted retained directives put back for it")
    since: datetime | None = Field(description="when the current drift was first seen")
    last_republish_at: datetime | None = Field(description="when its directive was last republished")
    detail: str = Field(description="what differs: desired against reported seq and model")


class DriftPage(Page[DriftOut]):
    """A page of the devices a replica saw drift, by device id."""


_LABEL_SCALAR: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": -(1 << 63), "maximum": (1 << 63) - 1},  # as the guard allows
        {"type": "string", "minLength": 1, "maxLength": 256},
    ]
}
LABEL_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "one label; an item that does not fit is reported invalid, the rest of the batch is kept",
    "properties": {
        "inference_id": {
            "type": "string",
            "description": "the id the device gave the inference (UUIDv7, canonical lowercase)",
        },
        "label": {
            "description": "the truth: a class index or name, a number (regressors), or a list of them"
            " (one per row of a multi-row inference)",
            "anyOf": [
                _LABEL_SCALAR,
                {"type": "array", "items": _LABEL_SCALAR, "minItems": 1, "maxItems": 1024},
            ],
        },
        "label_time": {
            "type": "string",
            "description": "when the truth became known, ISO 8601 with an offset; default: when received",
        },
        "source": {
            "type": "string",
            "description": "who says so (an app, a person, a labelling service): 1 to 64 characters;"
            " a source's first label of an inference stands",
        },
    },
}
LABEL_EXAMPLE: dict[str, Any] = {
    "inference_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f60718293",
    "label": 7,
    "label_time": TIME_EXAMPLE,
    "source": "checkout-app",
}


class LabelsIn(BaseModel):
    """A batch of labels for inferences devices made, joined to their captured predictions by id."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"labels": [LABEL_EXAMPLE]}]})

    labels: list[Any] = Field(
        description="at most 10,000 labels (and the 1 MiB body limit); more is a 413 too_many_labels."
        " Each is judged on its own",
        json_schema_extra={"items": LABEL_ITEM_SCHEMA},
    )


class LabelResultOut(BaseModel):
    """What became of one label of the batch."""

    status: Literal["accepted", "duplicate", "invalid"] = Field(
        description="accepted (stored), duplicate (this source labelled this inference before: the first"
        " label stands) or invalid (see detail; nothing stored)"
    )
    matched: bool = Field(
        description="the server holds a capture of the inference, so the label is attributed to its"
        " model version, hardware cohort and rollout stage; false is not an error (it may come later)"
    )
    detail: str | None = Field(default=None, description="why it is invalid or a duplicate")


class LabelsOut(BaseModel):
    """The outcome of every label of a batch, in the order sent, and their counts."""

    model_config = _examples(
        {
            "results": [{"status": "accepted", "matched": True, "detail": None}],
            "counts": {"accepted": 1, "duplicate": 0, "invalid": 0, "matched": 1},
        }
    )

    results: list[LabelResultOut] = Field(description="one per label sent, in order")
    counts: dict[str, int] = Field(description="labels per status, and how many matched a capture")


class TensorIn(BaseModel):
    """One array as a device captured it."""

    dtype: str = Field(description="numpy dtype name, e.g. float32")
    shape: list[int] = Field(description="the array's shape")
    data: str = Field(description="base64 of the C-order little-endian bytes")


class CaptureItemIn(BaseModel):
    """One captured inference."""

    inference_id: str = Field(description="the id the device gave the inference (UUIDv7); labels join on it")
    ts: str = Field(description="when it ran (the UUIDv7's time), ISO 8601 UTC")
    inputs: dict[str, TensorIn] | None = Field(
        default=None, description="its input by name, when the policy keeps inputs"
    )
    outputs: list[TensorIn] | None = Field(
        default=None, description="its outputs in order, when the policy keeps outputs"
    )


class CaptureBatchIn(BaseModel):
    """A batch of captured inferences as the agent seals it (device_agent.capture_store.body)."""

    model_config = _examples(
        {
            "device_id": "cam-0042",
            "batch_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f60718293",
            "model_sha256": SHA_EXAMPLE,
            "items": [
                {
                    "inference_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f60718294",
                    "ts": TIME_EXAMPLE,
                    "outputs": [{"dtype": "float32", "shape": [1, 2], "data": "AACAPwAAAAA="}],
                }
            ],
        }
    )

    device_id: str = Field(description="the device (must be the one in the URL and the signature)")
    batch_id: str = Field(description="the batch id (must be the one in the URL)")
    model_sha256: str = Field(description="SHA-256 of the model file that made these inferences")
    items: list[CaptureItemIn] = Field(description="the captured inferences")


class CaptureOut(BaseModel):
    """A stored capture batch and what it was attributed to."""

    model_config = _examples(
        {
            "device_id": "cam-0042",
            "batch_id": "0193a5f0-7c1e-7a3b-9c2d-4e5f60718293",
            "items": 40,
            "skipped": 0,
            "model_sha256": SHA_EXAMPLE,
            "hardware_id": "rpi4",
            "stage": 0,
            "created": True,
        }
    )

    device_id: str = Field(description="the device that captured it")
    batch_id: str = Field(description="its id")
    items: int = Field(description="inferences indexed")
    skipped: int = Field(
        description="items without a usable inference id or time (kept in the file, not indexed)"
    )
    model_sha256: str = Field(description="the model that made them")
    hardware_id: str = Field(description="the device's hardware cohort")
    stage: int | None = Field(
        description="the rollout stage that put the model on the device; null outside one"
    )
    created: bool = Field(description="false when this exact batch was stored before (a resend)")


class AccuracyOut(BaseModel):
    """Accuracy on labelled predictions, with its Wilson score interval."""

    labels: int = Field(description="labelled predictions")
    correct: int = Field(description="of which the label was the predicted top-1 class")
    value: float | None = Field(description="correct / labels, 0 to 1; null without labels")
    interval: list[float] | None = Field(description="[low, high] Wilson interval; null without labels")
    confidence: float = Field(description="the interval's confidence level, e.g. 0.95")


class ClassMetricsOut(BaseModel):
    """One class's figures from the confusion counts (one class against the rest)."""

    support: int = Field(description="labels whose true class is this one")
    predicted: int = Field(description="labelled predictions of this class")
    precision: float | None = Field(description="true positives / predicted; null when never predicted")
    recall: float | None = Field(description="true positives / support; null without support")
    fpr: float | None = Field(description="false positive rate: false positives / labels of other classes")


class FeatureAvailabilityOut(BaseModel):
    """How often one input reached the model usable."""

    checked: int = Field(description="inputs checked on the devices")
    nan_share: float | None = Field(description="share holding NaN, 0 to 1; null when none checked")
    missing_share: float | None = Field(description="share missing, 0 to 1")
    out_of_range_share: float | None = Field(description="share outside the compiler's calibration range")
    available: float | None = Field(description="share with none of these, 0 to 1")


class InputDistributionOut(BaseModel):
    """Where one input's sampled values lay relative to the range the model was calibrated on."""

    values: int = Field(description="values counted on the devices (sampled inferences, strided values)")
    shares: dict[str, float] = Field(
        description="share of them per bucket: '00 <min', '01 0-10%' ... '10 90-100%' of [min, max],"
        " '11 >max'"
    )


class PredictionAvailabilityOut(BaseModel):
    """Requests at the devices' local API that got a prediction."""

    requests: int = Field(description="requests for this model")
    failed: int = Field(description="requests that got no prediction (bad input, errors, timeouts)")
    by_kind: dict[str, int] = Field(description="failed requests by kind: bad_input, runtime_error, ...")
    value: float | None = Field(description="(requests - failed) / requests; null without requests")


class MetricsGroupOut(BaseModel):
    """The field figures of the model on one hardware cohort in one rollout stage (or all of them)."""

    hardware_id: str | None = Field(description="the hardware cohort; null in the total over all")
    stage: int | None = Field(
        description="stage of the model's latest rollout that took these devices; null outside it (or total)"
    )
    devices: int = Field(description="devices that reported telemetry for the model")
    inferences: int = Field(description="inferences they counted")
    accuracy: AccuracyOut | None = Field(description="device-matched labels; null for a regressor")
    mean_abs_error: float | None = Field(description="regressors: mean |label - prediction|; null otherwise")
    classes: dict[str, ClassMetricsOut] = Field(description="per class: precision, recall, FPR")
    label_coverage: float | None = Field(description="labelled predictions / inferences, 0 to 1")
    label_delay_p50_s: float | None = Field(description="median label delay, seconds (bucket upper bound)")
    label_delay_p95_s: float | None = Field(description="95th percentile label delay, seconds")
    feature_availability: dict[str, FeatureAvailabilityOut] = Field(description="per input tensor")
    input_distribution: dict[str, InputDistributionOut] = Field(
        default_factory=dict, description="per input tensor with a calibration range"
    )
    prediction_availability: PredictionAvailabilityOut = Field(description="at the devices' local API")
    cpu_ms_per_inference: float | None = Field(description="agent process CPU milliseconds per inference")
    energy_mj_per_inference: float | None = Field(
        description="millijoules per inference: null, see energy_note"
    )
    energy_note: str = Field(description="why energy is null")
    captured: int = Field(description="inferences devices kept for upload")
    server_labels: AccuracyOut = Field(
        description="labels posted to the server (POST /api/v1/labels) joined to captured predictions"
    )


class ModelMetricsOut(BaseModel):
    """A model version's field figures per hardware cohort and rollout stage, and over all."""

    model: str = Field(description="name:version")
    sha256: str = Field(description="SHA-256 of its model file")
    rollout_id: str | None = Field(description="the latest rollout of it, whose stages the groups name")
    groups: list[MetricsGroupOut] = Field(description="per hardware id and stage, sorted")
    total: MetricsGroupOut = Field(description="over every device")


class AcceptanceFigureOut(BaseModel):
    """One figure of one output, as the devices of a hardware class measured it."""

    output: str = Field(description="the model output it was measured on")
    figure: str = Field(description="snr_db, cosine_mean, top1_agreement... (the output kind's figures)")
    compiled: float | None = Field(description="measured on the host at compile time, on the golden set")
    tolerance: float | None = Field(description="how far a device may fall below it (above, for errors)")
    measured_median: float = Field(description="the median over the devices")
    measured_worst: float = Field(description="the worst device's value (lowest; highest for errors)")
    devices: int = Field(description="devices that measured it")


class AcceptanceHardwareOut(BaseModel):
    """The acceptance checks of one hardware class."""

    hardware_id: str = Field(description="the hardware class")
    devices: int = Field(description="devices that reported an acceptance check of this model")
    passed: int = Field(description="devices whose check passed (they swapped the model in)")
    refused: int = Field(description="devices that refused the swap (acceptance_failed)")
    figures: list[AcceptanceFigureOut] = Field(description="per output and figure")


class ModelAcceptanceOut(BaseModel):
    """The devices' on-device acceptance checks of one model, per hardware class, beside the
    figures compiled on the host (docs/agent.md, on-device acceptance)."""

    model: str = Field(description="name:version")
    sha256: str = Field(description="SHA-256 of its model file")
    golden_samples: int | None = Field(description="samples in the bundle's golden set (None: no golden set)")
    golden_bytes: int | None = Field(description="size of the golden set file")
    compiled: list[dict[str, Any]] = Field(
        description="the signed checks: output, figure, compiled, tolerance"
    )
    hardware: list[AcceptanceHardwareOut] = Field(description="per hardware class, sorted")
    summary: list[str] = Field(description="one line per figure and hardware class, for a report")


class LabelOut(BaseModel):
    """One source's label of an inference."""

    label: Any = Field(description="the label as posted")
    source: str = Field(description="who posted it")
    label_time: datetime = Field(description="when the truth became known (UTC)")


class CapturedOut(BaseModel):
    """A captured inference with its attribution, labels and arrays: one row of a dataset."""

    inference_id: str = Field(description="the device's id of the inference (UUIDv7)")
    device_id: str = Field(description="the device that made it")
    model: str = Field(description="name:version of the model that made it")
    sha256: str = Field(description="SHA-256 of that model file")
    hardware_id: str = Field(description="the device's hardware cohort")
    rollout_id: str | None = Field(
        description="the rollout that put the model on the device; null outside one"
    )
    stage: int | None = Field(description="that rollout's stage for the device; null outside one")
    ts: datetime = Field(description="when the inference ran (UTC)")
    predicted: str | None = Field(description="top-1 class of its first output row; null without outputs")
    labels: list[LabelOut] = Field(description="its labels, one per source, by source")
    inputs: dict[str, TensorIn] | None = Field(description="its input by name, when captured")
    outputs: list[TensorIn] | None = Field(description="its outputs in order, when captured")


class CapturedPage(Page[CapturedOut]):
    """A page of captured inferences, in inference-id (time) order."""
