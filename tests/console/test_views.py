"""The console's pure parts: gate rows against the engine's own verdicts, the stage timeline,
the actions offered, the time series and the SVG charts, the delivery-metadata status."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet_server import policy
from fleet_server.console import charts, obs_view, reads, rollout_view
from fleet_server.policy import Policy
from fleet_server.schemas import DecisionOut, RolloutOut, StageOut
from signing.targets import FLOORS_TARGET

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def figures(**over: Any) -> dict[str, Any]:
    f: dict[str, Any] = {
        "assigned": 10,
        "done": 9,
        "failed": 1,
        "failure_rate": 0.1,
        "max_failure_rate": 0.2,
        "success_rate": 0.9,
        "inferences": 1000,
        "errors": 10,
        "error_rate": 0.01,
        "max_error_rate": 0.05,
        "min_inferences": 100,
        "shadow_samples": 0,
        "shadow_agreement": None,
        "failure_classes": {},
    }
    f.update(over)
    return f


def test_gate_rows_give_the_engines_verdict_with_its_reason() -> None:
    p = Policy(max_failure_rate=0.2, max_error_rate=0.05, min_inferences=100, max_output_psi=0.2)
    rows = {r.gate: r for r in rollout_view.gate_rows(p, figures(), False)}
    assert rows["failure_rate"].verdict == "pass" and rows["failure_rate"].value == "10.00% (1 of 10)"
    assert rows["error_rate"].verdict == "pass" and rows["error_rate"].threshold.startswith("<= 5.00%")
    assert rows["output_drift"].verdict == "no data"  # the drift gate is on but saw no outputs
    assert "latency_p95" not in rows  # a gate the policy does not turn on is not shown
    bad = {r.gate: r for r in rollout_view.gate_rows(p, figures(errors=90, error_rate=0.09), False)}
    assert bad["error_rate"].verdict == "breach"
    assert bad["error_rate"].reason == "error rate 0.090 over 1000 inferences exceeds 0.05"
    # below the minimum sample the engine does not judge, and neither does the page
    few = {r.gate: r for r in rollout_view.gate_rows(p, figures(inferences=50, error_rate=0.5), False)}
    assert few["error_rate"].verdict == "pass"
    drift = figures(output_psi=0.31, drift_samples=5000, drift_baseline_samples=5000)
    assert {r.gate: r for r in rollout_view.gate_rows(p, drift, False)}["output_drift"].verdict == "breach"


def rollout(decisions: list[DecisionOut], state: str = "running", stage: int = 1) -> RolloutOut:
    p = Policy(max_error_rate=0.05, min_inferences=100)
    return RolloutOut(
        id="r1",
        model="det:2",
        model_sha256="0" * 64,
        state=state,  # type: ignore[arg-type]
        current_stage=stage,
        selector={},
        settings=policy.settings(p),
        stage_unit="percent",
        policy=policy.document(p),
        approved_through=-1,
        rollback_requested=False,
        created_at=T0,
        updated_at=T0,
        stages=[
            StageOut(percent=10, target_count=1, assigned=1, done=1, failed=0, state="done"),
            StageOut(percent=100, target_count=10, assigned=10, done=3, failed=1, state=state),
        ],
        devices={f"d{i}": "done" if i < 3 else "failed" if i == 3 else "notified" for i in range(10)},
        device_reasons={},
        decisions=decisions,
    )


def decision(action: str, reason: str, minute: int, **f: Any) -> DecisionOut:
    return DecisionOut(ts=T0 + timedelta(minutes=minute), action=action, reason=reason, figures=f)


def test_the_timeline_files_decisions_under_their_stage_and_names_the_gate_that_halted() -> None:
    cohorts = {"rpi4": figures(), "jetson": figures(errors=80, error_rate=0.08)}
    view = rollout_view.build(
        rollout(
            [
                decision("created", "10 devices", 0),
                decision("assign", "stage 1/2: notify 1 device(s)", 1),
                decision("next_stage", "stage 1 soaked; starting stage 2", 2, **figures(), cohorts=cohorts),
                decision("assign", "stage 2/2", 3),
                decision(
                    "roll_back_cohort",
                    "jetson: error rate 0.080 over 1000 inferences exceeds 0.05",
                    4,
                    **figures(),
                    gate="error_rate",
                    cohort="jetson",
                    cohorts=cohorts,
                ),
            ]
        )
    )
    assert [d.action for d in view.stages[0].decisions] == ["created", "assign", "next_stage"]
    assert [d.action for d in view.stages[1].decisions] == ["assign", "roll_back_cohort"]
    assert view.why is not None and (view.why.gate, view.why.cohort) == ("error_rate", "jetson")
    tables = {c.cohort: {r.gate: r.verdict for r in c.rows} for c in view.stages[1].cohorts}
    assert tables["jetson"]["error_rate"] == "breach" and tables["rpi4"]["error_rate"] == "pass"
    assert tables["all cohorts"]["error_rate"] == "pass"
    assert dict(view.device_counts) == {"done": 3, "failed": 1, "notified": 6}
    assert view.stage_text == "2/2" and view.actions == ["pause", "abort", "rollback"]
    assert view.troubled == [("d3", "failed", "")]


@pytest.mark.parametrize(
    ("state", "held", "offered"),
    [
        ("running", False, ["pause", "abort", "rollback"]),
        ("running", True, ["pause", "abort", "approve", "rollback"]),
        ("paused", False, ["resume", "abort", "approve", "rollback"]),
        ("awaiting_approval", False, ["pause", "abort", "approve", "rollback"]),
        ("completed", False, ["rollback"]),
        ("rolled_back", False, []),
    ],
)
def test_only_actions_that_change_something_get_a_button(state: str, held: bool, offered: list[str]) -> None:
    assert rollout_view.allowed_actions(state, held) == offered


def stats(
    latency_bucket: int, inferences: int = 100, errors: int = 0, labels: int = 0, correct: int = 0
) -> dict[str, Any]:
    latency = [0] * 40
    latency[latency_bucket] = inferences
    return {
        "inferences": inferences,
        "errors": {"non_finite": errors} if errors else {},
        "latency_buckets": latency,
        "output_hist": [0, inferences, 0],
        "labels": labels,
        "labels_correct": correct,
    }


def test_time_series_per_cohort_of_one_model_version() -> None:
    sha, other = "a" * 64, "b" * 64
    rows = [
        (1000.0, "rpi4", {sha: stats(10, errors=5, labels=10, correct=9)}),
        (1050.0, "rpi4", {sha: stats(20), other: stats(30)}),
        (1099.0, "jetson", {sha: stats(5)}),
        (1099.0, "jetson", {other: stats(30)}),  # another version: not on this chart
        (10.0, "rpi4", {sha: stats(39)}),  # before the window
    ]
    series = obs_view.bucketed(rows, sha, 500.0, 1100.0, 2)
    assert set(series) == {"rpi4", "jetson"}
    first, second = series["rpi4"].buckets
    assert (first.inferences, first.errors, first.labels) == (100, 5, 10) and second.inferences == 100
    drawn = obs_view.charts(series)
    p50 = {s.name: [v for _, v in s.points] for s in drawn["Latency (ms)"]}
    assert p50["rpi4 p50"] == [pytest.approx(0.32), pytest.approx(10.24)]  # bucket 10: 320 us, 20: 10240 us
    errors = {s.name: [v for _, v in s.points] for s in drawn["Error rate"]}
    assert errors["rpi4"] == [0.05, 0.0] and errors["jetson"] == [None, 0.0]
    coverage = {s.name: [v for _, v in s.points] for s in drawn["Label coverage"]}
    assert coverage["rpi4"] == [0.1, 0.0]
    assert obs_view.bucketed(rows, "c" * 64, 500.0, 1100.0, 2) == {}


def test_buckets_are_never_narrower_than_the_rows_spacing() -> None:
    """Per-minute rows of a version five minutes old: 24 buckets of 12.5 s would leave gaps
    between minutes (dots, no line); at the minute's resolution every bucket has its minute."""
    sha = "a" * 64
    rows = [(60.0 * m, "rpi4", {sha: stats(10)}) for m in range(5)]
    fine = obs_view.bucketed(rows, sha, 0.0, 300.0, 24)["rpi4"].buckets
    assert len(fine) == 24 and sum(b.inferences == 0 for b in fine) == 19
    coarse = obs_view.bucketed(rows, sha, 0.0, 300.0, 24, resolution=60.0)["rpi4"].buckets
    assert [b.inferences for b in coarse] == [100] * 5
    # an hour of minutes keeps the 24 buckets asked for
    hour = [(60.0 * m, "rpi4", {sha: stats(10)}) for m in range(60)]
    assert len(obs_view.bucketed(hour, sha, 0.0, 3600.0, 24, resolution=60.0)["rpi4"].buckets) == 24


