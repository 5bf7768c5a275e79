"""The scenario file: fleet, network profiles, models, a script of steps, and expectations (TOML).

Every table forbids unknown keys and every step is checked for the fields its
action needs, so a typo fails at load time with the path to the bad key,
never halfway through a ten-minute run. A ``[small]`` table holds overrides
(deep-merged over the file) for the CI-sized version of the same scenario.
See docs/simulator.md for the format, with examples in ``scenarios/``.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from device_agent.schedule import zone
from simulator.labels import LabelDelay
from simulator.netem import NetProfile
from simulator.readable import readable


class ScenarioError(ValueError):
    """The scenario file is unreadable or invalid; the message names the file and the bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSpec(_Strict):
    latency_ms: float = Field(0.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    bandwidth_kbps: float = Field(0.0, ge=0)
    loss: float = Field(0.0, ge=0, lt=1)

    def profile(self) -> NetProfile:
        return NetProfile(self.latency_ms, self.jitter_ms, self.bandwidth_kbps, self.loss)


class HardwareClass(_Strict):
    """A slice of the fleet with its own hardware id, runtimes, network and quirks."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    share: float = Field(1.0, gt=0)  # relative weight: shares are normalised over the classes
    hardware_id: str | None = None  # default: the class name
    targets: list[str] = Field(default_factory=lambda: ["arm64-cpu"])
    network: str = "ideal"  # a key of [network]; "ideal" = straight to the broker
    proxied: bool | None = None  # MQTT through a fault proxy; default: when the network is not ideal
    fails_models: list[str] = Field(default_factory=list)  # model keys that output NaN on this class
    infer_delay_ms: float = Field(0.0, ge=0)
    load_delay_s: float = Field(0.0, ge=0)
    tags: dict[str, str] = Field(default_factory=dict)
    # Each device of the class gets its own disk of this size (a tmpfs at its data dir, needs root):
    # the ``fill_disk`` fault fills it up for real.
    disk_mb: float | None = Field(None, gt=0)
    # The devices' clocks are off by this many seconds: one value, or [low, high] drawn per device.
    clock_skew_s: float | list[float] = 0.0
    # Maintenance windows are read in this IANA time zone; the link is metered (cellular) or not,
    # with a daily budget of the devices' own on a metered link (None: none).
    timezone: str = "UTC"
    link_class: Literal["unmetered", "metered"] = "unmetered"
    link_budget_mb_per_day: float | None = Field(None, gt=0)
    # Install from a delta when the server has one (the agent's default). A class whose faults
    # are about full downloads (bytes corrupted or cut in flight, a disk filling mid-download)
    # turns it off: a head-only update would otherwise arrive as a few KB that never meet the fault.
    delta_updates: bool = True

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        zone(v)  # ScheduleError (a ValueError) naming the unknown zone
        return v

    @model_validator(mode="after")
    def _skew_range(self) -> HardwareClass:
        if isinstance(self.clock_skew_s, list) and (
            len(self.clock_skew_s) != 2 or self.clock_skew_s[0] > self.clock_skew_s[1]
        ):
            raise ValueError("clock_skew_s must be one number or [low, high] with low <= high")
        return self

    @property
    def hw_id(self) -> str:
        return self.hardware_id or self.name


NGINX_MIRROR = "nginx"  # FleetSpec.mirrors: the mirror the harness serves with nginx


class FleetSpec(_Strict):
    devices: int = Field(ge=1, le=20000)
    prefix: str = Field("sim", pattern=r"^[A-Za-z0-9_-]{1,20}$")
    workload_hz: float = Field(2.0, ge=0)
    telemetry_interval: float = Field(1.0, gt=0)
    classes: list[HardwareClass] = Field(min_length=1)
    # Worker processes the devices are split over (each a fleet on its own loop); 1 = in-process.
    processes: int = Field(1, ge=1, le=64)
    # Mosquitto brokers the fleet is split over (fleet_server.shards): shard-0 .. shard-<N-1>, each
    # device on the one its id hashes to, the server on all of them. 1 = one broker, as ever.
    broker_shards: int = Field(1, ge=1, le=32)
    # Installs each fleet process lets through its heavy steps at once (fetch and verify; load and
    # acceptance check); the others wait their turn, which is not a timeout. None: all at once. A
    # thousand agents share one loop and one core, where a real device has its own: see
    # docs/decisions/0030-simulated-devices-take-turns.md.
    installs_at_once: int | None = Field(None, ge=1)

    @property
    def shard_names(self) -> list[str]:
        return [f"shard-{i}" for i in range(self.broker_shards)]

    # Static delivery: the mirrors every device downloads from, in order. "nginx" is an nginx the
    # harness starts over the fleet server's published mirror directory (edgefleet.nginx); any other
    # entry is a base URL. Empty: devices download from the fleet server (through the fault proxy).
    mirrors: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _mirror_urls(self) -> FleetSpec:
        from device_agent.mirrors import check_mirrors

        check_mirrors([m for m in self.mirrors if m != NGINX_MIRROR])
        if self.mirrors.count(NGINX_MIRROR) > 1:
            raise ValueError("the nginx mirror is listed twice")
        return self


class ModelSpec(_Strict):
    """A model the harness builds and uploads: the digits classifier, or a copy that outputs NaN."""

    kind: Literal["digits", "nan"] = "digits"
    name: str = "digits"
    version: str
    hardware: list[str] | None = None  # hardware ids in the manifest; default: every class's
    # Its true accuracy as the label source sees it: the share of its predictions the labels
    # confirm (the inputs are synthetic). None: its inferences are never labelled.
    accuracy: float | None = Field(None, ge=0, le=1)


class ExperimentArmSpec(_Strict):
    name: str
    model: str  # a key of [models]
    weight: float = Field(1.0, gt=0)


class LabelsSpec(_Strict):
    """The fleet's label source (``simulator.labels``): which inferences an app labels, and when.

    The delay is ``delay_s`` (one number: fixed; ``[low, high]``: uniform) or ``delay_mean_s``
    (exponential with that mean), not both.
    """

    share: float = Field(1.0, ge=0, le=1)  # of the inferences served without error
    delay_s: float | list[float] | None = None
    delay_mean_s: float | None = Field(None, ge=0)
    # with a label, the app also posts this outcome metric (POST /v1/outcomes): 1 when the label
    # confirms the prediction, else 0 (a "task succeeded" signal an app measures itself)
    outcome: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,63}$")

    @model_validator(mode="after")
    def _one_delay(self) -> LabelsSpec:
        if self.delay_s is not None and self.delay_mean_s is not None:
            raise ValueError("give delay_s (fixed or [low, high]) or delay_mean_s (exponential), not both")
        d = self.delay_s
        if isinstance(d, list) and (len(d) != 2 or not 0 <= d[0] <= d[1]):
            raise ValueError("delay_s must be one number or [low, high] with 0 <= low <= high")
        if isinstance(d, int | float) and d < 0:
            raise ValueError("delay_s must be >= 0")
        return self

    def delay(self) -> LabelDelay:
        if self.delay_mean_s is not None:
            return LabelDelay("exponential", self.delay_mean_s)
        if isinstance(self.delay_s, list):
            return LabelDelay("uniform", self.delay_s[0], self.delay_s[1])
        return LabelDelay("fixed", float(self.delay_s or 0.0))


Action = Literal[
    "rollout",
    "wait_rollout",
    "experiment",
    "wait_experiment",
    "wait_devices",
    "sleep",
    "crash",
    "power_off",
    "power_on",
    "partition",
    "heal",
    "corrupt_downloads",
    "cut_downloads",
    "restart_broker",
    "stop_broker",
    "start_broker",
    "restart_server",
    "fill_disk",
    "clock_jump",
    "set_link",
    "wait_state",
    "wait_rollout_devices",
    "operate",
]

_NEEDS: dict[str, tuple[str, ...]] = {
    "rollout": ("id", "model", "stages"),
    "wait_rollout": ("rollout", "states"),
    "experiment": ("id", "arms"),
    "wait_experiment": ("experiment", "states"),
    "wait_devices": ("model",),
    "sleep": ("seconds",),
    "crash": ("devices",),
    "power_off": ("devices",),
    "power_on": ("devices",),
    "partition": ("devices",),
    "heal": ("devices",),
    "corrupt_downloads": ("devices",),
    "cut_downloads": ("devices", "after_bytes"),
    "fill_disk": ("devices",),
    "stop_broker": ("shards",),
    "start_broker": ("shards",),
    "clock_jump": ("seconds",),
    "set_link": ("link_class",),
    "wait_state": ("state",),
    "wait_rollout_devices": ("rollout", "states"),
    "operate": ("rollout", "op"),
}
# What an ``operate`` step may do to a rollout: the operator's actions of the server's API
# (``POST /api/v1/rollouts/{id}/{op}``, docs/rollouts.md "Operations"), as the scenario plays them.
OPERATOR_OPS = ("pause", "resume", "approve", "abort", "rollback")
WHEN_STATE_ACTIONS = ("crash", "power_off", "partition", "fill_disk")
# Steps that pick devices and remember them under ``group`` for later steps.
DEVICE_ACTIONS = frozenset(
    {"crash", "power_off", "power_on", "partition", "heal", "corrupt_downloads", "cut_downloads", "fill_disk"}
)


class Step(_Strict):
    """One line of the script, run in order. Only the fields of its ``action`` may be set."""

    action: Action
    id: str | None = None  # rollout: the name later steps and expectations use
    model: str | None = None  # rollout / wait_devices: a key of [models]
    stages: list[float] | None = None
    hardware: str | None = None  # rollout selector: hardware id
    soak_seconds: float = 0.0
    device_timeout_seconds: float = 60.0
    max_error_rate: float = 0.05
    min_inferences: int = 20
    max_failure_rate: float = 0.0
    # rollout: failure class (an agent reason code, "timed_out", "*") -> retries, with backoff
    retry_limits: dict[str, int] | None = None
    retry_backoff_seconds: float | None = Field(None, ge=0)
    rate_per_minute: int | None = Field(None, ge=1)  # rollout: devices notified per minute at most
    # rollout: when only devices that could not fetch the release trip the failure gates, and the
    # retries such a device gets unless retry_limits names its class (unset: the server's default)
    delivery_action: Literal["roll_back", "pause"] | None = None
    delivery_retries: int | None = Field(None, ge=0)
    rollout: str | None = None  # wait_rollout
    states: list[str] | None = None  # wait_rollout: any of these ends the wait
    share: float = Field(1.0, gt=0, le=1)  # wait_devices: fraction of the (class's) devices
    seconds: float | None = Field(None, ge=0)
    timeout: float = Field(120.0, gt=0)
    # device faults
    devices: int | Literal["all"] | None = None  # how many devices (or "all" of the class / group)
    hw_class: str | None = None  # pick among this class only
    group: str | None = None  # name the picked devices, or (power_on/heal) act on a named group
    when_state: str | None = None  # wait until each picked device's agent reaches this state, then act
    restart_after: float | None = Field(None, ge=0)  # crash/power_off: boot a new agent after N s
    after_bytes: int | None = Field(None, ge=0)  # cut_downloads
    leave_bytes: int = Field(0, ge=0)  # fill_disk: free bytes left on the device's disk
    down_seconds: float = Field(1.0, ge=0)  # restart_broker / restart_server
    # Broker shards ([fleet] broker_shards): which ones restart_broker / stop_broker / start_broker
    # act on (restart_broker: all when unset), or (wait_devices) whose devices count.
    shards: list[str] | None = None
    kill: bool = False  # restart_broker / stop_broker: SIGKILL (nothing saved), not SIGTERM
    # rollout: the accuracy gate (docs/rollouts.md), on when max_accuracy_drop is set
    max_accuracy_drop: float | None = Field(None, ge=0, lt=1)
    accuracy_alpha: float = Field(0.05, gt=0, lt=0.5)
    min_labels: int = Field(500, ge=1)
    max_label_wait_seconds: float = Field(3600.0, ge=0)
    accuracy_action: Literal["roll_back", "pause"] = "roll_back"
    # experiment (docs/experiments.md): arms as {name, model (a key of [models]), weight}, the first
    # the control; the figure it is decided on; the guardrails as {metric, max_harm}
    arms: list[ExperimentArmSpec] | None = None
    metric: str = "accuracy"
    better: Literal["higher", "lower"] | None = None
    min_samples: int = Field(200, ge=10)
    guardrails: list[dict[str, Any]] = Field(default_factory=list)
    auto_promote: bool = False
    experiment: str | None = None  # wait_experiment
    # rollout: a maintenance window opening this many seconds after the step runs, for
    # ``window_minutes``, written in each class's own time zone (one cohort per class); the
    # deferral cap, the metered-link rule (the policy's ``metered``) and the wait limit
    window_opens_in_s: float | None = Field(None, ge=0)
    window_minutes: int = Field(60, ge=1, le=1439)
    max_deferral_seconds: float | None = Field(None, ge=0)
    metered: dict[str, Any] | None = None
    max_wait_seconds: float | None = Field(None, gt=0)
    # clock_jump: every picked device's wall clock moves ``seconds`` on (all devices, or hw_class's)
    # set_link: the link of hw_class's devices (or all) becomes ``link_class``
    link_class: Literal["unmetered", "metered"] | None = None
    # wait_state: ``share`` of hw_class's devices (or all) report the deployment state ``state``
    state: str | None = None
    # operate: what the operator does to ``rollout`` (one of OPERATOR_OPS), e.g. resume once a
    # fault step healed the delivery path. A str checked here, so an unknown op is named. With
    # ``states``, only when the rollout is in one of them (an operator who resumes a held rollout
    # does nothing to a completed one); otherwise the step logs that and goes on.
    op: str | None = None

    @model_validator(mode="after")
    def _fields_for_action(self) -> Step:
        missing = [f for f in _NEEDS.get(self.action, ()) if getattr(self, f) is None]
        if self.action in ("power_on", "heal") and self.group is not None:
            missing = [f for f in missing if f != "devices"]
        if missing:
            raise ValueError(f"action {self.action!r} needs {', '.join(missing)}")
        if self.stages is not None:
            if not self.stages or any(not 0 < p <= 100 for p in self.stages):
                raise ValueError("stages must be percents in (0, 100]")
            if any(b <= a for a, b in zip(self.stages, self.stages[1:], strict=False)):
                raise ValueError("stages must be strictly increasing")
        if self.op is not None and self.action != "operate":
            raise ValueError("op applies to operate only")
        if self.op is not None and self.op not in OPERATOR_OPS:
            raise ValueError(f"unknown op {self.op!r}; known: {', '.join(OPERATOR_OPS)}")
        if self.when_state is not None and self.action not in WHEN_STATE_ACTIONS:
            raise ValueError("when_state applies to crash, power_off, partition and fill_disk only")
        return self


Check = Literal[
    "rollout_state",
    "devices_running",
    "ever_ran",
    "telemetry_lost",
    "failed_with",
    "stopped_by",
    "experiment_winner",
    "bytes_reported",
]


class Expectation(_Strict):
    """A check run at the end. ``expected_failure`` marks a known gap: the run passes if it fails."""

    check: Check
    rollout: str | None = None
    states: list[str] | None = None  # rollout_state
    model: str | None = None  # devices_running / ever_ran
    hw_class: str | None = None
    group: str | None = None  # only the devices a fault step named so (with hw_class: both)
    at_least: float = Field(1.0, ge=0, le=1)  # devices_running: share of the (class's) devices
    at_most: int | None = Field(None, ge=0)  # ever_ran / telemetry_lost / failed_with: device count
    at_most_stage: int | None = Field(None, ge=0)  # ever_ran: at most the devices of this stage index
    at_least_count: int | None = Field(None, ge=0)  # failed_with: at least this many
    reason: str | list[str] | None = None  # failed_with: the failure code(s) devices must report
    gate: str | None = None  # stopped_by: the gate whose decision stopped the rollout
    experiment: str | None = None  # experiment_winner
    winner: str | None = None  # experiment_winner: the arm the experiment must have proven better
    expected_failure: str | None = None
    name: str | None = None
    # "disk": the check needs the devices' real disks (tmpfs mounts, root); skipped without them.
    requires: Literal["disk"] | None = None

    @model_validator(mode="after")
    def _fields_for_check(self) -> Expectation:
        needs = {
            "rollout_state": ("rollout", "states"),
            "devices_running": ("model",),
            "ever_ran": ("model",),
            "telemetry_lost": (),
            "failed_with": ("reason",),
            "stopped_by": ("rollout", "gate"),
            "experiment_winner": ("experiment", "winner"),
            "bytes_reported": ("rollout",),
        }[self.check]
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(f"check {self.check!r} needs {', '.join(missing)}")
        if self.check == "ever_ran" and self.at_most is None and self.at_most_stage is None:
            raise ValueError("check 'ever_ran' needs at_most or at_most_stage (with rollout)")
        if self.at_most_stage is not None and self.rollout is None:
            raise ValueError("at_most_stage needs the rollout whose stage it means")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [self.check] + [
            f"{k}={readable(v)}"
            for k, v in self.model_dump(exclude_none=True).items()
            if k not in ("check", "expected_failure", "name", "requires")
            and not (k == "at_least" and v == 1.0)
        ]
        return " ".join(parts)


class Scenario(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    time_limit: float = Field(300.0, gt=0)  # the whole run, setup included
    tick_interval: float = Field(0.2, gt=0)  # the server's rollout engine
    fleet: FleetSpec
    network: dict[str, NetworkSpec] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(min_length=1)
    labels: LabelsSpec | None = None
    steps: list[Step] = Field(min_length=1)
    expect: list[Expectation] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        classes = {c.name for c in self.fleet.classes}
        if len(classes) != len(self.fleet.classes):
            raise ValueError("fleet.classes: duplicate class names")
        for c in self.fleet.classes:
            if c.network != "ideal" and c.network not in self.network:
                raise ValueError(
                    f"class {c.name}: unknown network {c.network!r} (define [network.{c.network}])"
                )
            for m in c.fails_models:
                if m not in self.models:
                    raise ValueError(f"class {c.name}: fails_models names unknown model {m!r}")
        accurate = [k for k, m in self.models.items() if m.accuracy is not None]
        if self.labels is not None and not accurate:
            raise ValueError("[labels] labels only models with an accuracy: give one a value")
        if self.labels is None and accurate:
            raise ValueError(f"models {accurate} have an accuracy but no [labels] table posts labels")
        disk_classes = {c.name for c in self.fleet.classes if c.disk_mb is not None}
        rollouts: set[str] = set()
        experiments: set[str] = set()
        groups: set[str] = set()
        for n, s in enumerate(self.steps):
            where = f"steps[{n}] ({s.action})"
            if s.model is not None and s.model not in self.models:
                raise ValueError(f"{where}: unknown model {s.model!r}")
            if s.hw_class is not None and s.hw_class not in classes:
                raise ValueError(f"{where}: unknown hw_class {s.hw_class!r}")
            if s.action == "rollout":
                assert s.id is not None
                if s.id in rollouts:
                    raise ValueError(f"{where}: rollout id {s.id!r} used twice")
                rollouts.add(s.id)
            if s.action == "experiment":
                assert s.id is not None and s.arms is not None
                if s.id in experiments:
                    raise ValueError(f"{where}: experiment id {s.id!r} used twice")
                experiments.add(s.id)
                for arm in s.arms:
                    if arm.model not in self.models:
                        raise ValueError(f"{where}: arm {arm.name}: unknown model {arm.model!r}")
            if s.experiment is not None and s.experiment not in experiments:
                raise ValueError(f"{where}: experiment {s.experiment!r} is not started by an earlier step")
            if s.rollout is not None and s.rollout not in rollouts:
                raise ValueError(f"{where}: rollout {s.rollout!r} is not started by an earlier step")
            if s.action in ("power_on", "heal") and s.devices is None and s.group not in groups:
                raise ValueError(f"{where}: group {s.group!r} is not named by an earlier step")
            if s.action in DEVICE_ACTIONS and s.devices is not None and s.group is not None:
                groups.add(s.group)
            if s.shards is not None:
                unknown = sorted(set(s.shards) - set(self.fleet.shard_names))
                if unknown:
                    raise ValueError(
                        f"{where}: unknown shards {unknown} (this fleet has {self.fleet.shard_names})"
                    )
                if s.action not in ("restart_broker", "stop_broker", "start_broker", "wait_devices"):
                    raise ValueError(f"{where}: shards is for the broker steps and wait_devices")
            if s.kill and s.action not in ("restart_broker", "stop_broker"):
                raise ValueError(f"{where}: kill is for restart_broker and stop_broker")
            if s.action == "fill_disk" and s.hw_class not in disk_classes:
                raise ValueError(f"{where}: fill_disk needs hw_class naming a class with disk_mb")
        for n, e in enumerate(self.expect):
            if e.rollout is not None and e.rollout not in rollouts:
                raise ValueError(f"expect[{n}]: unknown rollout {e.rollout!r}")
            if e.experiment is not None and e.experiment not in experiments:
                raise ValueError(f"expect[{n}]: unknown experiment {e.experiment!r}")
            if e.model is not None and e.model not in self.models:
                raise ValueError(f"expect[{n}]: unknown model {e.model!r}")
            if e.hw_class is not None and e.hw_class not in classes:
                raise ValueError(f"expect[{n}]: unknown hw_class {e.hw_class!r}")
            if e.group is not None and e.group not in groups:
                raise ValueError(f"expect[{n}]: group {e.group!r} is not named by a step")
        return self

    def class_counts(self) -> dict[str, int]:
        """Devices per class: shares normalised, largest remainder, every class gets >= 1 device."""
        total = sum(c.share for c in self.fleet.classes)
        n = self.fleet.devices
        raw = {c.name: c.share / total * n for c in self.fleet.classes}
        counts = {k: max(1, math.floor(v)) for k, v in raw.items()}
        order = sorted(raw, key=lambda k: raw[k] - math.floor(raw[k]), reverse=True)
        i = 0
        while sum(counts.values()) < n:
            counts[order[i % len(order)]] += 1
            i += 1
        while sum(counts.values()) > n:
            big = max(counts, key=lambda k: counts[k])
            counts[big] -= 1
        return counts


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_scenario(data: dict[str, Any], small: bool = False, source: str = "<scenario>") -> Scenario:
    data = dict(data)
    overrides = data.pop("small", {})
    if not isinstance(overrides, dict):
        raise ScenarioError(f"{source}: [small] must be a table")
    if small:
        data = _merge(data, overrides)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ScenarioError(f"{source}: invalid scenario\n" + "\n".join(lines)) from None


def load_scenario(path: Path, small: bool = False) -> Scenario:
    """Read and validate a scenario TOML file (``small``: apply its ``[small]`` overrides)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    return parse_scenario(data, small=small, source=str(path))


def skew_of(cls: HardwareClass, seed: int, n: int) -> float:
    """The clock skew of a class's device ``n``: fixed, or drawn from [low, high] (stable per seed)."""
    if not isinstance(cls.clock_skew_s, list):
        return float(cls.clock_skew_s)
    import random

    low, high = cls.clock_skew_s
    return round(random.Random(f"{seed}:{cls.name}:{n}").uniform(low, high), 3)


__all__ = [
    "OPERATOR_OPS",
    "Expectation",
    "LabelsSpec",
    "Scenario",
    "ScenarioError",
    "Step",
    "load_scenario",
    "parse_scenario",
    "skew_of",
]
