"""Run a scenario: build the fleet and its network, play the script, check the expectations.

The runner drives real parts only: real agents (:class:`simulator.fleet.Fleet`),
real proxies (:mod:`simulator.netem`), the fleet server through its HTTP API.
Starting, stopping and restarting the broker and the server is the
:class:`Harness`'s job (``edgefleet.sim_harness``), because the simulator may
not import the server (DESIGN.md's import rules).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import httpx
import numpy as np

from device_agent.config import BrokerInfo
from device_agent.http_clients import default_verify_context
from simulator.disk import DeviceDisks
from simulator.faults import ClassBehaviour
from simulator.fleet import DeviceSpec, FleetTotals
from simulator.labels import LabelPlan
from simulator.netem import HttpFaultProxy, LinkState, NetworkThread, TcpFaultProxy
from simulator.procfleet import FleetControl, FleetPlan, ProcessFleet
from simulator.readable import readable
from simulator.registry import register_devices
from simulator.scenario import NGINX_MIRROR, Expectation, Scenario, Step, skew_of
from simulator.timeline import Timeline

log = logging.getLogger(__name__)
SAMPLES_PER_S_DEVICES = 2000  # the timeline samples at most every devices / this many seconds

TERMINAL = ("completed", "rolled_back", "aborted")
STOPS = ("roll_back", "pause", "roll_back_cohort", "pause_cohort")  # decisions where a gate stopped
# The telemetry check counts once the server stored what the fleet sent: a server behind it (its
# ingest lag above DRAIN_LAG s, or a backlog) is waited for up to DRAIN_TIMEOUT s; one caught up
# that stores nothing for DRAIN_QUIET s is not. A scenario that checks no telemetry loss reads the
# stored count only as a figure, and many lose telemetry on purpose (a server restarted with a
# clean session): it waits DRAIN_QUIET_FIGURES s, not the 15 s that prove nothing more is coming:
# long enough for a stalled ingest worker to show (its lag probe goes out every second and counts
# as behind above DRAIN_LAG), so a server still behind is waited for.
DRAIN_TIMEOUT = 600.0
DRAIN_QUIET = 15.0
DRAIN_QUIET_FIGURES = 4.0
DRAIN_LAG = 2.0
DRAIN_SILENT = 120.0  # nor one that neither answers nor stores anything for this long
# How often a wait step looks again. One that asks the server (a rollout's or an experiment's
# state) does so at the timeline's default sampling interval: every ask is a request through the
# server's whole HTTP stack and database (a few ms of the server's CPU each on the 2-core VM), and
# the states waited for last until the script acts on them. One that reads the in-process fleet's
# states costs next to nothing and looks more often.
SERVER_POLL_S = 0.5
FLEET_POLL_S = 0.2


# A rollout step's policy fields sent only when the scenario sets them (unset: the server's default).
OPTIONAL_POLICY = (
    "retry_limits",
    "retry_backoff_seconds",
    "rate_per_minute",
    "delivery_action",
    "delivery_retries",
    "max_deferral_seconds",
    "metered",
    "max_wait_seconds",
)


class Harness(Protocol):
    """What the runner needs from the infrastructure (implemented in ``edgefleet.sim_harness``)."""

    server_url: str  # admin API, direct
    admin_token: str  # bearer token for the admin API
    tuf_root_path: Path | None  # devices provisioned for TUF delivery (None: DSSE-only mode)
    broker: BrokerInfo  # where the real broker listens
    trust_path: Path
    net: NetworkThread
    artifact_proxy: HttpFaultProxy  # the server's public_url points here
    model_shas: dict[str, str]  # scenario model key -> sha256 of its model file
    model_refs: dict[str, str]  # scenario model key -> "name:version"
    sample_inputs: np.ndarray | None
    mirror_url: str  # the nginx mirror over the server's published tree ("" unless the fleet asks)

    def restart_broker(
        self, down_seconds: float, shards: list[str] | None = None, kill: bool = False
    ) -> float | None: ...  # how long it was away

    def stop_brokers(self, shards: list[str], kill: bool) -> None: ...

    def start_brokers(self, shards: list[str]) -> None: ...

    def broker_of(self, device_id: str) -> BrokerInfo:
        """The broker (shard) this device connects to."""
        ...

    def shard_of(self, device_id: str) -> str: ...

    def device_credentials(self, device_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each device's agent ``mqtt_*`` keys for the broker (issued once; {} per device on an
        open broker)."""
        ...

    def restart_server(self, down_seconds: float) -> float | None: ...


class StepFailed(RuntimeError):
    """A step could not do what it says (e.g. a wait timed out); the rest of the script is skipped."""


@dataclass
class CheckResult:
    label: str
    ok: bool
    detail: str
    expected_failure: str | None = None
    skipped: str | None = None  # why the check could not run here (e.g. no real disks without root)

    @property
    def outcome(self) -> str:
        if self.skipped is not None:
            return "skip"
        if self.expected_failure is None:
            return "pass" if self.ok else "FAIL"
        return "xpass" if self.ok else "xfail"

    @property
    def counts_as_failure(self) -> bool:
        return self.skipped is None and self.expected_failure is None and not self.ok


