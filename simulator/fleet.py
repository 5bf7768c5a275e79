"""Run N real :class:`device_agent.agent.Agent` instances on ONE asyncio loop in a background thread.

Each agent has its own MQTT client id, data dir, slots and state: only the
loop and the loaded ONNX sessions are shared. Sharing sessions
(:class:`SharedRuntimeFactory`, keyed by sha256) is what keeps hundreds of
devices in one process affordable (a session costs 16-45 MB RSS). Agents
connect in batches because the broker's listen backlog is ~100.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from device_agent.agent import Agent, NoModelError
from device_agent.config import AgentConfig, BrokerInfo
from device_agent.runtime import SharedRuntimeFactory
from signing.trust import TrustRoot

CONNECT_BATCH = 100
_T = TypeVar("_T")


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    hardware_id: str
    tags: dict[str, str] = field(default_factory=dict)


class Fleet:
    """A simulated fleet. ``start()`` returns once every agent is connected; ``stop()`` ends them all."""

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
    ) -> None:
        self.specs = list(specs)
        self.broker = broker
        self.trust_path = Path(trust_path)
        self.data_root = Path(data_root)
        self.workload_hz = workload_hz
        self.sample_inputs = sample_inputs
        self.telemetry_interval = telemetry_interval
        self.targets = targets or ["arm64-cpu"]
        self.connect_timeout = connect_timeout
        self.runtime = SharedRuntimeFactory()
        self.agents: dict[str, Agent] = {}
        self.workload_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._workloads: list[asyncio.Task[None]] = []

    # -- lifecycle (caller's thread) ---------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("fleet already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="edgefleet-sim", daemon=True)
        self._thread.start()
        try:
            self.run(self._start_all(), timeout=self.connect_timeout + 30)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
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

    # -- views ----------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per device: running sha, deployment state/error, swap history, inference counts."""
        out: dict[str, dict[str, Any]] = {}
        for device_id, agent in list(self.agents.items()):
            served = agent.served_ok
            metrics = agent.metrics
            out[device_id] = {
                "running": agent.running_sha256,
                "state": str(agent.deployment_state),
                "error": agent.deployment_error,
                "history": list(agent.history),
                "served_ok": served,
                "inferences_ok": sum(served.values()),
                "inference_errors": sum(v for k, v in metrics.items() if k.startswith("inference_")),
                "connected": agent.link is not None and agent.link.connected,
            }
        return out

    # -- on the loop ----------------------------------------------------------

    async def _start_all(self) -> None:
        trust = TrustRoot.load_file(self.trust_path)
        for spec in self.specs:
            config = AgentConfig(
                device_id=spec.device_id,
                hardware_id=spec.hardware_id,
                data_dir=self.data_root / spec.device_id,
                trust_path=self.trust_path,
                mqtt_host=self.broker.host,
                mqtt_port=self.broker.port,
                mqtt_version=self.broker.mqtt_version,
                telemetry_interval=self.telemetry_interval,
                targets=list(self.targets),
                tags=dict(spec.tags),
            )
            self.agents[spec.device_id] = Agent(config, trust, runtime_factory=self.runtime)
        agents = list(self.agents.values())
        for i in range(0, len(agents), CONNECT_BATCH):
            batch = agents[i : i + CONNECT_BATCH]
            await asyncio.gather(*(a.start() for a in batch))
            ok = await asyncio.gather(*(a.wait_connected(self.connect_timeout) for a in batch))
            if not all(ok):
                missing = [a.device_id for a, c in zip(batch, ok, strict=True) if not c]
                raise TimeoutError(f"{len(missing)} agents did not connect: {missing[:5]}")
        if self.workload_hz > 0:
            loop = asyncio.get_running_loop()
            for n, agent in enumerate(agents):
                self._workloads.append(loop.create_task(self._workload(agent, n)))

    async def _stop_all(self) -> None:
        for task in self._workloads:
            task.cancel()
        for task in self._workloads:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workloads = []
        await asyncio.gather(*(a.stop() for a in self.agents.values()), return_exceptions=True)

    async def _workload(self, agent: Agent, n: int) -> None:
        """Infer on rows of ``sample_inputs`` at ``workload_hz`` (inline: the models are tiny)."""
        rng = np.random.default_rng(n)
        period = 1.0 / self.workload_hz
        await asyncio.sleep(rng.uniform(0, period))  # spread the fleet's inferences over the period
        i = n
        while True:
            model = agent.running_model
            if model is not None:
                if self.sample_inputs is not None and len(self.sample_inputs):
                    x = self.sample_inputs[i % len(self.sample_inputs)][None, ...]
                    i += 1
                else:
                    x = rng.standard_normal(model.input_shape).astype(model.input_dtype)
                try:
                    agent.infer(x)
                except NoModelError:
                    pass
                except Exception:
                    self.workload_errors += 1
            await asyncio.sleep(period)
