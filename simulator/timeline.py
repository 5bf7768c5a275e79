"""Sample device states while a scenario runs, and draw them as a timeline.

Two views per sample: the agents' own deployment states (``down`` when the
simulator has it powered off or crashed, ``disconnected`` while its MQTT link
is away), and the server's per-device rollout states, split by the stage that
brought each device in. The stage of a device is the rollout's current stage
when the device first shows up as assigned (the API lists states, not stages).

Drawing goes through :func:`plot_data`, a pure function from the samples to
what the figure shows: step series that run to the end of the scenario, and
event labels placed in lanes so none overlaps another. Tests check that data;
:func:`figure` only renders it. matplotlib (Agg) is imported inside
:func:`figure`, so running agents never load it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from simulator.procfleet import FleetControl

# Stacking order, bottom up: healthy states first, then work in progress, then trouble. A state not
# listed is stacked after these, in name order, in grey.
AGENT_ORDER = [
    "serving",
    "probation",
    "shadowing",
    "idle",
    "downloading",
    "verifying",
    "installing",
    "warming",
    "swapping",
    "reverted",
    "failed",
    "rejected",
    "disconnected",
    "down",
]
ROLLOUT_ORDER = [
    "done",
    "shadowing",
    "notified",
    "installing",
    "retry_wait",
    "held",
    "failed",
    "timed_out",
    "rolled_back",
]
COLOURS = {
    "serving": "#2e7d32",
    "done": "#2e7d32",
    "probation": "#81c784",
    "shadowing": "#26a69a",
    "idle": "#9e9e9e",
    "notified": "#90caf9",
    "retry_wait": "#f48fb1",
    "held": "#fdd835",
    "reverted": "#ff7043",
    "downloading": "#42a5f5",
    "verifying": "#7e57c2",
    "installing": "#5c6bc0",
    "warming": "#ffb300",
    "swapping": "#fb8c00",
    "failed": "#c62828",
    "rejected": "#ad1457",
    "timed_out": "#6d4c41",
    "rolled_back": "#ef6c00",
    "disconnected": "#bdbdbd",
    "down": "#212121",
}
OTHER_COLOUR = "#607d8b"
# The last sample is the state the script ended in. It is drawn for this share of the run (at least one
# sampling interval) past the last sample, so a state reached at the very end, such as a rollback that
# ends the script, has a visible width; a dotted line marks where the samples end.
END_HOLD_FRACTION = 0.04


@dataclass
class Sample:
    t: float
    agents: Counter[str]
    rollouts: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # key -> state, stage, per_stage, stages
    ingest_lag: float | None = None  # the server's ingest lag, seconds (None: it did not answer)


class Timeline:
    """A background sampler; ``samples`` and ``marks`` feed :func:`plot_data` and :mod:`simulator.report`."""

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
        self.interval = 0.5
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str]] = []
        self.stage_of: dict[str, dict[str, int]] = {}  # rollout key -> device -> stage
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, interval: float) -> None:
        self.interval = interval
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
        with contextlib.suppress(httpx.HTTPError, ValueError, TypeError):
            stats = self.api.get("/api/v1/stats").json()
            s.ingest_lag = float(stats["ingest_lag_seconds"]) if "ingest_lag_seconds" in stats else None
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
            s.rollouts[key] = {
                "state": status.get("state"),
                "stage": current,
                "per_stage": per_stage,
                "stages": [float(st.get("percent", 0)) for st in status.get("stages") or []],
            }
        with self._lock:
            self.samples.append(s)


# -- what the figure shows ------------------------------------------------------


class Recording(Protocol):
    """What a figure is drawn from: a :class:`Timeline`, or any record of the same shape."""

    @property
    def samples(self) -> list[Sample]: ...
    @property
    def marks(self) -> list[tuple[float, str]]: ...
    @property
    def stage_of(self) -> dict[str, dict[str, int]]: ...
    @property
    def interval(self) -> float: ...


@dataclass(frozen=True)
class Panel:
    """One stacked area: device counts per state, one value per step of ``PlotData.times``."""

    title: str
    states: list[str]  # stacking order, only states that occurred
    counts: dict[str, list[int]]  # state -> one count per step edge (the last repeats the end state)


@dataclass(frozen=True)
class PlacedMark:
    """An event label: ``[left, right]`` is the time span its text covers in lane ``lane``."""

    t: float
    text: str
    lane: int
    left: float
    right: float

    @property
    def anchored_right(self) -> bool:
        """The text ends at ``t`` (a label near the end of the run would run off the plot otherwise)."""
        return self.right <= self.t


@dataclass(frozen=True)
class PlotData:
    times: list[float]  # step edges: every sample time, then ``end``
    end: float  # where the plot ends (the last sample held for END_HOLD_FRACTION of the run)
    last_sample: float
    panels: list[Panel]
    marks: list[PlacedMark]
    lanes: int


def _order(seen: set[str], preferred: list[str]) -> list[str]:
    return [s for s in preferred if s in seen] + sorted(seen - set(preferred))


def end_of(samples: list[Sample], marks: list[tuple[float, str]], interval: float) -> float:
    """The plot's right edge: past the last sample and the last event, by the end hold."""
    last = max([s.t for s in samples] + [t for t, _ in marks] + [0.0])
    first = min([s.t for s in samples] + [0.0])
    return last + max(interval, END_HOLD_FRACTION * (last - first))


