"""The agent's counters (directives, refusals, swaps, reverts, failures by reason, ...).

Bumped from the inference threads and the loop alike, so behind one lock; read
whole by ``Agent.metrics`` (the simulator's and the tests' view of a device),
and by the local API's ``GET /metrics`` in Prometheus' text format
(``exposition``: written here, so a device needs no Prometheus library; one
series per counter name, so bounded by the code, never by traffic).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def get(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _label(value: str) -> str:
    """A label value as the text format quotes it (backslash, double quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(counts: Mapping[str, int], state: str, version: str | None, sha256: str | None) -> bytes:
    """The agent's counters, deployment state and serving model in Prometheus' text format 0.0.4."""
    lines = [
        "# HELP edgefleet_agent_events_total What this agent counted since it started, by event.",
        "# TYPE edgefleet_agent_events_total counter",
        *(f'edgefleet_agent_events_total{{event="{_label(k)}"}} {counts[k]}' for k in sorted(counts)),
        "# HELP edgefleet_agent_deployment_state The agent's deployment state (1 for the current one).",
        "# TYPE edgefleet_agent_deployment_state gauge",
        f'edgefleet_agent_deployment_state{{state="{_label(state)}"}} 1',
        "# HELP edgefleet_agent_model_info The model the agent serves.",
        "# TYPE edgefleet_agent_model_info gauge",
    ]
    if sha256 is not None:
        lines.append(
            f'edgefleet_agent_model_info{{version="{_label(version or "")}",sha256="{_label(sha256)}"}} 1'
        )
    return ("\n".join(lines) + "\n").encode()


__all__ = ["Metrics", "exposition"]
