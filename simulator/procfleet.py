"""One scenario's fleet split over worker processes, each a :class:`~simulator.fleet.Fleet` on its own loop.

One Python process runs ~1,000 agents on this 2-core machine before its event
loop lags by seconds (the GIL and one loop). :class:`ProcessFleet` splits the
devices of a :class:`FleetPlan` round-robin over N worker processes (so every
hardware class is spread over all of them); every worker builds its own Fleet,
with its own loop, model sessions and MQTT connections, against the same broker
and server. The coordinator (the process running the scenario: broker, server,
proxies, script, expectations, report) talks to each worker over a
``multiprocessing`` pipe, one request at a time:

- ``status``: each device's deployment state and running model (the timeline
  and the script's waits poll it);
- ``crash`` / ``power_off`` (optionally only while the agent is in a given
  state, checked on the worker's loop) and ``power_on``: device faults go to
  the worker that holds the device;
- ``snapshot`` and ``stop``: the end state, then the counters of every agent
  over its reboots and the worker's memory figures.

Network faults need no worker: every device's MQTT proxy and the artifact
proxy run in the coordinator, which owns their :class:`~simulator.netem.LinkState`.
A worker is a fresh interpreter (``python -c <_WORKER_CODE> FD``: not
``fork``, the coordinator has threads that a fork would copy half-way; not
``multiprocessing``'s ``spawn`` either, which re-runs the coordinator's main
script in the child and so breaks any script without a ``__main__`` guard). It
inherits one end of a socket pair, reads its :class:`FleetPlan` from it, and
ignores SIGINT: the coordinator stops it; a worker whose coordinator disappears
(its pipe closes) stops its fleet and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_agent.config import BrokerInfo
from device_agent.runtime import SharedRuntimeFactory
from simulator.faults import ClassBehaviour
from simulator.fleet import DeviceSpec, DeviceStatus, Fleet, FleetTotals, start_timeout
from simulator.labels import LabelPlan

log = logging.getLogger(__name__)


class FleetControl(Protocol):
    """What a scenario run needs from a fleet, in one process (:class:`Fleet`) or several."""

    specs: list[DeviceSpec]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self, devices: list[str] | None = None) -> dict[str, DeviceStatus]: ...

    def crash(self, device_id: str, only_in_state: str | None = None) -> bool: ...

    def power_off(self, device_id: str, only_in_state: str | None = None) -> bool: ...

    def power_on(self, device_id: str, wait: bool = False) -> None: ...

    def clock_jump(self, device_id: str, seconds: float) -> None: ...

    def set_link(self, device_id: str, link_class: str) -> None: ...

    def snapshot(self) -> dict[str, dict[str, Any]]: ...

    def totals(self) -> FleetTotals: ...


@dataclass
class FleetPlan:
    """Everything a :class:`Fleet` is built from, as plain (picklable) data."""

    specs: list[DeviceSpec]
    broker: BrokerInfo
    trust_path: Path
    data_root: Path
    workload_hz: float = 5.0
    sample_inputs: np.ndarray | None = None
    telemetry_interval: float = 5.0
    connect_timeout: float = 60.0
    tuf_root_path: Path | None = None
    classes: dict[str, ClassBehaviour] = field(default_factory=dict)  # hw_class -> model behaviour
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> agent mqtt_* keys
    labels: LabelPlan | None = None  # the devices' apps label some of their inferences
    mirrors: list[str] = field(default_factory=list)  # static delivery: where every device downloads
    installs_at_once: int | None = None  # per process: turns at the installs' heavy steps (None: all)

    def build(self) -> Fleet:
        shared = SharedRuntimeFactory()
        return Fleet(
            self.specs,
            self.broker,
            self.trust_path,
            self.data_root,
            workload_hz=self.workload_hz,
            sample_inputs=self.sample_inputs,
            telemetry_interval=self.telemetry_interval,
            class_runtimes={name: b.runtime(shared) for name, b in self.classes.items()},
            runtime=shared,
            connect_timeout=self.connect_timeout,
            tuf_root_path=self.tuf_root_path,
            credentials=self.credentials,
            labels=self.labels,
            mirrors=self.mirrors,
            installs_at_once=self.installs_at_once,
        )

    def split(self, parts: int) -> list[FleetPlan]:
        """Round-robin over ``parts`` plans (each class spread over all of them); none empty."""
        n = max(1, min(parts, len(self.specs)))
        out = []
        for i in range(n):
            specs = self.specs[i::n]
            mine = {
                s.device_id: self.credentials[s.device_id] for s in specs if s.device_id in self.credentials
            }
            out.append(replace(self, specs=specs, credentials=mine))
        return out


# A worker's command line: python -c _WORKER_CODE FD INDEX
_WORKER_CODE = (
    "import sys; from multiprocessing.connection import Connection; "
    "from simulator.procfleet import _worker_main; "
    "_worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]))"
)


class WorkerError(RuntimeError):
    """A worker process failed a request, did not answer in time, or died."""


class ProcessFleet:
    """A :class:`FleetControl` over N worker processes (see the module docstring)."""

    def __init__(self, plan: FleetPlan, processes: int, log_dir: Path | None = None) -> None:
        self.plan = plan
        self.specs = list(plan.specs)
        self.parts = plan.split(processes)
        self.owner = {s.device_id: k for k, part in enumerate(self.parts) for s in part.specs}
        self.log_dir = Path(log_dir) if log_dir else None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []
        self._locks = [threading.Lock() for _ in self.parts]
        self._broken: dict[int, str] = {}
        self._totals: list[FleetTotals] | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        level = logging.getLogger().getEffectiveLevel()
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)  # where ``simulator`` is importable from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        try:
            for k, part in enumerate(self.parts):
                parent, child = multiprocessing.Pipe()
                log_path = self.log_dir / f"fleet-worker-{k}.log" if self.log_dir else None
                proc = subprocess.Popen(
                    [sys.executable, "-c", _WORKER_CODE, str(child.fileno()), str(k)],
                    pass_fds=[child.fileno()],
                    env=env,
                )
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
                parent.send((part, log_path, level))
            # interpreter start + imports, then every agent connected
            biggest = max(len(part.specs) for part in self.parts)
            self._call_all("start", (), timeout=start_timeout(biggest, self.plan.connect_timeout) + 90)
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        if self._totals is not None or not self._procs:
            return
        try:
            self._totals = list(self._call_all("stop", (), timeout=120))
        finally:
            self.close()

    def close(self) -> None:
        """End every worker (asked first; terminated if it does not exit within 10 s)."""
        for k, conn in enumerate(self._conns):
            if k not in self._broken:
                try:
                    with self._locks[k]:
                        conn.send(("exit", ()))
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    # -- requests -------------------------------------------------------------------

    def _dead(self, k: int, op: str) -> WorkerError:
        code = self._procs[k].poll() if k < len(self._procs) else None
        self._broken[k] = f"worker {k} exited (code {code}) during {op!r}"
        return WorkerError(self._broken[k])

    def _send(self, k: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            self._conns[k].send((op, args))
        except (OSError, ValueError) as exc:
            raise self._dead(k, op) from exc

    def _recv(self, k: int, op: str, deadline: float) -> Any:
        conn = self._conns[k]
        try:
            ready = conn.poll(max(0.0, deadline - time.monotonic()))
            if not ready:
                self._broken[k] = f"worker {k} did not answer {op!r} in time"
                raise WorkerError(self._broken[k])
            reply = conn.recv()
        except (EOFError, OSError) as exc:
            raise self._dead(k, op) from exc
        if reply[0] == "error":
            raise WorkerError(f"worker {k}: {op}: {reply[1]}\n{reply[2]}")
        return reply[1]

    def _call(self, k: int, op: str, args: tuple[Any, ...], timeout: float) -> Any:
        if k in self._broken:
            raise WorkerError(self._broken[k])
        if not self._conns:
            raise WorkerError("the fleet's workers are not running")
        with self._locks[k]:
            self._send(k, op, args)
            return self._recv(k, op, time.monotonic() + timeout)

    def _call_all(self, op: str, args: tuple[Any, ...], timeout: float) -> list[Any]:
        """The same request to every worker at once (they work in parallel); answers in worker order."""
        if self._broken:
            raise WorkerError("; ".join(self._broken.values()))
        for lock in self._locks:
            lock.acquire()
        try:
            sent, errors = [], []
            for k in range(len(self._conns)):
                try:
                    self._send(k, op, args)
                    sent.append(k)
                except WorkerError as exc:
                    errors.append(str(exc))
            deadline = time.monotonic() + timeout
            out = []
            for k in sent:
                try:
                    out.append(self._recv(k, op, deadline))
                except WorkerError as exc:
                    errors.append(str(exc))
            if errors:
                raise WorkerError("; ".join(errors))
            return out
        finally:
            for lock in self._locks:
                lock.release()

    def status(self, devices: list[str] | None = None) -> dict[str, DeviceStatus]:
        out: dict[str, DeviceStatus] = {}
        if devices is None:
            for part in self._call_all("status", (None,), timeout=30):
                out.update(part)
            return out
        by_worker: dict[int, list[str]] = {}
        for d in devices:
            by_worker.setdefault(self.owner[d], []).append(d)
        for k, ds in by_worker.items():
            out.update(self._call(k, "status", (ds,), timeout=30))
        return out

    def crash(self, device_id: str, only_in_state: str | None = None) -> bool:
        return bool(self._call(self.owner[device_id], "crash", (device_id, only_in_state), timeout=30))

    def power_off(self, device_id: str, only_in_state: str | None = None) -> bool:
        return bool(self._call(self.owner[device_id], "power_off", (device_id, only_in_state), timeout=30))

    def power_on(self, device_id: str, wait: bool = False) -> None:
        timeout = self.plan.connect_timeout + 30
        self._call(self.owner[device_id], "power_on", (device_id, wait), timeout=timeout)

    def clock_jump(self, device_id: str, seconds: float) -> None:
        self._call(self.owner[device_id], "clock_jump", (device_id, seconds), timeout=30)

    def set_link(self, device_id: str, link_class: str) -> None:
        self._call(self.owner[device_id], "set_link", (device_id, link_class), timeout=30)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for part in self._call_all("snapshot", (), timeout=60):
            out.update(part)
        return out

    def totals(self) -> FleetTotals:
        """The workers' counters merged (valid after :meth:`stop`)."""
        if self._totals is None:
            raise RuntimeError("totals are read after stop()")
        metrics: dict[str, dict[str, int]] = {}
        lifecycle: dict[str, int] = {}
        labels: dict[str, int] = {}
        processes: list[dict[str, Any]] = []
        for k, t in enumerate(self._totals):
            metrics.update(t.device_metrics)
            for key, n in t.lifecycle.items():
                lifecycle[key] = lifecycle.get(key, 0) + n
            for key, n in t.labels.items():
                labels[key] = labels.get(key, 0) + n
            processes += [{"worker": k, **p} for p in t.processes]
        return FleetTotals(
            device_metrics=metrics,
            lifecycle=lifecycle,
            model_loads=sum(t.model_loads for t in self._totals),
            workload_errors=sum(t.workload_errors for t in self._totals),
            max_loop_lag=max((t.max_loop_lag for t in self._totals), default=0.0),
            processes=processes,
            labels=labels,
        )


def _worker_main(conn: Connection, index: int) -> None:
    """A worker process: read the plan, build the fleet, answer the coordinator's requests until ``exit``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the coordinator, which stops us
    plan, log_path, level = conn.recv()
    if log_path is not None:
        logging.basicConfig(
            filename=log_path, level=level, format=f"%(asctime)s w{index} %(name)s %(levelname)s %(message)s"
        )
    fleet = plan.build()

    def stop() -> FleetTotals:
        fleet.stop()
        return fleet.totals()

    handlers: dict[str, Callable[..., Any]] = {
        "start": fleet.start,
        "status": fleet.status,
        "crash": fleet.crash,
        "power_off": fleet.power_off,
        "power_on": fleet.power_on,
        "clock_jump": fleet.clock_jump,
        "set_link": fleet.set_link,
        "snapshot": fleet.snapshot,
        "stop": stop,
    }
    try:
        while True:
            try:
                op, args = conn.recv()
            except (EOFError, OSError):
                break  # the coordinator is gone
            if op == "exit":
                break
            try:
                conn.send(("ok", handlers[op](*args)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        fleet.stop()
        conn.close()


__all__ = ["FleetControl", "FleetPlan", "ProcessFleet", "WorkerError"]