def _stage_title(key: str, stage: int, samples: list[Sample]) -> str:
    stages: list[float] = next(
        (s.rollouts[key]["stages"] for s in reversed(samples) if key in s.rollouts), []
    )
    final = next((s.rollouts[key].get("state") for s in reversed(samples) if key in s.rollouts), None)
    where = (
        f"stage {stage + 1}/{len(stages)} ({stages[stage]:g}%)"
        if stage < len(stages)
        else f"stage {stage + 1}"
    )
    return f"rollout {key}: {where}" + (f" - rollout ended {final}" if final else "")


def panels_of(samples: list[Sample], rollout_keys: list[str]) -> list[Panel]:
    """The fleet's agent states, then one panel per rollout stage that brought devices in."""

    def panel(title: str, rows: list[Counter[str] | dict[str, int]], preferred: list[str]) -> Panel:
        order = _order({k for r in rows for k, n in r.items() if n > 0}, preferred)
        counts = {k: [int(r.get(k, 0)) for r in rows] for k in order}
        for k in order:  # the end state is held to the plot's end: one more edge, same value
            counts[k].append(counts[k][-1])
        return Panel(title, order, counts)

    out = [panel("agents (all devices)", [s.agents for s in samples], AGENT_ORDER)]
    for key in rollout_keys:
        stages = sorted({st for s in samples for st in s.rollouts.get(key, {}).get("per_stage", {})})
        for st in stages:
            rows = [s.rollouts.get(key, {}).get("per_stage", {}).get(st, Counter()) for s in samples]
            out.append(panel(_stage_title(key, st, samples), rows, ROLLOUT_ORDER))
    return out


def place_marks(
    marks: list[tuple[float, str]], width_of: Callable[[str], float], end: float, gap: float = 0.0
) -> list[PlacedMark]:
    """Put each label in the first lane where it overlaps no other (greedy interval colouring).

    ``width_of`` gives a label's width in seconds at the figure's scale. A label starts at its
    event; one that would run past ``end`` ends at its event instead.
    """
    lanes: list[list[tuple[float, float]]] = []
    placed: list[PlacedMark] = []
    for t, text in sorted(marks, key=lambda m: m[0]):
        w = width_of(text)
        left, right = (t, t + w) if t + w <= end else (t - w, t)
        clear = [all(right + gap <= a or left >= b + gap for a, b in taken) for taken in lanes]
        lane = clear.index(True) if True in clear else len(lanes)
        if lane == len(lanes):
            lanes.append([])
        lanes[lane].append((left, right))
        placed.append(PlacedMark(t, text, lane, left, right))
    return placed


