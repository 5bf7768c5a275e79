"""Following a rollout (`rollouts status --watch`): a live view on a terminal, one line per change in a pipe.

The views are pure functions of one status document (``GET /api/v1/rollouts/{id}``);
``follow`` is the only part that sleeps, polls and writes. Stages are numbered
from 1, as the server's decision reasons number them ("stage 1/3"); the API's
``current_stage`` and ``figures["stage"]`` stay 0-based in ``--json`` output.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fleet_server.lifecycle import DeviceRolloutState, RolloutState

Status = Mapping[str, Any]

FINISHED = frozenset(RolloutState.FINISHED)
WAITING = frozenset((RolloutState.PAUSED, RolloutState.AWAITING_APPROVAL))  # a human must act
DEVICE_ORDER = {state.value: i for i, state in enumerate(DeviceRolloutState)}
STATE_STYLE = {
    "running": "cyan",
    "completed": "green",
    "rolled_back": "bold red",
    "aborted": "bold red",
    "paused": "yellow",
    "awaiting_approval": "yellow",
}
DECISIONS_SHOWN = 6


def stops_watching(status: Status) -> bool:
    """The watch ends when the rollout finished or waits for a human."""
    return status["state"] in FINISHED | WAITING


def exit_code(status: Status) -> int:
    """0 only for a completed rollout: rolled back, aborted or waiting for a human is not success."""
    return 0 if status["state"] == RolloutState.COMPLETED else 1


def outcome_error(status: Status) -> tuple[str, str] | None:
    """(code, message) for a watch that did not end in ``completed``; None when it did."""
    state, rid = str(status["state"]), status["id"]
    if state == RolloutState.COMPLETED:
        return None
    if state in WAITING:
        verb = "approve" if state == RolloutState.AWAITING_APPROVAL else "approve, resume or rollback"
        return f"rollout_{state}", f"rollout {rid} is {state}: a human decides ({verb})"
    last = (status.get("decisions") or [{}])[-1]
    why = f": {last.get('action')}: {last.get('reason')}" if last else ""
    return f"rollout_{state}", f"rollout {rid} ended {state}{why}"


def stage_label(index: int, count: int) -> str:
    """A 0-based stage index as people and the engine's reasons say it: ``1/3``."""
    return f"{index + 1}/{count}"


def current_stage_label(status: Status) -> str:
    return stage_label(int(status.get("current_stage") or 0), len(status.get("stages") or []))


def stage_size(status: Status, stage: Mapping[str, Any]) -> str:
    value = float(stage.get("percent") or 0)
    return f"{value:g} dev" if status.get("stage_unit") == "count" else f"{value:g}%"


def device_counts(status: Status) -> list[tuple[str, int]]:
    """How many devices are in each state, in the lifecycle's order (pending first, held last)."""
    counts = Counter(str(s) for s in (status.get("devices") or {}).values())
    return sorted(counts.items(), key=lambda kv: (DEVICE_ORDER.get(kv[0], len(DEVICE_ORDER)), kv[0]))


def status_line(status: Status) -> str:
    devices = " ".join(f"{state}={n}" for state, n in device_counts(status)) or "none"
    return f"state: {status['state']}, stage {current_stage_label(status)}, devices: {devices}"


def decision_line(decision: Mapping[str, Any]) -> str:
    return f"decision: {decision.get('action')}: {decision.get('reason')}"


@dataclass
class LineWatch:
    """What the pipe has been told, so each poll prints only what changed."""

    last_status: str | None = None
    seen: set[tuple[str, str, str]] = field(default_factory=set)

    def changes(self, status: Status) -> list[str]:
        """New decisions first (they explain the change), then the status line if it differs."""
        lines = []
        for d in status.get("decisions") or []:
            key = (str(d.get("ts")), str(d.get("action")), str(d.get("reason")))
            if key not in self.seen:
                self.seen.add(key)
                lines.append(decision_line(d))
        line = status_line(status)
        if line != self.last_status:
            self.last_status = line
            lines.append(line)
        return lines


