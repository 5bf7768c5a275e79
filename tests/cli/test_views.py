"""The pure parts of the CLI's views: watch lines, stage numbers, exit codes, tag changes."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from edgefleet.commands.device_ops import TagError, apply_tag_changes, parse_tag_changes
from edgefleet.commands.rollout_watch import (
    LineWatch,
    current_stage_label,
    exit_code,
    outcome_error,
    render,
    status_line,
    stops_watching,
)


def status(state: str = "running", stage: int = 0, devices: dict[str, str] | None = None, **over: Any) -> Any:
    return {
        "id": "r1",
        "model": "det:2",
        "state": state,
        "current_stage": stage,
        "stage_unit": "percent",
        "created_at": "2026-01-01T00:00:00Z",
        "stages": [
            {"percent": 10.0, "target_count": 1, "assigned": 1, "done": 0, "failed": 0, "state": "running"},
            {"percent": 100.0, "target_count": 4, "assigned": 0, "done": 0, "failed": 0, "state": "pending"},
        ],
        "devices": devices if devices is not None else {"a": "notified", "b": "pending", "c": "pending"},
        "decisions": [],
        **over,
    }


def decision(action: str, reason: str, ts: str = "2026-01-01T00:00:01Z") -> dict[str, Any]:
    return {"ts": ts, "action": action, "reason": reason, "figures": {}}


def test_stage_numbers_are_one_based() -> None:
    assert current_stage_label(status(stage=0)) == "1/2"
    assert current_stage_label(status(stage=1)) == "2/2"
    assert status_line(status()) == "state: running, stage 1/2, devices: pending=2 notified=1"


def test_line_watch_prints_only_changes() -> None:
    watch = LineWatch()
    first = status(decisions=[decision("assign", "stage 1/2: notify 1 device(s)")])
    assert watch.changes(first) == [
        "decision: assign: stage 1/2: notify 1 device(s)",
        "state: running, stage 1/2, devices: pending=2 notified=1",
    ]
    assert watch.changes(first) == []  # nothing changed: nothing printed
    done = status(devices={"a": "done", "b": "pending", "c": "pending"}, decisions=first["decisions"])
    assert watch.changes(done) == ["state: running, stage 1/2, devices: pending=2 done=1"]
    rolled = status(
        "rolled_back",
        devices={"a": "rolled_back", "b": "pending", "c": "pending"},
        decisions=[*first["decisions"], decision("roll_back", "error rate 0.5", "2026-01-01T00:00:09Z")],
    )
    assert watch.changes(rolled) == [
        "decision: roll_back: error rate 0.5",
        "state: rolled_back, stage 1/2, devices: pending=2 rolled_back=1",
    ]


@pytest.mark.parametrize(
    "state,stops,code",
    [
        ("running", False, 1),
        ("completed", True, 0),
        ("rolled_back", True, 1),
        ("aborted", True, 1),
        ("paused", True, 1),
        ("awaiting_approval", True, 1),
    ],
)
def test_watch_ends_and_exit_codes(state: str, stops: bool, code: int) -> None:
    s = status(state, decisions=[decision("x", "why")])
    assert stops_watching(s) is stops
    assert exit_code(s) == code
    assert (outcome_error(s) is None) is (code == 0)


def test_outcome_errors_say_what_happened() -> None:
    assert outcome_error(status("rolled_back", decisions=[decision("roll_back", "error rate 1.0")])) == (
        "rollout_rolled_back",
        "rollout r1 ended rolled_back: roll_back: error rate 1.0",
    )
    code, message = outcome_error(status("awaiting_approval")) or ("", "")
    assert code == "rollout_awaiting_approval" and "approve" in message


def test_live_view_renders_every_part() -> None:
    console = Console(width=100, record=True)
    console.print(render(status(decisions=[decision("assign", "stage 1/2: notify 1 device(s)")])))
    text = console.export_text()
    assert "rollout r1 of det:2  running  stage 1/2" in text
    assert "▶ stage 1 (10%) ── · stage 2 (100%)" in text
    assert "devices: 2 pending · 1 notified" in text
    assert "00:00:01 assign: stage 1/2: notify 1 device(s)" in text


def test_tag_changes_kubectl_style() -> None:
    current = {"site": "lab", "ring": "1"}
    assert apply_tag_changes(current, parse_tag_changes(["zone=eu", "ring-"]), False) == {
        "site": "lab",
        "zone": "eu",
    }
    assert apply_tag_changes(current, parse_tag_changes(["site=lab"]), False) == current  # same value
    assert apply_tag_changes(current, parse_tag_changes(["gone-"]), False) == current  # absent: no-op
    assert apply_tag_changes(current, parse_tag_changes(["site=home"]), True)["site"] == "home"
    assert apply_tag_changes({}, parse_tag_changes(["k="]), False) == {"k": ""}
    with pytest.raises(TagError, match="--overwrite") as refused:
        apply_tag_changes(current, parse_tag_changes(["site=home"]), False)
    assert not refused.value.usage
    for bad in (["nonsense"], ["=v"], ["-"], ["a=1", "a-"]):
        with pytest.raises(TagError) as exc:
            parse_tag_changes(bad)
        assert exc.value.usage, bad
