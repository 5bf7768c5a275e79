"""Sample device states while a scenario runs: what each agent does, and where each rollout has it.

Two views per sample: the agents' own deployment states (``down`` when the
simulator has it powered off or crashed, ``disconnected`` while its MQTT link
is away), and the server's per-device rollout states, split by the stage that
brought each device in. The stage of a device is the rollout's current stage
when the device first shows up as assigned (the API lists states, not stages).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from simulator.procfleet import FleetControl


@dataclass
class Sample:
    t: float
    agents: Counter[str]
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> state, per_stage


class Timeline:
    """A background sampler; ``samples`` and ``marks`` feed :mod:`simulator.report`."""

    def __init__(
        self,
        fleet: FleetControl,
        api: httpx.Client,
        rollouts: dict[str, str],
        class_of: dict[str, str],
        t0: float,
    ) -> None:
        self.fleet = fleet
        self.api = api
        self.rollouts = rollouts  # shared with the runner: rollouts appear as the script starts them
        self.class_of = class_of
        self.t0 = t0
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str]] = []
        self.stage_of: dict[str, dict[str, int]] = {}  # rollout key -> device -> stage
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, interval: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="sim-timeline", daemon=True)
        self._thread.start()

    def stop(self, final_sample: bool = True) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if final_sample:
            with contextlib.suppress(Exception):
                self.sample()  # the end state

    def mark(self, t: float, what: str) -> None:
        with self._lock:
            self.marks.append((t, what))

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with contextlib.suppress(Exception):  # a sample lost to a restarting server is not an error
                self.sample()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        agents: Counter[str] = Counter(st.state for st in self.fleet.status().values())
        s = Sample(t, agents)
        for key, rid in list(self.rollouts.items()):
            try:
                status = self.api.get(f"/api/v1/rollouts/{rid}").json()
            except (httpx.HTTPError, ValueError):
                continue
            stages = self.stage_of.setdefault(key, {})
            current = int(status.get("current_stage") or 0)
            per_stage: dict[int, Counter[str]] = {}
            for device_id, state in dict(status.get("devices") or {}).items():
                if state == "pending":
                    continue
                stage = stages.setdefault(device_id, current)
                per_stage.setdefault(stage, Counter())[str(state)] += 1
            s.rollouts[key] = {"state": status.get("state"), "stage": current, "per_stage": per_stage}
        with self._lock:
            self.samples.append(s)


__all__ = ["Sample", "Timeline"]