def test_a_chart_draws_its_series_and_says_when_there_is_nothing() -> None:
    svg = charts.line_chart(
        "Error rate",
        [charts.Series("rpi4", [(0, 0.1), (60, None), (120, 0.3)]), charts.Series("<b>", [(0, 0.2)])],
        "%",
    )
    paths = re.findall(r'<path d="([^"]*)"', svg)
    assert paths[0].count("M") == 2 and "L" not in paths[0]  # the gap breaks the line
    assert svg.count("<circle ") == 3 and "&lt;b&gt;" in svg and "<b>" not in svg  # names are escaped
    assert 'role="img"' in svg and '<title id="chart-error-rate">Error rate</title>' in svg
    assert "30.0%" in svg  # the top tick in the chart's unit
    assert charts.line_chart("Latency", [charts.Series("x", [(0, None)])]) == (
        '<p class="nodata">Latency: no data in this window.</p>'
    )


def test_delivery_status_reads_the_targets_and_the_revocation_floors() -> None:
    raw = json.dumps(
        {
            "signed": {
                "version": 4,
                "expires": "2027-01-01T00:00:00Z",
                "targets": {
                    "det/2/model.onnx": {"hashes": {"sha256": "a" * 64}, "length": 3, "custom": {}},
                    FLOORS_TARGET: {
                        "hashes": {"sha256": "f" * 64},
                        "length": 1,
                        "custom": {"floors": {"det": 2}},
                    },
                },
            }
        }
    ).encode()
    targets = reads.parse_targets(raw)
    assert targets.shas == {"a" * 64, "f" * 64} - {"f" * 64} and targets.floors == {"det": 2}
    assert targets.version == 4


