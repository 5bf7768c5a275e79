"""Run N real :class:`device_agent.agent.Agent` instances on ONE asyncio loop in a background thread.

Each agent has its own MQTT identity (client id, and on a production broker its
own credentials: ``credentials``), data dir, slots and state: only the loop,
the loaded ONNX sessions and the TLS contexts that hold nothing per device
(``simulator.tls``) are shared. Sharing sessions
(:class:`SharedRuntimeFactory`, keyed by sha256) is what keeps hundreds of
devices in one process affordable (a session costs 16-45 MB RSS). Agents
connect in batches because the broker's listen backlog is ~100.

Devices can be taken down and brought back while the fleet runs, the way
real devices fail: :meth:`Fleet.power_off` is a clean shutdown,
:meth:`Fleet.crash` pulls the plug (tasks cancelled where they stand, the
socket dropped without an MQTT DISCONNECT, nothing flushed), and
:meth:`Fleet.power_on` boots a *new* Agent on the same data dir, which is the
agent's crash-recovery path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import heapq
import logging
import os
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from device_agent.agent import Agent, NoModelError
from device_agent.clock import SkewedClock
from device_agent.config import BrokerInfo
from device_agent.runtime import RuntimeFactory, SharedRuntimeFactory
from signing.trust import TrustRoot
from simulator.gc_clock import GcClock
from simulator.labels import LabelPlan, LabelSource, top1
from simulator.memory import peak_rss_bytes, rss_bytes
from simulator.tls import SimAgentConfig

CONNECT_BATCH = 100
WORKLOAD_TICK = 0.05  # s: the workload's schedule wakes at most this often (devices due are run together)
# A device more than this far behind its schedule (a stalled loop) skips what it missed instead of
# bursting; within it, a device due several times in one pass runs each (a period shorter than
# WORKLOAD_TICK keeps its rate).
WORKLOAD_CATCH_UP = 1.0  # s
# a device's random rows of ``sample_inputs`` are drawn this many at a time: one numpy call per
# draw costs about as much as the rest of the simulator's share of an inference
ROW_DRAWS = 64
# Threads of the fleet's loop for what agents run off it (a model's load, a file's hash, a slow
# inference, a connect): one per device, up to this many. asyncio's default, min(32, cores + 4),
# made devices that each wait on their own (a slow load is a sleep in the simulator) queue six
# at a time on a 2-core machine.
EXECUTOR_THREADS = 64
log = logging.getLogger(__name__)
_T = TypeVar("_T")


def start_timeout(devices: int, connect_timeout: float) -> float:
    """How long a fleet of ``devices`` may take to start: each batch of ``CONNECT_BATCH`` has
    ``connect_timeout`` to connect, the batches go one after the other (a fixed bound for the
    whole fleet failed 1,000-device workers on a loaded machine while every batch was in time)."""
    return connect_timeout * max(1, -(-devices // CONNECT_BATCH)) + 30


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device. ``hw_class`` picks a runtime from ``Fleet(class_runtimes=...)``;
    ``mqtt_host``/``mqtt_port`` override the broker address (a fault proxy in front of it)."""

    device_id: str
    hardware_id: str
    tags: dict[str, str] = field(default_factory=dict)
    hw_class: str = ""
    targets: tuple[str, ...] = ()
    mqtt_host: str | None = None
    mqtt_port: int | None = None
    start_online: bool = True
    slow_inference: bool = False  # run the workload's inferences off the loop (the model sleeps)
    clock_skew_s: float = 0.0  # the device's clock runs this far ahead (+) or behind (-) of true time
    timezone: str = "UTC"  # IANA name: its maintenance windows are read in it
    link_class: str = "unmetered"  # "metered" (cellular): a rollout's metered rule applies to it
    link_budget_bytes_per_day: int = 0  # its own daily budget on a metered link (0: none)
    schedule_poll_s: float = 0.5  # how often a waiting directive re-reads the clock (fast for scenarios)
    delta_updates: bool = True  # install from a delta when the server has one


