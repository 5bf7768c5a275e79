"""`edgefleet sim check|run`: --json, and summaries a person reads (tables of readable values, never a
dict repr, never rich markup eating a reason), on the terminal and in the report files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgefleet.broker import mosquitto_binary
from edgefleet.cli import app
from edgefleet.commands import sim
from edgefleet.commands.sim import show_run
from simulator.readable import readable
from simulator.report import write_report
from simulator.runner import CheckResult, RunResult

SCENARIOS = Path(__file__).resolve().parent.parent.parent / "scenarios"
runner = CliRunner()
# what str() of Python containers looks like: {'a': 1}, ['x'], ("x",)
REPR = re.compile(r"\{'|\['|'\]|\('|\{\}|\[\]")

SMALL = """
name = "tiny"
time_limit = 60
[fleet]
devices = 3
[[fleet.classes]]
name = "rpi4"
[models.v1]
version = "1"
[[steps]]
action = "rollout"
id = "r"
model = "v1"
stages = [100]
[[steps]]
action = "wait_rollout"
rollout = "r"
states = ["completed", "rolled_back", "aborted"]
[[expect]]
check = "rollout_state"
rollout = "r"
states = ["completed", "paused"]
"""


def a_run() -> RunResult:
    """A run's result as the runner leaves it: nested figures, a known gap, a reason with brackets."""
    result = RunResult("nested")
    result.checks = [
        CheckResult("rollout_state rollout=r states=completed", True, "state completed"),
        CheckResult("failed_with reason=corrupt", False, "0 failure(s) corrupt", "[flaky] on slow disks"),
    ]
    result.figures = {
        "devices": 24,
        "classes": {"rpi4": 18, "jetson": 6},
        "lifecycle": {},
        "rollout_devices": {"baseline": {"done": 24}, "broken": {"pending": 22, "rolled_back": 2}},
        "fleet_processes": [{"pid": 11, "devices": 12}, {"pid": 12, "devices": 12}],
        "max_loop_lag_s": 0.123456,
        "broker": None,
    }
    result.step_error = "step 3 [wait_rollout] timed out after 30s"
    result.skipped = ["disk faults skipped: [tmpfs] needs root"]
    result.events = [(1.23456, "step 0: rollout r")]
    return result


def test_readable_values() -> None:
    assert readable({"rpi4": 18, "jetson": 6}) == "rpi4=18, jetson=6"
    assert readable({"a": {"done": 2}, "b": {"x": 1, "y": 2}}) == "a: done=2; b: x=1, y=2"
    assert readable([{"pid": 1}, {"pid": 2}]) == "pid=1; pid=2"
    assert readable(["completed", "paused"]) == "completed, paused"
    assert readable({}) == readable([]) == readable(None) == "-"
    assert (readable(True), readable(0.123456), readable(3)) == ("yes", "0.1235", "3")


def test_sim_check_json_and_text() -> None:
    path = SCENARIOS / "canary-rollback.toml"
    result = runner.invoke(app, ["sim", "check", str(path), "--small", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["scenario"] == "canary-rollback"
    assert doc["devices"] == sum(doc["classes"].values()) and doc["steps"] > 0 and doc["expectations"] > 0
    text = runner.invoke(app, ["sim", "check", str(path), "--small"])
    assert text.exit_code == 0
    classes = ", ".join(f"{k}={v}" for k, v in doc["classes"].items())
    assert f"canary-rollback: {doc['devices']} devices ({classes}), {doc['steps']} steps, ok" in text.stdout


def test_sim_check_json_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[fleet]\ndevices = 3\nclasses = [{name = "a", colour = "red"}]\n')
    result = runner.invoke(app, ["sim", "check", str(bad), "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "usage_error" and "fleet.classes.0.colour" in error["message"]


def test_run_summary_on_the_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # a wide terminal, so no cell wraps. The command's console was made at import and took its width
    # from COLUMNS then, if it was set (pytest-xdist workers run with COLUMNS=80): a console of this
    # test's own, writing to the captured stdout
    monkeypatch.setattr(sim, "console", Console(width=250))
    show_run(a_run(), {"html": tmp_path / "report.html"})
    out, err = capsys.readouterr()
    flat = " ".join(out.split())
    assert "rpi4=18, jetson=6" in flat and "pid=11, devices=12; pid=12, devices=12" in flat
    assert "broken: pending=22, rolled_back=2" in flat and "0.1235" in flat
    assert "(known gap: [flaky] on slow disks)" in flat  # brackets shown, not taken for markup
    assert not REPR.search(out), out
    errors = " ".join(err.split())
    assert "script stopped: step 3 [wait_rollout] timed out after 30s" in errors
    assert "warning: skipped: disk faults skipped: [tmpfs] needs root" in errors


def test_report_files_hold_readable_tables(tmp_path: Path) -> None:
    paths = write_report(a_run(), None, tmp_path)
    md = paths["md"].read_text()
    html = paths["html"].read_text()
    for text in (md, html):
        assert "rpi4=18, jetson=6" in text and "baseline: done=24" in text
        assert not REPR.search(text.replace("&#x27;", "'")), text
    assert "| lifecycle | - |" in md and "| 1.23 | step 0: rollout r |" in md
    # the JSON keeps the data itself
    data = json.loads(paths["json"].read_text())
    assert data["figures"]["classes"] == {"rpi4": 18, "jetson": 6}


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_sim_run_prints_tables(tmp_path: Path) -> None:
    """A real run (3 devices, a real broker and server): what `sim run` prints and writes."""
    path = tmp_path / "tiny.toml"
    path.write_text(SMALL)
    result = runner.invoke(
        app, ["sim", "run", str(path), "--workdir", str(tmp_path / "w")], env={"COLUMNS": "120"}
    )
    assert result.exit_code == 0, result.output
    flat = " ".join(result.stdout.split())
    assert "rollout_state rollout=r states=completed, paused" in flat  # the label: no list repr
    assert "classes │ rpi4=3" in flat and "rollouts │ r=completed" in flat
    assert not REPR.search(result.stdout), result.stdout
    md = (tmp_path / "w" / "report" / "summary.md").read_text()
    assert "| classes | rpi4=3 |" in md and not REPR.search(md), md