def test_the_slo_budget_burns_down_as_errors_come_in() -> None:
    from fleet_server.slo.series import Sample, Totals
    from fleet_server.slo.spec import spec_from

    spec = spec_from(
        {
            "name": "det-avail",
            "model": "det",
            "objectives": [{"sli": "availability", "target": 0.99, "window": "1h"}],
        }
    )
    # 1,000 inferences a minute; no errors for 10 minutes, then 2% errors (twice the budget's rate)
    samples, inferences, errors = [], 0, 0
    for minute in range(31):
        samples.append(Sample(60.0 * minute, Totals(inferences=inferences, errors=errors)))
        inferences += 1000
        errors += 20 if minute >= 10 else 0
    (series,) = obs_view.budget_series(spec, samples, [0.0, 600.0, 1200.0, 1800.0])
    left = [v for _, v in series.points]
    assert series.name == "det-avail availability"
    assert left[0] is None  # nothing sampled yet
    assert left[1] == 1.0  # ten clean minutes: the budget untouched
    assert (
        left[2] is not None and left[3] is not None and 0 > left[3] < left[2] < 1.0
    )  # burning, then overspent


def test_the_audit_log_pages_newest_first_with_its_filters(tmp_path: Any) -> None:
    from fleet_server.audit import AuditFilter, record_audit
    from fleet_server.models import AuditEntry
    from fleet_server.settings import ServerSettings
    from fleet_server.store import make_engine, new_session

    engine = make_engine(ServerSettings(data_dir=tmp_path))
    for i in range(5):
        record_audit(
            engine,
            AuditEntry(
                ts=T0, actor="a" if i % 2 else "b", method="POST", path=f"/ui/x/{i}", status=200, result="ok"
            ),
        )
    with new_session(engine) as session:
        seen, before = [], None
        while True:
            rows, before = reads.audit_newest_first(session, AuditFilter(), before, 2)
            seen.append([r.path[-1] for r in rows])
            if before is None:
                break
        assert seen == [["4", "3"], ["2", "1"], ["0"]]
        rows, _ = reads.audit_newest_first(session, AuditFilter(actor="a"), None, 10)
        assert [r.path for r in rows] == ["/ui/x/3", "/ui/x/1"]
    engine.dispose()