def _age(status: Status, now: datetime) -> str:
    try:
        created = datetime.fromisoformat(str(status["created_at"]))
    except (KeyError, ValueError):
        return ""
    seconds = max(0, int((now - created).total_seconds()))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _timeline(status: Status) -> Text:
    """One line: each stage with a mark (done, current, to come), joined like a track."""
    stages = status.get("stages") or []
    current = int(status.get("current_stage") or 0)
    finished_ok = status["state"] == RolloutState.COMPLETED
    text = Text()
    for i, st in enumerate(stages):
        if i:
            text.append(" ── ", style="dim")
        if i < current or finished_ok:
            mark, style = "✔", "green"
        elif i == current:
            mark, style = "▶", STATE_STYLE.get(str(status["state"]), "bold")
        else:
            mark, style = "·", "dim"
        text.append(f"{mark} stage {i + 1} ({stage_size(status, st)})", style=style)
    return text


def stage_table(status: Status, **table_options: Any) -> Table:
    """The stages, numbered from 1, with their cumulative counts; the running one in bold."""
    table = Table(
        "stage", "size", "target", "assigned", "done", "failed", "waiting", "state", **table_options
    )
    current = int(status.get("current_stage") or 0)
    active = status["state"] not in FINISHED
    for i, st in enumerate(status.get("stages") or []):
        table.add_row(
            str(i + 1),
            stage_size(status, st),
            str(st.get("target_count")),
            str(st.get("assigned")),
            str(st.get("done")),
            str(st.get("failed")),
            str(st.get("waiting", 0)),
            str(st.get("state")),
            style="bold" if i == current and active else None,
        )
    return table


def delivery_line(status: Status) -> str | None:
    """``fetched 12.3 MB in 40 installs (307.5 kB each); waiting: 3 maintenance_window``, or None."""
    parts = []
    delivery = status.get("delivery") or {}
    if delivery.get("installs"):
        each = delivery.get("bytes_per_install") or 0
        parts.append(
            f"fetched {_bytes(int(delivery.get('bytes_fetched') or 0))} in {delivery['installs']} installs"
            f" ({_bytes(int(each))} each)"
        )
    waiting = status.get("waiting") or {}
    if waiting:
        parts.append("waiting: " + ", ".join(f"{n} {why}" for why, n in waiting.items()))
    return "; ".join(parts) or None


def _bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def render(status: Status, now: datetime | None = None) -> RenderableType:
    """The live view: header, stage timeline, stage table, device counts, last decisions."""
    state = str(status["state"])
    header = Text.assemble(
        ("rollout ", "bold"),
        (str(status["id"]), "bold"),
        f" of {status.get('model')}  ",
        (state, STATE_STYLE.get(state, "bold")),
        f"  stage {current_stage_label(status)}  age {_age(status, now or datetime.now(UTC))}",
    )
    table = stage_table(status, box=None, pad_edge=False)
    counts = Text("devices: ")
    for n, (dev_state, count) in enumerate(device_counts(status)):
        if n:
            counts.append(" · ", style="dim")
        counts.append(f"{count} {dev_state}")
    decisions = Text("last decisions:", style="bold")
    for d in (status.get("decisions") or [])[-DECISIONS_SHOWN:]:
        decisions.append("\n  ")
        decisions.append(str(d.get("ts"))[11:19], style="dim")
        decisions.append(f" {d.get('action')}: {d.get('reason')}")
    line = delivery_line(status)
    parts: list[RenderableType] = [header, _timeline(status), table, counts]
    return Group(*parts, *([Text(line)] if line else []), decisions)


def follow(
    fetch: Callable[[], Status],
    *,
    interval: float,
    console: Console | None = None,
    out: TextIO | None = None,
) -> Status:
    """Poll until the rollout finishes or waits for a human; return the last status.

    With ``console`` (a terminal): a rich Live view redrawn in place. With ``out``: one
    newline-terminated line per change, flushed at once (a pipe must not wait for a buffer).
    With neither: silent (``--json`` prints the final document only).
    """
    status = fetch()
    if console is not None:
        with Live(render(status), console=console, auto_refresh=False) as view:
            while not stops_watching(status):
                time.sleep(interval)
                status = fetch()
                view.update(render(status), refresh=True)
        return status
    lines = LineWatch()
    _emit(out, lines.changes(status))
    while not stops_watching(status):
        time.sleep(interval)
        status = fetch()
        _emit(out, lines.changes(status))
    return status


def _emit(out: TextIO | None, lines: list[str]) -> None:
    if out is None or not lines:
        return
    out.write("".join(line + "\n" for line in lines))
    out.flush()


__all__ = [
    "LineWatch",
    "current_stage_label",
    "exit_code",
    "follow",
    "outcome_error",
    "render",
    "stage_label",
    "stage_size",
    "stage_table",
    "status_line",
    "stops_watching",
]
