"""The timeline figure's data: it runs to the end of the scenario, shows every state that occurred, and
its event labels never overlap.

The checks are on :func:`simulator.timeline.plot_data` (what the figure is drawn from), on the drawn
figure's text boxes and axis ticks, and on a real small scenario run (real broker, server and agents).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgefleet.broker import mosquitto_binary
from simulator.timeline import PlotData, Recording, Sample, figure, place_marks, plot_data

SCENARIOS = Path(__file__).parent.parent.parent / "scenarios"


@dataclass
class Recorded:
    samples: list[Sample]
    marks: list[tuple[float, str]] = field(default_factory=list)
    stage_of: dict[str, dict[str, int]] = field(default_factory=dict)
    interval: float = 0.5


def _rollout(state: str, per_stage: dict[int, dict[str, int]], stages: list[float]) -> dict[str, Any]:
    return {
        "state": state,
        "stage": max(per_stage, default=0),
        "per_stage": {k: Counter(v) for k, v in per_stage.items()},
        "stages": stages,
    }


def canary_like() -> Recorded:
    """A canary rolled back at the very last sample, which ends the script (as the small scenario does)."""
    stages = [5.0, 25.0, 50.0, 100.0]
    samples = [
        Sample(0.5, Counter(serving=24)),
        Sample(
            1.0,
            Counter(serving=22, downloading=2),
            {"broken": _rollout("running", {0: {"notified": 2}}, stages)},
        ),
        Sample(1.5, Counter(serving=24), {"broken": _rollout("running", {0: {"installing": 2}}, stages)}),
        Sample(
            6.2, Counter(serving=24), {"broken": _rollout("rolled_back", {0: {"rolled_back": 2}}, stages)}
        ),
    ]
    marks = [
        (0.3, "step 0: rollout baseline"),
        (2.5, "rollout baseline: completed"),
        (2.5, "step 2: rollout broken"),
        (2.51, "partition x2 (sim-gw-00000, sim-gw-00002)"),
        (6.2, "rollout broken: rolled_back"),
    ]
    return Recorded(samples, marks, {"broken": {"d1": 0, "d2": 0}})


def assert_tells_the_story(rec: Recording, data: PlotData, scenario_end: float) -> None:
    """The plot reaches past the end, and every (panel, state) that occurred has a visible step."""
    assert data.times == sorted(data.times) and len(set(data.times)) == len(data.times)
    assert data.end == data.times[-1] > scenario_end
    assert data.end > data.last_sample == max(s.t for s in rec.samples)
    occurred: list[set[str]] = [{k for s in rec.samples for k, n in s.agents.items() if n}]
    for key in rec.stage_of:
        for st in sorted({st for s in rec.samples for st in s.rollouts.get(key, {}).get("per_stage", {})}):
            rows = [s.rollouts.get(key, {}).get("per_stage", {}).get(st, {}) for s in rec.samples]
            occurred.append({k for r in rows for k, n in r.items() if n})
    assert [set(p.states) for p in data.panels] == occurred
    for panel in data.panels:
        for state in panel.states:
            counts = panel.counts[state]
            assert len(counts) == len(data.times) and all(isinstance(n, int) for n in counts)
            # a step [times[i], times[i+1]) with a count > 0: the state covers a visible width
            widths = [data.times[i + 1] - data.times[i] for i, n in enumerate(counts[:-1]) if n > 0]
            assert widths and max(widths) > 0, (panel.title, state)
    # the state the script ended in is the one drawn up to the end
    last = rec.samples[-1]
    assert {k: c[-1] for k, c in data.panels[0].counts.items() if c[-1]} == {
        k: n for k, n in last.agents.items() if n
    }


def test_the_end_state_is_drawn_past_the_last_sample() -> None:
    rec = canary_like()
    data = plot_data(rec)
    assert_tells_the_story(rec, data, scenario_end=6.2)
    broken = data.panels[1]
    assert broken.title == "rollout broken: stage 1/4 (5%) - rollout ended rolled_back"
    assert broken.counts["rolled_back"][-2:] == [2, 2]  # the last sample, held to the end
    assert data.end - data.last_sample >= rec.interval


def test_event_labels_never_share_a_lane_where_they_overlap() -> None:
    data = plot_data(canary_like())
    assert data.lanes >= 2  # three labels within 0.01 s of each other cannot share one lane
    by_lane: dict[int, list[tuple[float, float]]] = {}
    for m in data.marks:
        assert m.left < m.right and m.left <= m.t <= m.right
        for a, b in by_lane.get(m.lane, []):
            assert m.right <= a or m.left >= b, f"{m.text!r} overlaps another label in lane {m.lane}"
        by_lane.setdefault(m.lane, []).append((m.left, m.right))
    last = next(m for m in data.marks if m.text.endswith("rolled_back"))
    assert last.anchored_right and last.right == last.t  # ends at its event instead of running off the plot


def test_place_marks_reuses_a_lane_once_it_is_clear() -> None:
    placed = place_marks([(0.0, "a"), (0.5, "b"), (2.0, "c"), (0.6, "d")], lambda text: 1.0, end=10.0)
    assert [(m.text, m.lane) for m in placed] == [("a", 0), ("b", 1), ("d", 2), ("c", 0)]


def _boxes_overlap(a: Any, b: Any) -> bool:
    return bool(a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1)


def test_the_drawn_labels_do_not_overlap_and_the_counts_are_whole_devices() -> None:
    import matplotlib.pyplot as plt

    rec = canary_like()
    rec.marks += [(3.0 + i * 0.05, f"crash x1 at warming (sim-slowpi-{i:05d})") for i in range(6)]
    fig = figure(rec, "scenario test")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        lane_ax, *panels = fig.axes
        boxes = [t.get_window_extent(renderer) for t in lane_ax.texts]
        assert len(boxes) == len(rec.marks)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not _boxes_overlap(a, b)
        for ax in panels:
            ticks = [float(t.get_text().replace("\u2212", "-")) for t in ax.get_yticklabels() if t.get_text()]
            assert ticks and all(t == int(t) for t in ticks), ticks
        assert panels[0].get_xlim()[1] == pytest.approx(plot_data(rec).end)
    finally:
        plt.close(fig)


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_a_real_canary_rollback_run_is_drawn_to_its_end(tmp_path: Path) -> None:
    """The small canary scenario ends right as the broken rollout rolls back: that state must show."""
    from edgefleet.sim_harness import SimHarness, device_root
    from simulator.runner import ScenarioRun
    from simulator.scenario import load_scenario

    scenario = load_scenario(SCENARIOS / "canary-rollback.toml", small=True)
    with SimHarness(scenario, tmp_path) as harness, device_root(tmp_path) as devices:
        run = ScenarioRun(scenario, harness, tmp_path, device_root=devices)
        result = run.execute()
    assert result.ok, result.checks
    assert run.timeline is not None
    data = plot_data(run.timeline)
    scenario_end = max(t for t, _ in result.events)
    assert_tells_the_story(run.timeline, data, scenario_end)
    broken = [p for p in data.panels if p.title.startswith("rollout broken: stage 1/")]
    assert broken and "rolled_back" in broken[0].states