class DeviceStatus(NamedTuple):
    """What a scenario polls: ``state`` is ``down``, ``disconnected`` or the agent's deployment state."""

    state: str
    running: str | None  # sha256 of the model served now (None when down)


@dataclass
class FleetTotals:
    """A fleet's counters (reboots included) and its process's memory, read after ``stop()``."""

    device_metrics: dict[str, dict[str, int]]  # device -> agent counters summed over its reboots
    lifecycle: dict[str, int]
    model_loads: int
    workload_errors: int
    max_loop_lag: float
    processes: list[dict[str, Any]]  # per process: pid, devices, rss_mb, peak_rss_mb, rss_per_device_kb
    labels: dict[str, int] = field(default_factory=dict)  # label source: agents' answers by status

    def metric_total(self, key: str) -> int:
        return sum(m.get(key, 0) for m in self.device_metrics.values())


class Fleet:
    """A simulated fleet. ``start()`` returns once every online agent is connected; ``stop()`` ends all."""

    def __init__(
        self,
        specs: list[DeviceSpec],
        broker: BrokerInfo,
        trust_path: Path,
        data_root: Path,
        workload_hz: float = 5.0,
        sample_inputs: np.ndarray | None = None,
        *,
        telemetry_interval: float = 5.0,
        targets: list[str] | None = None,
        connect_timeout: float = 60.0,
        class_runtimes: dict[str, RuntimeFactory] | None = None,
        runtime: SharedRuntimeFactory | None = None,
        tuf_root_path: Path | None = None,
        credentials: Mapping[str, Mapping[str, Any]] | None = None,
        labels: LabelPlan | None = None,
        mirrors: list[str] | None = None,
        installs_at_once: int | None = None,
    ) -> None:
        """``tuf_root_path``: the TUF root devices are provisioned with; every install is then
        checked against the server's release metadata (TUF mode). None: the
        DSSE-only mode (docs/decisions/0006). ``credentials``: per device, the ``mqtt_*`` keys of
        its agent configuration (TLS, its certificate or password file) for a production
        broker; a device without an entry connects as to an open development broker. ``labels``:
        the devices' apps post labels for some of their inferences (``simulator.labels``).
        ``mirrors``: base URLs of published trees every device downloads from, in order (static
        delivery); none: from the URLs each directive names (the fleet server).
        ``installs_at_once``: how many of this fleet's agents may be in an install's heavy steps
        (fetch and verify; load and acceptance check) at once; the others wait their turn
        (:class:`device_agent.ports.Admission`). None: no turns. Every agent here shares one loop
        and one core where a real device has its own: with a thousand installing at once, each
        one's connect and retry timeouts measure the others' work (docs/decisions/0030)."""
        self.clocks: dict[str, SkewedClock] = {}  # device -> its wall clock (scenarios move it)
        self.link_classes: dict[str, str] = {}  # device -> its link class, once a scenario changed it
        self.specs = list(specs)
        self.by_id = {s.device_id: s for s in self.specs}
        if len(self.by_id) != len(self.specs):
            raise ValueError("duplicate device ids in the fleet")
        self.broker = broker
        self.trust_path = Path(trust_path)
        self.tuf_root_path = Path(tuf_root_path) if tuf_root_path else None
        self.data_root = Path(data_root)
        self.workload_hz = workload_hz
        self.sample_inputs = sample_inputs
        self.telemetry_interval = telemetry_interval
        self.targets = targets or ["arm64-cpu"]
        self.connect_timeout = connect_timeout
        self.runtime = runtime or SharedRuntimeFactory()
        self.class_runtimes = dict(class_runtimes or {})
        self.credentials = {d: dict(keys) for d, keys in (credentials or {}).items()}
        self.labels = labels
        self.mirrors = list(mirrors or [])
        if installs_at_once is not None and installs_at_once < 1:
            raise ValueError("installs_at_once must be at least 1")
        self.installs_at_once = installs_at_once
        self._turns: asyncio.Semaphore | None = None  # made on the fleet's loop
        # the agents' answers to posted labels by status (matched, unknown, ...), and "dropped":
        # labels due while their device was off (its app was off too)
        self.label_counts: Counter[str] = Counter()
        # per device, labels its app has scheduled and not posted yet (on the fleet's loop only)
        self._labels_due: Counter[str] = Counter()
        self.outcome_counts: Counter[str] = Counter()
        self.agents: dict[str, Agent] = {}
        self.down: set[str] = set()  # devices powered off or crashed right now
        self.workload_errors = 0
        self.lifecycle: Counter[str] = Counter()  # crashes, power_offs, power_ons
        self.ever_ran: dict[str, set[str]] = {}  # device -> every sha it served, across restarts
        self._retired_metrics: dict[str, Counter[str]] = {}  # counters of agents replaced by a reboot
        self._trust: TrustRoot | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._workloads: list[asyncio.Task[None]] = []
        self.max_loop_lag = 0.0  # s: how late the shared loop ran a 0.1 s timer (simulator overload)
        self.rss_at_start = 0  # bytes, when start() was called (the fleet's growth is measured from here)
        self.rss_at_stop = 0  # bytes, when stop() was called (every agent still up)
        self._gc = GcClock()  # this process's collections from the end of start() to stop()
        self._froze = False  # whether start() froze the heap (and stop() unfreezes it)

    # -- lifecycle (caller's thread) ---------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("fleet already started")
        self.rss_at_start = rss_bytes()
        loop = asyncio.new_event_loop()
        default = min(32, (os.cpu_count() or 1) + 4)
        threads = max(default, min(len(self.specs), EXECUTOR_THREADS))
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgefleet-sim-io")
        )
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="edgefleet-sim", daemon=True)
        self._thread.start()
        try:
            self.run(self._start_all(), timeout=start_timeout(len(self.specs), self.connect_timeout))
        except BaseException:
            self.stop()
            raise
        # Every agent's long-lived objects (clients, sessions, stores, trust) exist now and live as
        # long as the fleet: moved out of the collector's generations, a full collection no longer
        # walks them, each one a stall of every agent's loop at once (0.6 s of CPU at 1,000 agents,
        # several seconds of wall on a loaded machine). What agents allocate from here on is
        # collected as before; only cyclic garbage of an agent a reboot replaces is kept. A heap
        # the embedding process (or a server in it) froze first is left as it is: unfreeze cannot
        # tell their objects from ours, and would undo theirs.
        self._froze = gc.get_freeze_count() == 0
        if self._froze:
            gc.freeze()
        self._gc.start()  # the collections that matter: the rollout's and the serving fleet's

    def stop(self, timeout: float = 30.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.rss_at_stop = rss_bytes()
        self._gc.stop()
        if self._froze:
            gc.unfreeze()
            self._froze = False
        if loop.is_running():
            with contextlib.suppress(Exception):
                self.run(self._stop_all(), timeout=timeout)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run a coroutine on the fleet's loop from another thread and wait for its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("fleet not started")
        fut: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- device faults (caller's thread) -------------------------------------

    def crash(self, device_id: str, only_in_state: str | None = None) -> bool:
        """Pull the plug: cancel the agent's work where it stands and drop its socket without DISCONNECT.

        ``only_in_state``: only if the agent is in that deployment state at that instant (checked on
        the fleet's loop, so the state cannot change in between). Returns whether it crashed.
        """
        return self.run(self._crash(device_id, only_in_state), timeout=10)

    def power_off(
        self, device_id: str, only_in_state: str | None = None, *, only_with_labels_due: bool = False
    ) -> bool:
        """Clean shutdown (last telemetry sent, ``offline`` published); ``only_in_state`` as for crash.

        ``only_with_labels_due``: only if the device's app has labels scheduled and not yet posted
        (checked on the fleet's loop, like ``only_in_state``): each of them is then dropped, which
        a caller can count on however late a loaded loop runs them."""
        return self.run(self._power_off(device_id, only_in_state, only_with_labels_due), timeout=15)

    def power_on(self, device_id: str, wait: bool = False) -> None:
        """Boot a new Agent on the device's data dir (restores from its slots, like a reboot)."""
        self.run(self._power_on(device_id, wait), timeout=self.connect_timeout + 10)

    def clock_jump(self, device_id: str, seconds: float) -> None:
        """Move the device's wall clock ``seconds`` on (or back): its timers do not notice, its dates do."""
        self.clocks.setdefault(device_id, SkewedClock(self.by_id[device_id].clock_skew_s)).skew_s += seconds

    def set_link(self, device_id: str, link_class: str) -> None:
        """The device's link becomes ``metered`` or ``unmetered`` (kept across its reboots)."""
        self.link_classes[device_id] = link_class
        agent = self.agents.get(device_id)
        if agent is not None and device_id not in self.down:
            self.run(self._set_link(agent, link_class), timeout=10)

    async def _set_link(self, agent: Agent, link_class: str) -> None:
        agent.set_link_class(link_class)

    # -- views ----------------------------------------------------------------

    def metric_total(self, key: str) -> int:
        """A counter summed over every agent that ever ran in this fleet (reboots included)."""
        total = sum(a.metrics.get(key, 0) for a in list(self.agents.values()))
        return total + sum(c.get(key, 0) for c in self._retired_metrics.values())

    def labels_due(self, device_id: str) -> int:
        """Labels the device's app has scheduled and not posted (nor dropped) yet."""
        return self._labels_due[device_id]

    def device_metrics(self, device_id: str) -> Counter[str]:
        """One device's agent counters, summed over its reboots."""
        out = Counter(self._retired_metrics.get(device_id, Counter()))
        agent = self.agents.get(device_id)
        if agent is not None and device_id not in self.down:
            out.update(agent.metrics)
        return out

    def status(self, devices: list[str] | None = None) -> dict[str, DeviceStatus]:
        """Each device's state now (cheap: what a scenario polls while it waits)."""
        out: dict[str, DeviceStatus] = {}
        agents = self.agents
        for device_id in devices if devices is not None else list(agents):
            agent = agents.get(device_id)
            if agent is None or device_id in self.down:
                out[device_id] = DeviceStatus("down", None)
            elif agent.link is None or not agent.link.connected:
                out[device_id] = DeviceStatus("disconnected", agent.running_sha256)
            else:
                out[device_id] = DeviceStatus(str(agent.deployment_state), agent.running_sha256)
        return out

    def totals(self) -> FleetTotals:
        """Counters of every device over its reboots, and this process's memory figures."""
        n = max(1, len(self.specs))
        rss_end = self.rss_at_stop or rss_bytes()
        return FleetTotals(
            device_metrics={d: dict(self.device_metrics(d)) for d in self.by_id},
            lifecycle=dict(self.lifecycle),
            model_loads=int(getattr(self.runtime, "loads", 0)),
            workload_errors=self.workload_errors,
            max_loop_lag=self.max_loop_lag,
            processes=[
                {
                    "pid": os.getpid(),
                    "devices": len(self.specs),
                    "rss_mb": round(rss_end / 2**20, 1),
                    "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
                    "rss_per_device_kb": round((rss_end - self.rss_at_start) / n / 1024, 1),
                    "max_loop_lag_s": round(self.max_loop_lag, 2),
                    # garbage collections while started, per generation: [count, seconds]
                    "gc": self._gc.totals(),
                    "gc_longest_s": self._gc.longest(),
                }
            ],
            labels=dict(self.label_counts),
        )

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per device: running sha, deployment state/error, swap history, inference counts."""
        out: dict[str, dict[str, Any]] = {}
        for device_id, agent in list(self.agents.items()):
            served = agent.served_ok
            up = device_id not in self.down
            # a crashed agent's store is closed: its counters were retired at the crash
            metrics = agent.metrics if up else self._retired_metrics.get(device_id, Counter())
            out[device_id] = {
                "running": agent.running_sha256 if up else None,
                "state": str(agent.deployment_state) if up else "down",
                "error": agent.deployment_error,
                "history": list(agent.history),
                "ever_ran": sorted(self.ever_ran.get(device_id, set()) | set(agent.history)),
                "served_ok": served,
                "inferences_ok": sum(served.values()),
                "inference_errors": sum(v for k, v in metrics.items() if k.startswith("inference_")),
                "connected": up and agent.link is not None and agent.link.connected,
                "hw_class": self.by_id[device_id].hw_class,
                "hardware_id": self.by_id[device_id].hardware_id,
            }
        return out

    # -- on the loop ----------------------------------------------------------

    def _make_agent(self, spec: DeviceSpec) -> Agent:
        assert self._trust is not None
        config = SimAgentConfig(
            device_id=spec.device_id,
            hardware_id=spec.hardware_id,
            data_dir=self.data_root / spec.device_id,
            trust_path=self.trust_path,
            mqtt_host=spec.mqtt_host or self.broker.host,
            mqtt_port=spec.mqtt_port or self.broker.port,
            mqtt_version=self.broker.mqtt_version,
            telemetry_interval=self.telemetry_interval,
            targets=list(spec.targets or self.targets),
            tags=dict(spec.tags),
            tuf_root_path=self.tuf_root_path,
            timezone=spec.timezone,
            link_class=self.link_classes.get(spec.device_id, spec.link_class),
            link_budget_bytes_per_day=spec.link_budget_bytes_per_day,
            schedule_poll_s=spec.schedule_poll_s,
            delta_updates=spec.delta_updates,
            mirrors=list(self.mirrors),
            **self.credentials.get(spec.device_id, {}),
        )
        runtime = self.class_runtimes.get(spec.hw_class, self.runtime)
        # Every device has its own wall clock (the agent's injectable one): skewed from the start, and
        # moved on by ``clock_jump`` (a scenario's fast-forward to a maintenance window). A reboot
        # keeps the device's clock.
        clock = self.clocks.setdefault(spec.device_id, SkewedClock(spec.clock_skew_s))
        return Agent(config, self._trust, runtime_factory=runtime, clock=clock, admission=self._turns)

    async def _start_all(self) -> None:
        self._trust = TrustRoot.load_file(self.trust_path)
        if self.installs_at_once is not None:
            self._turns = asyncio.Semaphore(self.installs_at_once)
        for spec in self.specs:
            self.agents[spec.device_id] = self._make_agent(spec)
            if not spec.start_online:
                self.down.add(spec.device_id)
        online = [self.agents[s.device_id] for s in self.specs if s.start_online]
        for i in range(0, len(online), CONNECT_BATCH):
            batch = online[i : i + CONNECT_BATCH]
            await asyncio.gather(*(a.start() for a in batch))
            ok = await asyncio.gather(*(a.wait_connected(self.connect_timeout) for a in batch))
            if not all(ok):
                missing = [a.device_id for a, c in zip(batch, ok, strict=True) if not c]
                raise TimeoutError(f"{len(missing)} agents did not connect: {missing[:5]}")
        self._workloads.append(asyncio.get_running_loop().create_task(self._lag_monitor()))
        if self.workload_hz > 0:
            self._workloads.append(asyncio.get_running_loop().create_task(self._workload()))

    async def _stop_all(self) -> None:
        for task in self._workloads:
            task.cancel()
        for task in self._workloads:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workloads = []
        up = [a for d, a in self.agents.items() if d not in self.down]
        await asyncio.gather(*(a.stop() for a in up), return_exceptions=True)

    def _retire(self, device_id: str, agent: Agent) -> None:
        self.ever_ran.setdefault(device_id, set()).update(agent.history)
        self._retired_metrics.setdefault(device_id, Counter()).update(agent.metrics)

    def _can_take_down(self, device_id: str, only_in_state: str | None) -> bool:
        if device_id in self.down:
            return False
        return only_in_state is None or str(self.agents[device_id].deployment_state) == only_in_state

    async def _crash(self, device_id: str, only_in_state: str | None = None) -> bool:
        if not self._can_take_down(device_id, only_in_state):
            return False
        agent = self.agents[device_id]
        self.down.add(device_id)
        self.lifecycle["crashes"] += 1
        self._retire(device_id, agent)  # its counters as they stand: a power cut sends nothing more
        await _pull_the_plug(agent)
        return True

    async def _power_off(
        self, device_id: str, only_in_state: str | None = None, only_with_labels_due: bool = False
    ) -> bool:
        if not self._can_take_down(device_id, only_in_state):
            return False
        if only_with_labels_due and not self._labels_due[device_id]:
            return False
        agent = self.agents[device_id]
        self.down.add(device_id)
        self.lifecycle["power_offs"] += 1
        await agent.stop()
        self._retire(device_id, agent)
        return True

    async def _power_on(self, device_id: str, wait: bool) -> None:
        if device_id not in self.down:
            return
        agent = self._make_agent(self.by_id[device_id])
        self.agents[device_id] = agent
        self.lifecycle["power_ons"] += 1
        await agent.start()
        self.down.discard(device_id)
        if wait and not await agent.wait_connected(self.connect_timeout):
            raise TimeoutError(f"{device_id} did not reconnect after power-on")

    async def _lag_monitor(self, period: float = 0.1) -> None:
        """Record how late the loop wakes up: when it lags by seconds, device-side timeouts
        (connect, read) fire because the simulator is overloaded, not because the product is slow."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(period)
            self.max_loop_lag = max(self.max_loop_lag, loop.time() - t - period)

    def set_workload_hz(self, hz: float) -> None:
        """Change every device's inference rate while the fleet runs (from any thread): e.g. to
        have a few canaries label answers as fast as a larger fleet's would. A fleet started with
        no workload (``workload_hz=0``) has none to change."""
        if hz <= 0:
            raise ValueError("the workload rate must be positive")
        if self.workload_hz <= 0:
            raise ValueError("this fleet was started without a workload")
        self.workload_hz = hz

    async def _workload(self) -> None:
        """Infer on random rows of ``sample_inputs`` at ``workload_hz`` per device, on whichever agent
        each device runs now; with a label source, a device's app labels some of the answers a
        little later.

        One task for the whole fleet walks a schedule (a heap of when each device infers next)
        and wakes at most every ``WORKLOAD_TICK``, running every device that is due: one timer
        for thousands of devices instead of a task sleeping per device (a wakeup of a sleeping
        task costs more of the loop than the tiny model's inference). Each device keeps its own
        phase (random within the period, so the fleet's inferences are spread) and its own
        random rows. The rate is read again at each device's next inference, so a change of
        ``workload_hz`` while the fleet runs (:meth:`set_workload_hz`) applies within a period."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.workload_hz
        start = loop.time()
        schedule: list[tuple[float, int]] = []
        devices: list[_WorkloadDevice] = []
        for n, spec in enumerate(self.specs):
            rng = np.random.default_rng(n)
            labels = self.labels.source(spec.device_id) if self.labels is not None else None
            devices.append(_WorkloadDevice(spec, rng, labels, []))
            schedule.append((start + rng.uniform(0, period), n))  # spread over the period
        heapq.heapify(schedule)
        slow: set[asyncio.Task[None]] = set()
        try:
            while True:
                now = loop.time()
                period = 1.0 / self.workload_hz
                while schedule and schedule[0][0] <= now:
                    due, n = heapq.heappop(schedule)
                    device = devices[n]
                    if device.spec.slow_inference:  # off the loop; due again a period after it ends
                        task = loop.create_task(self._infer_slow(device, n, schedule, period))
                        slow.add(task)
                        task.add_done_callback(slow.discard)
                        continue
                    self._infer(device)
                    nxt = due + period
                    heapq.heappush(schedule, (nxt if nxt > now - WORKLOAD_CATCH_UP else now + period, n))
                wait = schedule[0][0] - loop.time() if schedule else period
                await asyncio.sleep(max(wait, WORKLOAD_TICK))
        finally:
            for task in list(slow):
                task.cancel()

    async def _infer_slow(
        self, device: _WorkloadDevice, n: int, schedule: list[tuple[float, int]], period: float
    ) -> None:
        try:
            request = self._request(device)
            if request is not None:
                agent, x, row = request
                try:
                    self._answered(device, await asyncio.to_thread(agent.infer, x), row)
                except NoModelError:
                    pass
                except Exception:
                    log.debug("%s: the workload's inference failed", device.spec.device_id, exc_info=True)
                    self.workload_errors += 1
        finally:
            heapq.heappush(schedule, (asyncio.get_running_loop().time() + period, n))

    def _infer(self, device: _WorkloadDevice) -> None:
        """One inference of the device's workload, inline (the models are tiny)."""
        request = self._request(device)
        if request is None:
            return
        agent, x, row = request
        try:
            self._answered(device, agent.infer(x), row)
        except NoModelError:
            pass
        except Exception:
            log.debug("%s: the workload's inference failed", device.spec.device_id, exc_info=True)
            self.workload_errors += 1

    def _request(self, device: _WorkloadDevice) -> tuple[Agent, np.ndarray, int | None] | None:
        """The agent the device runs now and an input for it (None while it is down or has no model)."""
        device_id = device.spec.device_id
        agent = self.agents.get(device_id)
        model = agent.running_model if agent is not None and device_id not in self.down else None
        if agent is None or model is None:
            return None
        row: int | None = None
        if self.sample_inputs is not None and len(self.sample_inputs):
            # a random row each time, not the next one: devices walking the rows in step
            # would all see the same few inputs at once, and their labels would measure
            # a model's accuracy on those few instead of on the data
            rows = device.rows
            if not rows:
                rows.extend(device.rng.integers(len(self.sample_inputs), size=ROW_DRAWS).tolist())
            row = rows.pop()
            x = self.sample_inputs[row : row + 1]
        else:
            x = device.rng.standard_normal(model.input_shape).astype(model.input_dtype)
        return agent, x, row

    def _answered(self, device: _WorkloadDevice, result: Any, row: int | None) -> None:
        labels = device.labels
        if labels is None or not result.ok:
            return
        label = labels.label(result.model_sha256, result.outputs, row)
        if label is not None:
            right = None
            if labels.plan.outcome is not None:
                right = 1.0 if label[0] == top1(result.outputs)[0] else 0.0
            self._labels_due[device.spec.device_id] += 1
            asyncio.get_running_loop().call_later(
                label[1], self._post_label, device.spec.device_id, result.inference_id, label[0], right
            )

    def _post_label(
        self, device_id: str, inference_id: str, label: int, outcome: float | None = None
    ) -> None:
        """The device's app posts a label to whichever agent runs there now (after a reboot, a new
        agent that never made that prediction: its answer says so). A device that is off drops it."""
        self._labels_due[device_id] -= 1
        agent = self.agents.get(device_id)
        if agent is None or device_id in self.down:
            self.label_counts["dropped"] += 1
            return
        try:
            status = str(agent.label(inference_id, label).status)
            if outcome is not None and self.labels is not None and self.labels.outcome is not None:
                self.outcome_counts[
                    str(agent.outcome(inference_id, self.labels.outcome, outcome).status)
                ] += 1
        except Exception as exc:  # Agent.label never raises on bad input: this is a defect, show it
            log.warning("%s: posting a label failed", device_id, exc_info=True)
            status = f"error {type(exc).__name__}"
        self.label_counts[status] += 1


class _WorkloadDevice(NamedTuple):
    """One device's workload: its spec, its own random rows, its app's label source (if any)."""

    spec: DeviceSpec
    rng: np.random.Generator
    labels: LabelSource | None
    rows: list[int]  # its next random rows of ``sample_inputs``, drawn ``ROW_DRAWS`` at a time


async def _pull_the_plug(agent: Agent) -> None:
    """Stop an agent the way power loss does: no clean shutdown, no DISCONNECT, nothing flushed
    (:meth:`Agent.abort`, the agent's own "die like a power cut")."""
    await agent.abort()