def plot_data(timeline: Recording, width_of: Callable[[str], float] | None = None) -> PlotData:
    """Everything :func:`figure` draws, from the samples and marks (no matplotlib involved).

    ``width_of``: a label's width in seconds; the default assumes the figure's geometry (see
    :func:`figure`) at 7 pt text.
    """
    samples = sorted(timeline.samples, key=lambda s: s.t)
    end = end_of(samples, timeline.marks, timeline.interval)
    start = min([s.t for s in samples] + [0.0])
    span = max(end - start, 1e-9)
    seconds_per_char = span * CHAR_PX / AXES_PX
    measure = width_of or (lambda text: (len(text) + 1) * seconds_per_char)
    marks = place_marks(list(timeline.marks), measure, end, gap=2 * seconds_per_char)
    return PlotData(
        times=[s.t for s in samples] + [end],
        end=end,
        last_sample=samples[-1].t if samples else 0.0,
        panels=panels_of(samples, list(timeline.stage_of)),
        marks=marks,
        lanes=max((m.lane for m in marks), default=-1) + 1,
    )


# -- the figure -----------------------------------------------------------------

FIG_WIDTH_IN, DPI = 11.0, 110
LEFT, RIGHT = 0.07, 0.83  # axes span; the legends sit in the right margin
AXES_PX = FIG_WIDTH_IN * DPI * (RIGHT - LEFT)
FONT_PT = 7.0
CHAR_PX = 0.62 * FONT_PT * DPI / 72  # a conservative average glyph width, for the default measure


def figure(timeline: Recording, title: str) -> Any:
    """A matplotlib Figure: an event lane on top, then the fleet's agents, then each rollout stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath
    from matplotlib.ticker import MaxNLocator

    samples = sorted(timeline.samples, key=lambda s: s.t)
    end = end_of(samples, timeline.marks, timeline.interval)
    start = min([s.t for s in samples] + [0.0])
    seconds_per_px = (end - start) / AXES_PX
    font, to_path = FontProperties(size=FONT_PT), TextToPath()

    def width_of(text: str) -> float:
        w_pt, _h, _d = to_path.get_text_width_height_descent(text, font, ismath=False)
        return (w_pt * DPI / 72 + 6) * seconds_per_px  # + the tick mark and padding

    data = plot_data(timeline, width_of)
    lane_h = 0.17  # inches per label lane
    heights = [max(0.35, lane_h * (data.lanes + 0.6))] + [1.9] * len(data.panels)
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(FIG_WIDTH_IN, sum(heights) + 1.1),
        sharex=True,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    lane_ax, *panel_axes = axes[:, 0]
    for ax, panel in zip(panel_axes, data.panels, strict=True):
        if panel.states:
            ax.stackplot(
                data.times,
                [panel.counts[k] for k in panel.states],
                labels=panel.states,
                colors=[COLOURS.get(k, OTHER_COLOUR) for k in panel.states],
                step="post",
            )
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
        ax.set_title(panel.title, fontsize=9, loc="left")
        ax.set_ylabel("devices", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        for m in data.marks:
            ax.axvline(m.t, color="black", lw=0.5, alpha=0.35)
        ax.axvline(data.last_sample, color="black", lw=0.8, ls=":")
    lane_ax.set_ylim(data.lanes - 0.3 if data.lanes else 0.7, -0.7)
    lane_ax.set_yticks([])
    lane_ax.tick_params(axis="x", length=0)
    lane_ax.set_title("events", fontsize=9, loc="left")
    for spine in ("left", "right", "top"):
        lane_ax.spines[spine].set_visible(False)
    for m in data.marks:
        lane_ax.plot([m.t], [m.lane], marker="|", color="black", ms=6)
        lane_ax.text(
            m.t,
            m.lane,
            f" {m.text} " if not m.anchored_right else f"{m.text} ",
            fontsize=FONT_PT,
            va="center",
            ha="right" if m.anchored_right else "left",
        )
    lane_ax.set_xlim(start, end)
    panel_axes[-1].set_xlabel("seconds since start (dotted: last sample, the end state is held after it)")
    fig.suptitle(title, fontsize=11)
    height = fig.get_figheight()
    fig.subplots_adjust(left=LEFT, right=RIGHT, top=1 - 0.55 / height, bottom=0.5 / height, hspace=0.5)
    return fig


__all__ = ["PlacedMark", "PlotData", "Recording", "Sample", "Timeline", "figure", "place_marks", "plot_data"]
