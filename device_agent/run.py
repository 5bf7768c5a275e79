"""Run one agent on its own asyncio loop until SIGINT/SIGTERM (what ``edgefleet agent`` calls)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import numpy as np

from device_agent.agent import Agent
from device_agent.config import AgentConfig
from signing.trust import TrustRoot

log = logging.getLogger(__name__)


async def synthetic_workload(agent: Agent, hz: float, rng: np.random.Generator | None = None) -> None:
    """Call ``infer`` ``hz`` times a second on random inputs shaped from the serving model (demo load).

    Runs each inference in a worker thread so a slow model never stalls MQTT.
    """
    rng = rng or np.random.default_rng()
    period = 1.0 / hz
    while True:
        await asyncio.sleep(period)
        model = agent.running_model
        if model is None:
            continue
        x = rng.standard_normal(model.input_shape).astype(model.input_dtype)
        await asyncio.to_thread(agent.infer, x)


async def serve(config: AgentConfig, workload_hz: float = 0.0, stop: asyncio.Event | None = None) -> None:
    """Start the agent, run until ``stop`` is set (or a signal arrives), then stop cleanly."""
    trust = TrustRoot.load_file(config.trust_path)
    agent = Agent(config, trust)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await agent.start()
    log.info("agent %s started (data %s)", config.device_id, config.data_dir)
    workload = loop.create_task(synthetic_workload(agent, workload_hz)) if workload_hz > 0 else None
    try:
        await stop.wait()
    finally:
        if workload is not None:
            workload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await workload
        await agent.stop()
        log.info("agent %s stopped", config.device_id)


def run_agent(config: AgentConfig, workload_hz: float = 0.0) -> None:
    """Blocking entry point: one agent, one loop, until SIGINT/SIGTERM."""
    asyncio.run(serve(config, workload_hz))