@dataclass
class RunResult:
    scenario: str
    checks: list[CheckResult] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    step_error: str | None = None
    events: list[tuple[float, str]] = field(default_factory=list)
    started_at: float = 0.0  # epoch seconds at t = 0 of ``events`` (to line them up with server times)
    skipped: list[str] = field(default_factory=list)  # faults this machine could not inject, and why

    @property
    def ok(self) -> bool:
        return self.step_error is None and not any(c.counts_as_failure for c in self.checks)


class ScenarioRun:
    """One run of one scenario against a started :class:`Harness`."""

    def __init__(
        self,
        scenario: Scenario,
        harness: Harness,
        workdir: Path,
        sample_interval: float = 0.5,
        device_root: Path | None = None,
        processes: int | None = None,
    ):
        """``processes``: split the fleet over that many worker processes (default: the scenario's
        ``fleet.processes``); 1 runs every agent in this process."""
        self.device_root = device_root or Path(workdir) / "devices"
        self.processes = processes or scenario.fleet.processes
        self.sc = scenario
        self.h = harness
        self.workdir = Path(workdir)
        self.rng = random.Random(scenario.seed)
        self.sample_interval = sample_interval
        self.specs: list[DeviceSpec] = []
        self.class_of: dict[str, str] = {}
        self.links: dict[str, LinkState] = {}
        self.mqtt_proxies: dict[str, TcpFaultProxy] = {}
        self.rollouts: dict[str, str] = {}  # scenario id -> server id
        self.experiments: dict[str, str] = {}  # scenario id -> server id
        self.groups: dict[str, list[str]] = {}
        self.faulted: set[str] = set()  # each new fault picks devices no earlier fault touched
        self.result = RunResult(scenario.name)
        self.fleet: FleetControl | None = None
        self.totals: FleetTotals | None = None
        self.disks = DeviceDisks()
        self.disk_mb: dict[str, float] = {}  # device -> size of its own disk (classes with disk_mb)
        self.timeline: Timeline | None = None
        self._timers: list[threading.Thread] = []
        self._t0 = time.monotonic()
        self.result.started_at = time.time()
        self._api = httpx.Client(
            base_url=harness.server_url,
            timeout=10.0,
            headers={"Authorization": f"Bearer {harness.admin_token}"},
            verify=default_verify_context(),
        )

    # -- setup ----------------------------------------------------------------

    def _build_specs(self) -> None:
        counts = self.sc.class_counts()
        net = self.h.net
        for cls in self.sc.fleet.classes:
            profile = self.sc.network[cls.network].profile() if cls.network != "ideal" else None
            proxied = cls.proxied if cls.proxied is not None else profile is not None
            for i in range(counts[cls.name]):
                device_id = f"{self.sc.fleet.prefix}-{cls.name}-{i:05d}"
                if cls.disk_mb is not None:
                    self.disk_mb[device_id] = cls.disk_mb
                link = LinkState(profile=profile) if profile is not None else LinkState()
                self.links[device_id] = link
                self.h.artifact_proxy.links[device_id] = link
                broker = self.h.broker_of(device_id)
                host, port = broker.host, broker.port
                if proxied:
                    proxy = TcpFaultProxy(broker.host, broker.port, link, seed=self.sc.seed + i)
                    net.run(proxy.start())
                    self.mqtt_proxies[device_id] = proxy
                    host, port = "127.0.0.1", proxy.port
                self.class_of[device_id] = cls.name
                self.specs.append(
                    DeviceSpec(
                        device_id,
                        cls.hw_id,
                        {"sim": self.sc.name, "class": cls.name, **cls.tags},
                        hw_class=cls.name,
                        targets=tuple(cls.targets),
                        mqtt_host=host,
                        mqtt_port=port,
                        slow_inference=cls.infer_delay_ms > 0,
                        clock_skew_s=skew_of(cls, self.sc.seed, i),
                        timezone=cls.timezone,
                        link_class=cls.link_class,
                        link_budget_bytes_per_day=int((cls.link_budget_mb_per_day or 0) * 1_000_000),
                        delta_updates=cls.delta_updates,
                    )
                )

    def _class_behaviour(self) -> dict[str, ClassBehaviour]:
        out: dict[str, ClassBehaviour] = {}
        for cls in self.sc.fleet.classes:
            failing = frozenset(self.h.model_shas[m] for m in cls.fails_models)
            if failing or cls.infer_delay_ms > 0 or cls.load_delay_s > 0:
                out[cls.name] = ClassBehaviour(
                    failing_shas=failing,
                    infer_delay_s=cls.infer_delay_ms / 1000.0,
                    load_delay_s=cls.load_delay_s,
                )
        return out

    def _label_plan(self) -> LabelPlan | None:
        """The scenario's ``[labels]`` with each model's true accuracy, keyed by its sha256."""
        spec = self.sc.labels
        if spec is None:
            return None
        accuracy = {
            self.h.model_shas[k]: m.accuracy for k, m in self.sc.models.items() if m.accuracy is not None
        }
        return LabelPlan(
            share=spec.share, delay=spec.delay(), accuracy=accuracy, seed=self.sc.seed, outcome=spec.outcome
        )

    def _mount_disks(self) -> None:
        """Give each device of a ``disk_mb`` class its own tmpfs; without root, note the skip."""
        for device_id, mb in self.disk_mb.items():
            if not self.disks.mount(device_id, self.device_root / device_id, int(mb * 2**20)):
                reason = f"disk faults skipped: {self.disks.unavailable}"
                self.result.skipped.append(reason)
                self._event(reason, mark=False)
                return
        if self.disk_mb:
            self._event(f"{len(self.disks.mounted)} device disk(s) mounted (tmpfs)", mark=False)

    # -- the run --------------------------------------------------------------

    def execute(self) -> RunResult:
        """Set up, play every step, then evaluate every expectation (also after a failed step)."""
        fig = self.result.figures
        fig["devices"] = self.sc.fleet.devices
        fig["classes"] = dict(self.sc.class_counts())
        fig["processes"] = self.processes
        try:
            self._setup()
            self._play()
            try:
                self._finish()
            except Exception as exc:  # e.g. a worker process died: report what happened
                log.exception("collecting the fleet's end state failed")
                why = f"end of run: {type(exc).__name__}: {exc}"
                self.result.step_error = f"{self.result.step_error}; {why}" if self.result.step_error else why
        finally:
            self._teardown()
        return self.result

    def _setup(self) -> None:
        fig = self.result.figures
        t_setup = time.monotonic()
        self._build_specs()
        register_devices(self.h.server_url, self.specs, token=self.h.admin_token)
        self._mount_disks()
        plan = FleetPlan(
            self.specs,
            self.h.broker,
            self.h.trust_path,
            self.device_root,
            workload_hz=self.sc.fleet.workload_hz,
            sample_inputs=self.h.sample_inputs,
            telemetry_interval=self.sc.fleet.telemetry_interval,
            connect_timeout=120.0,
            tuf_root_path=self.h.tuf_root_path,
            classes=self._class_behaviour(),
            credentials=self.h.device_credentials([s.device_id for s in self.specs]),
            labels=self._label_plan(),
            mirrors=[self.h.mirror_url if m == NGINX_MIRROR else m for m in self.sc.fleet.mirrors],
            installs_at_once=self.sc.fleet.installs_at_once,
        )
        if self.processes > 1:
            self.fleet = ProcessFleet(plan, self.processes, log_dir=self.workdir)
        else:
            self.fleet = plan.build()
        self.fleet.start()
        fig["fleet_start_seconds"] = round(time.monotonic() - t_setup, 2)
        self.timeline = Timeline(self.fleet, self._api, self.rollouts, self.class_of, self._t0)
        # a sample asks the server for every device's rollout state and each worker for every
        # device's: at 10,000 devices one every 5 s, not several a second, or the observer is
        # what loads the server
        self.timeline.start(max(self.sample_interval, len(self.specs) / SAMPLES_PER_S_DEVICES))

    def _teardown(self) -> None:
        """Always: end the fleet (if _finish did not), close the proxies, unmount the device disks."""
        if self.timeline is not None:
            self.timeline.stop(final_sample=False)
        if self.fleet is not None and self.totals is None:
            with contextlib.suppress(Exception):
                self.fleet.stop()
        for proxy in self.mqtt_proxies.values():
            with contextlib.suppress(Exception):
                self.h.net.run(proxy.close(), timeout=5)
        self.mqtt_proxies.clear()
        left = self.disks.unmount_all()
        if left:
            self._event(f"could not unmount {left}", mark=False)
        self._api.close()

    def _play(self) -> None:
        """Every step in order; a failed step stops the script (the expectations are still checked)."""
        assert self.timeline is not None
        try:
            deadline = self._t0 + self.sc.time_limit
            for n, step in enumerate(self.sc.steps):
                if time.monotonic() > deadline:
                    raise StepFailed(f"time limit {self.sc.time_limit:g}s reached before step {n}")
                self._event(
                    f"step {n}: {step.action}" + (f" {step.id or step.rollout or ''}".rstrip()),
                    mark=step.action
                    in ("rollout", "restart_broker", "stop_broker", "start_broker", "restart_server"),
                )
                self._run_step(step, deadline)
        except StepFailed as exc:
            self.result.step_error = str(exc)
            self._event(f"step failed: {exc}")
        except Exception as exc:  # report, evaluate what we can, exit non-zero
            log.exception("scenario step crashed")
            self.result.step_error = f"{type(exc).__name__}: {exc}"
        finally:
            for t in self._timers:
                t.join(30)
            self.timeline.stop()

    def _finish(self) -> None:
        assert self.fleet is not None
        fleet = self.fleet
        fig = self.result.figures
        snapshot = fleet.snapshot()
        for d, st in fleet.status().items():
            if st.state == "down":
                fleet.power_on(d)  # so a clean stop flushes everyone's telemetry
        fleet.stop()
        totals = self.totals = fleet.totals()
        sent = totals.metric_total("telemetry_batches")
        counted = any(exp.check == "telemetry_lost" for exp in self.sc.expect)
        stats = self._stats_settled(sent, quiet=DRAIN_QUIET if counted else DRAIN_QUIET_FIGURES)
        fig["telemetry_batches_sent"] = sent
        fig["telemetry_batches_stored"] = stats.get("telemetry_batches")
        fig["duplicate_batches"] = stats.get("duplicate_batches")
        fig["malformed_messages"] = stats.get("malformed_messages")
        fig["lifecycle"] = dict(totals.lifecycle)
        fig["model_loads"] = totals.model_loads
        fig["workload_errors"] = totals.workload_errors
        if self.sc.labels is not None:
            fig["labels"] = dict(sorted(totals.labels.items()))
        fig["max_loop_lag_s"] = round(totals.max_loop_lag, 2)
        if self.timeline is not None:  # how far behind the server's ingest fell while the script ran
            lags = [x.ingest_lag for x in self.timeline.samples if x.ingest_lag is not None]
            fig["max_ingest_lag_s"] = round(max(lags), 1) if lags else None
        grown = sum(p["rss_per_device_kb"] * p["devices"] for p in totals.processes)
        fig["rss_per_device_kb"] = round(grown / max(1, len(self.specs)), 1)
        if len(totals.processes) > 1:
            fig["fleet_processes"] = totals.processes
        fig["corrupted_downloads"] = sum(link.corrupted for link in self.links.values())
        fig["cut_downloads"] = sum(link.cuts for link in self.links.values())
        fig["wall_seconds"] = round(time.monotonic() - self._t0, 1)
        final: dict[str, Any] = {}
        for key, rid in self.rollouts.items():
            with contextlib.suppress(httpx.HTTPError):
                final[key] = self._api.get(f"/api/v1/rollouts/{rid}").json()
        fig["rollouts"] = {k: v.get("state") for k, v in final.items()}
        fig["rollout_devices"] = {
            k: dict(Counter(str(st) for st in (v.get("devices") or {}).values())) for k, v in final.items()
        }
        experiments: dict[str, Any] = {}
        for key in self.experiments:
            got = self._get_experiment(key)
            if got is not None:
                experiments[key] = got
        if experiments:
            fig["experiments"] = {k: _experiment_figures(v) for k, v in experiments.items()}
        for exp in self.sc.expect:
            if exp.check == "experiment_winner":
                self.result.checks.append(self._check_experiment(exp, experiments))
            else:
                self.result.checks.append(self._check(exp, snapshot, final, sent, stats))

    def _stats_settled(
        self, sent: int, timeout: float = DRAIN_TIMEOUT, quiet: float = DRAIN_QUIET
    ) -> dict[str, Any]:
        """Server ingest counters, once the stored batches reach ``sent``.

        A server behind the fleet (starved of CPU, say) still has batches waiting for it in the
        broker's queue when the fleet stops: it is waited for while it says so (its ingest lag or
        backlog, ``/api/v1/stats``) or stores more, up to ``timeout``. One that is caught up and
        stored nothing for ``quiet`` seconds is not: what it lacks then is lost. The figures say
        how far behind it was when the fleet stopped and how long it took to catch up."""
        t0 = time.monotonic()
        deadline, moved = t0 + timeout, t0
        last: dict[str, Any] = {}
        first: int | None = None
        while time.monotonic() < deadline and time.monotonic() - moved < DRAIN_SILENT:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                reply = self._api.get("/api/v1/stats")
                reply.raise_for_status()
                stats = dict(reply.json())
                stored = int(stats["telemetry_batches"])
                if first is None or stored != int(last["telemetry_batches"]):
                    moved = time.monotonic()
                    first = stored if first is None else first
                last = stats
                if stored >= sent:
                    break
                behind = (
                    float(stats.get("ingest_lag_seconds", 0.0)) > DRAIN_LAG
                    or int(stats.get("ingest_backlog_messages", 0)) > 0
                )
                if not behind and time.monotonic() - moved > quiet:
                    break
                if behind:
                    moved = max(moved, time.monotonic() - quiet)  # waiting on a server that says it is behind
            time.sleep(0.25)
        fig = self.result.figures
        fig["telemetry_stored_when_fleet_stopped"] = first
        fig["telemetry_drain_s"] = round(time.monotonic() - t0, 1)
        return last

    def _event(self, what: str, mark: bool = True) -> None:
        """Log an event; ``mark`` also draws it on the timeline (faults and outcomes, not waits)."""
        t = round(time.monotonic() - self._t0, 2)
        self.result.events.append((t, what))
        if mark and self.timeline is not None:
            self.timeline.mark(t, what)
        log.info("[%6.1fs] %s", t, what)

    # -- steps ----------------------------------------------------------------

    def _run_step(self, s: Step, deadline: float) -> None:
        timeout_at = min(deadline, time.monotonic() + s.timeout)
        if s.action == "rollout":
            self._start_rollout(s)
        elif s.action == "wait_rollout":
            assert s.rollout is not None and s.states is not None
            self._wait_rollout(s.rollout, s.states, timeout_at)
        elif s.action == "experiment":
            self._start_experiment(s)
        elif s.action == "wait_experiment":
            assert s.experiment is not None and s.states is not None
            self._wait_experiment(s.experiment, s.states, timeout_at)
        elif s.action == "wait_devices":
            self._wait_devices(s, timeout_at)
        elif s.action == "sleep":
            assert s.seconds is not None
            time.sleep(max(0.0, min(s.seconds, deadline - time.monotonic())))
        elif s.action == "clock_jump":
            assert self.fleet is not None and s.seconds is not None
            for d in self._members(s.hw_class):
                self.fleet.clock_jump(d, s.seconds)
            self._event(f"clocks of {s.hw_class or 'every device'} jump {s.seconds:g} s on")
        elif s.action == "set_link":
            assert self.fleet is not None and s.link_class is not None
            for d in self._members(s.hw_class):
                self.fleet.set_link(d, s.link_class)
            self._event(f"link of {s.hw_class or 'every device'}: {s.link_class}")
        elif s.action == "wait_state":
            self._wait_state(s, timeout_at)
        elif s.action == "wait_rollout_devices":
            self._wait_rollout_devices(s, timeout_at)
        elif s.action == "operate":
            self._operate(s)
        elif s.action == "restart_broker":
            away = self.h.restart_broker(s.down_seconds, s.shards, s.kill)
            which = f"broker {','.join(s.shards)}" if s.shards else "broker"
            self._event(f"{which} back" + (f" (away {away:.1f} s)" if away is not None else ""))
        elif s.action == "stop_broker":
            assert s.shards is not None
            self.h.stop_brokers(s.shards, s.kill)
            self._event(f"broker {','.join(s.shards)} {'killed' if s.kill else 'stopped'}")
        elif s.action == "start_broker":
            assert s.shards is not None
            self.h.start_brokers(s.shards)
            self._event(f"broker {','.join(s.shards)} back")
        elif s.action == "restart_server":
            away = self.h.restart_server(s.down_seconds)
            self._event("server back" + (f" (away {away:.1f} s)" if away is not None else ""))
        else:
            self._device_fault(s, timeout_at)

    def _start_rollout(self, s: Step) -> None:
        assert s.id is not None and s.model is not None and s.stages is not None
        body: dict[str, Any] = {
            "model": self.h.model_refs[s.model],
            "selector": {"hardware_id": s.hardware} if s.hardware else {},
            "stages": s.stages,
            "soak_seconds": s.soak_seconds,
            "device_timeout_seconds": s.device_timeout_seconds,
            "max_error_rate": s.max_error_rate,
            "min_inferences": s.min_inferences,
            "max_failure_rate": s.max_failure_rate,
        }
        body.update({k: getattr(s, k) for k in OPTIONAL_POLICY if getattr(s, k) is not None})
        body.update(self._schedule_policy(s))
        if s.max_accuracy_drop is not None:
            body.update(
                max_accuracy_drop=s.max_accuracy_drop,
                accuracy_alpha=s.accuracy_alpha,
                min_labels=s.min_labels,
                max_label_wait_seconds=s.max_label_wait_seconds,
                accuracy_action=s.accuracy_action,
            )
        # creating it inserts a row per targeted device and answers with every one of them:
        # seconds at 10,000 devices on a loaded machine, past the client's usual 10 s
        resp = self._api.post("/api/v1/rollouts", json=body, timeout=max(10.0, len(self.specs) / 50))
        if resp.status_code >= 400:
            raise StepFailed(f"rollout {s.id}: server answered {resp.status_code}: {resp.text[:300]}")
        self.rollouts[s.id] = str(resp.json()["id"])

    def _start_experiment(self, s: Step) -> None:
        assert s.id is not None and s.arms is not None
        body: dict[str, Any] = {
            "name": s.id,
            "selector": {"hardware_id": s.hardware} if s.hardware else {},
            "arms": [
                {"name": a.name, "model": self.h.model_refs[a.model], "weight": a.weight} for a in s.arms
            ],
            "metric": s.metric,
            "min_samples": s.min_samples,
            "guardrails": s.guardrails,
            "auto_promote": s.auto_promote,
            "policy": {
                "soak_seconds": s.soak_seconds,
                "device_timeout_seconds": s.device_timeout_seconds,
                "max_error_rate": s.max_error_rate,
                "min_inferences": s.min_inferences,
                "max_failure_rate": s.max_failure_rate,
            },
        }
        if s.better is not None:
            body["better"] = s.better
        resp = self._api.post("/api/v1/experiments", json=body)
        if resp.status_code >= 400:
            raise StepFailed(f"experiment {s.id}: server answered {resp.status_code}: {resp.text[:300]}")
        self.experiments[s.id] = str(resp.json()["id"])
        self._event(
            f"experiment {s.id}: " + ", ".join(f"{a['name']} {a['devices']}" for a in resp.json()["arms"])
        )

    def _get_experiment(self, key: str) -> dict[str, Any] | None:
        try:
            resp = self._api.get(f"/api/v1/experiments/{self.experiments[key]}")
        except httpx.HTTPError:
            return None  # server restarting: try again
        return dict(resp.json()) if resp.status_code == 200 else None

    def _wait_experiment(self, key: str, states: list[str], timeout_at: float) -> None:
        """Until the experiment is in one of ``states`` (``decided``: a winner is recorded)."""
        last = None
        while time.monotonic() < timeout_at:
            status = self._get_experiment(key)
            if status is not None:
                last = status.get("state")
                decided = any(d.get("action") == "winner" for d in status.get("decisions", []))
                if last in states or ("decided" in states and decided):
                    self._event(f"experiment {key}: {last}, winner {status.get('winner')}")
                    return
            time.sleep(SERVER_POLL_S)
        raise StepFailed(f"experiment {key} did not reach {states} in time (last state: {last})")

    def _schedule_policy(self, s: Step) -> dict[str, Any]:
        """The rollout's windows: one cohort per class, in its time zone."""
        out: dict[str, Any] = {}
        if s.window_opens_in_s is not None:
            opens = datetime.now(UTC) + timedelta(seconds=s.window_opens_in_s)
            opens = opens.replace(second=0, microsecond=0) + timedelta(minutes=1)  # whole minutes, not sooner
            closes = opens + timedelta(minutes=s.window_minutes)
            every_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            out["cohorts"] = [
                {
                    "hardware_id": cls.hw_id,
                    "windows": [
                        {
                            "days": every_day,
                            "start": opens.astimezone(ZoneInfo(cls.timezone)).strftime("%H:%M"),
                            "end": closes.astimezone(ZoneInfo(cls.timezone)).strftime("%H:%M"),
                        }
                    ],
                }
                for cls in self.sc.fleet.classes
            ]
            self._event(f"window opens {opens:%H:%M} UTC in each device's own zone", mark=False)
        return out

    def _wait_state(self, s: Step, timeout_at: float) -> None:
        """``share`` of the (class's) devices report deployment state ``s.state`` (e.g. ``staged``)."""
        assert self.fleet is not None and s.state is not None
        members = self._members(s.hw_class)
        need = math.ceil(s.share * len(members))
        have = 0
        while time.monotonic() < timeout_at:
            have = sum(1 for st in self.fleet.status(members).values() if st.state == s.state)
            if have >= need:
                self._event(f"{have} device(s) {s.state}")
                return
            time.sleep(FLEET_POLL_S)
        raise StepFailed(f"only {have} of {need} devices reached {s.state!r} in time")

    def _wait_rollout_devices(self, s: Step, timeout_at: float) -> None:
        """``share`` of the (class's) devices are in one of ``s.states`` in the rollout, by the server."""
        assert s.rollout is not None and s.states is not None
        members = set(self._members(s.hw_class))
        need = math.ceil(s.share * len(members))
        have = 0
        while time.monotonic() < timeout_at:
            status = self._get_rollout(s.rollout)
            if status is not None:
                devices = status.get("devices") or {}
                have = sum(1 for d, st in devices.items() if d in members and st in s.states)
                if have >= need:
                    self._event(f"rollout {s.rollout}: {have} device(s) {'/'.join(s.states)}")
                    return
            time.sleep(SERVER_POLL_S)
        raise StepFailed(f"rollout {s.rollout}: only {have} of {need} devices {s.states} in time")

    def _operate(self, s: Step) -> None:
        """The operator acts on the rollout through the server's API, as ``edgefleet rollouts {op}``
        does: the server answers with the rollout, and a refusal (409: not allowed in its state)
        fails the step with the server's word for it."""
        assert s.rollout is not None and s.op is not None
        before = self._get_rollout(s.rollout, devices=False) or {}
        if s.states is not None and before.get("state") not in s.states:
            self._event(
                f"operator: no {s.op} of rollout {s.rollout}: it is {before.get('state')}, not {s.states}"
            )
            return
        seen = len(before.get("decisions") or [])
        resp = self._api.post(f"/api/v1/rollouts/{self.rollouts[s.rollout]}/{s.op}")
        if resp.status_code == 409 and s.states is not None:  # it moved on between the read and the act
            self._event(f"operator: no {s.op} of rollout {s.rollout}: refused ({resp.text[:200]})")
            return
        if resp.status_code >= 400:
            raise StepFailed(
                f"rollout {s.rollout}: {s.op}: server answered {resp.status_code}: {resp.text[:300]}"
            )
        status = resp.json()
        # what the action wrote (a repeat is a no-op and writes nothing), e.g. how many devices a
        # resume after a delivery hold sends the release again
        wrote = [
            d.get("reason")
            for d in (status.get("decisions") or [])[seen:]
            if d.get("action") in (s.op, f"{s.op}_requested")
        ]
        said = f": {wrote[-1]}" if wrote else ""
        self._event(f"operator: {s.op} rollout {s.rollout} -> {status.get('state')}{said}")

    def _get_rollout(self, key: str, devices: bool = True) -> dict[str, Any] | None:
        """The rollout's status; ``devices=False``: without the per-device maps (a wait polls it
        several times a second, and at 10,000 devices the maps were most of the server's cost)."""
        try:
            params = {} if devices else {"devices": "false"}
            resp = self._api.get(f"/api/v1/rollouts/{self.rollouts[key]}", params=params)
        except httpx.HTTPError:
            return None  # server restarting: try again
        return dict(resp.json()) if resp.status_code == 200 else None

    def _wait_rollout(self, key: str, states: list[str], timeout_at: float) -> None:
        last = None
        while time.monotonic() < timeout_at:
            status = self._get_rollout(key, devices=False)
            if status is not None:
                last = status.get("state")
                if last in states:
                    self._event(f"rollout {key}: {last}")
                    return
            time.sleep(SERVER_POLL_S)
        raise StepFailed(f"rollout {key} did not reach {states} in time (last state: {last})")

    def _members(self, hw_class: str | None) -> list[str]:
        return [s.device_id for s in self.specs if hw_class is None or s.hw_class == hw_class]

    def _wait_devices(self, s: Step, timeout_at: float) -> None:
        assert self.fleet is not None and s.model is not None
        sha = self.h.model_shas[s.model]
        members = self._members(s.hw_class)
        if s.shards is not None:
            members = [d for d in members if self.h.shard_of(d) in s.shards]
        need = math.ceil(s.share * len(members))
        have = 0
        while time.monotonic() < timeout_at:
            have = sum(1 for st in self.fleet.status(members).values() if st.running == sha)
            if have >= need:
                return
            time.sleep(FLEET_POLL_S)
        raise StepFailed(f"only {have} of {need} devices run {s.model} in time")

    def _pick(self, s: Step) -> list[str]:
        assert self.fleet is not None
        if s.group is not None and s.devices is None:
            return list(self.groups[s.group])
        pool = self._members(s.hw_class)
        down = {d for d, st in self.fleet.status(pool).items() if st.state == "down"}
        if s.action in ("crash", "power_off", "partition", "corrupt_downloads", "cut_downloads"):
            pool = [d for d in pool if d not in down]
        if s.action == "fill_disk":
            pool = [d for d in pool if d in self.disks.mounted]
        if s.action == "power_on":
            pool = [d for d in pool if d in down]
        elif s.action == "heal":
            pool = [d for d in pool if self.links[d].partitioned]
        else:
            pool = [d for d in pool if d not in self.faulted]
        if s.action in ("partition", "heal"):
            pool = [d for d in pool if d in self.mqtt_proxies]
            if not pool:
                raise StepFailed(f"{s.action}: no device behind a fault proxy (give the class a network)")
        if s.devices == "all":
            return pool
        assert isinstance(s.devices, int)
        if s.when_state is not None:
            return pool  # the trigger picks the first devices to reach the state
        if s.devices > len(pool):
            raise StepFailed(f"{s.action}: wants {s.devices} devices, only {len(pool)} available")
        return sorted(self.rng.sample(pool, s.devices))

    def _device_fault(self, s: Step, timeout_at: float) -> None:
        assert self.fleet is not None
        if s.action == "fill_disk" and self.disks.unavailable is not None:
            self._event(f"{s.action} skipped: {self.disks.unavailable}")
            return
        picked = self._pick(s)
        if s.when_state is not None:
            want = len(picked) if s.devices == "all" else int(s.devices or 0)
            picked = self._when_state(picked, s, want, timeout_at)
        else:
            for d in picked:
                self._apply(s, d)
        self.faulted.update(picked)
        if s.group is not None and s.devices is not None:
            self.groups[s.group] = picked
        what = f"{s.action} x{len(picked)}" + (f" at {s.when_state}" if s.when_state else "")
        self._event(what + (f" ({', '.join(picked)})" if 0 < len(picked) <= 3 else ""))
        if s.restart_after is not None and s.action in ("crash", "power_off"):
            timer = threading.Thread(
                target=self._reboot_later, args=(picked, s.restart_after), daemon=True, name="sim-reboot"
            )
            timer.start()
            self._timers.append(timer)

    def _when_state(self, pool: list[str], s: Step, want: int, timeout_at: float) -> list[str]:
        """Hit each device the moment its agent reports ``when_state``, until ``want`` were hit."""
        assert self.fleet is not None
        hit: list[str] = []
        while len(hit) < want:
            if time.monotonic() > timeout_at:
                raise StepFailed(f"{s.action}: only {len(hit)} of {want} devices reached {s.when_state!r}")
            waiting = [d for d in pool if d not in hit]
            for d, st in self.fleet.status(waiting).items():
                if st.state != s.when_state:
                    continue
                if s.action == "fill_disk" and s.when_state == "downloading" and not self._writing(d):
                    continue  # the agent reports "downloading" before its free-space check, too
                # crash / power_off re-check the state on the fleet's loop: a device that moved on
                # since this poll is not hit (it would not be "mid-download" any more)
                if self._apply(s, d, only_in_state=s.when_state):
                    hit.append(d)
                    if len(hit) >= want:
                        break
            time.sleep(0.005)
        return hit

    def _writing(self, device_id: str) -> bool:
        """The device has begun writing a model download (a ``.part`` file in one of its slots)."""
        return any((self.device_root / device_id / "slots").glob("*/*.part"))

    def _apply(self, s: Step, device_id: str, only_in_state: str | None = None) -> bool:
        """Inject the step's fault into one device; False when ``only_in_state`` no longer held."""
        assert self.fleet is not None
        link = self.links[device_id]
        if s.action == "crash":
            return self.fleet.crash(device_id, only_in_state)
        elif s.action == "power_off":
            return self.fleet.power_off(device_id, only_in_state)
        elif s.action == "fill_disk":
            self.disks.fill(device_id, s.leave_bytes)
        elif s.action == "power_on":
            self.fleet.power_on(device_id)
        elif s.action == "partition":
            self.h.net.call(link.partition)
        elif s.action == "heal":
            self.h.net.call(link.heal)
        elif s.action == "corrupt_downloads":
            link.corrupt_downloads += 1
        elif s.action == "cut_downloads":
            link.cut_downloads_after = s.after_bytes
        return True

    def _reboot_later(self, devices: list[str], delay: float) -> None:
        assert self.fleet is not None
        time.sleep(delay)
        for d in devices:
            try:
                self.fleet.power_on(d)
            except Exception as exc:  # reported as a failed reboot, the run goes on
                self._event(f"power_on {d} failed: {exc}")
        self._event(f"power_on x{len(devices)} (reboot)")

    # -- expectations ---------------------------------------------------------

    def _check(
        self,
        e: Expectation,
        snapshot: dict[str, dict[str, Any]],
        rollouts: dict[str, Any],
        sent: int,
        stats: dict[str, Any],
    ) -> CheckResult:
        members = self._members(e.hw_class)
        if e.group is not None:
            named = set(self.groups.get(e.group, []))
            members = [d for d in members if d in named]
        ok, detail = False, ""
        if e.requires == "disk" and self.disks.unavailable is not None:
            why = self.disks.unavailable
            return CheckResult(e.label, False, "not checked", e.expected_failure, skipped=why)
        if e.check == "rollout_state":
            assert e.rollout is not None and e.states is not None
            state = rollouts.get(e.rollout, {}).get("state")
            ok, detail = state in e.states, f"state {state}"
        elif e.check == "devices_running":
            assert e.model is not None
            sha = self.h.model_shas[e.model]
            n = sum(1 for d in members if snapshot[d]["running"] == sha)
            ok = n >= math.ceil(e.at_least * len(members))
            detail = f"{n}/{len(members)} run {e.model}"
        elif e.check == "ever_ran":
            assert e.model is not None
            sha = self.h.model_shas[e.model]
            n = sum(1 for d in members if sha in snapshot[d]["ever_ran"])
            limit = e.at_most
            if e.at_most_stage is not None:
                assert e.rollout is not None
                stages = rollouts.get(e.rollout, {}).get("stages", [])
                stage_limit = (
                    stages[e.at_most_stage].get("target_count") if len(stages) > e.at_most_stage else None
                )
                limit = stage_limit if limit is None or stage_limit is None else min(limit, stage_limit)
            ok = limit is not None and n <= limit
            detail = f"{n} device(s) ever ran {e.model} (limit {limit})"
        elif e.check == "telemetry_lost":
            stored = int(stats.get("telemetry_batches", 0))
            lost = max(0, sent - stored)
            ok = lost <= (e.at_most or 0)
            detail = f"{sent} batches sent, {stored} stored, {lost} lost"
        elif e.check == "failed_with":
            assert e.reason is not None
            reasons: Counter[str] = Counter()
            for d in members:
                for key, n in self._fleet_failures(d).items():
                    reasons[key] += n
            wanted = [e.reason] if isinstance(e.reason, str) else list(e.reason)
            n = sum(reasons.get(r, 0) for r in wanted)
            low = e.at_least_count if e.at_least_count is not None else 1
            ok = n >= low and (e.at_most is None or n <= e.at_most)
            detail = f"{n} failure(s) {' or '.join(wanted)}; all: {readable(dict(reasons))}"
        elif e.check == "bytes_reported":
            assert e.rollout is not None
            status = rollouts.get(e.rollout, {})
            delivery = status.get("delivery") or {}
            installs, total = int(delivery.get("installs") or 0), int(delivery.get("bytes_fetched") or 0)
            assigned = sum(1 for st in (status.get("devices") or {}).values() if st != "pending")
            ok = installs >= assigned > 0 and total > 0
            detail = f"{total} bytes over {installs} installs ({delivery.get('bytes_per_install')} each)"
        elif e.check == "stopped_by":
            assert e.rollout is not None
            decisions = rollouts.get(e.rollout, {}).get("decisions") or []
            stops = [d for d in decisions if d.get("action") in STOPS]
            if stops:
                gate = (stops[-1].get("figures") or {}).get("gate")
                ok = gate == e.gate
                detail = f"{stops[-1]['action']} by {gate}: {stops[-1].get('reason')}"
            else:
                detail = "no gate stopped it"
        return CheckResult(e.label, ok, detail, e.expected_failure)

    def _check_experiment(self, e: Expectation, experiments: dict[str, Any]) -> CheckResult:
        assert e.experiment is not None
        got = experiments.get(e.experiment) or {}
        winner = got.get("winner")
        return CheckResult(
            e.label, winner == e.winner, f"winner {winner}: {got.get('verdict')}", e.expected_failure
        )

    def _fleet_failures(self, device_id: str) -> Counter[str]:
        """``failed_<code>`` counters of every agent this device ran (reboots included)."""
        assert self.totals is not None
        out: Counter[str] = Counter()
        for key, n in self.totals.device_metrics.get(device_id, {}).items():
            if key.startswith("failed_") and key != "failed_directives":
                out[key.removeprefix("failed_")] += n
        return out


__all__ = ["CheckResult", "Harness", "RunResult", "ScenarioRun", "StepFailed"]


def _experiment_figures(status: dict[str, Any]) -> dict[str, Any]:
    """What a report shows of an experiment: state, winner, and per arm its devices, figures and
    effects against the control (rounded)."""

    def r(v: Any) -> Any:
        return round(v, 4) if isinstance(v, float) else v

    return {
        "state": status.get("state"),
        "winner": status.get("winner"),
        "arms": {
            a["name"]: {
                "model": a["model"],
                "devices": a["devices"],
                "state": a["state"],
                "metrics": {
                    k: {"value": r(m["value"]), "samples": m["samples"]} for k, m in a["metrics"].items()
                },
                "effects": {
                    e["metric"]: {
                        "estimate": r(e["estimate"]),
                        "lower": r(e["lower"]),
                        "upper": r(e["upper"]),
                        "verdict": e["verdict"],
                    }
                    for e in a["effects"]
                },
            }
            for a in status.get("arms", [])
        },
    }
