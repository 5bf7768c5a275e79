"""What the rollout pages show, built from the API's status view (``schemas.RolloutOut``): pure.

The stage timeline files each decision under the stage it was taken in (a ``next_stage``
decision closes a stage). The gate table of a stage is read from the figures of its latest
decision that carries them, per hardware cohort and pooled, and each gate's verdict is asked of
``fleet_server.gates`` itself, so the page can never disagree with the engine on what passed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet_server import gates
from fleet_server.lifecycle import OPERATOR_ACTIONS, ROLLOUT, RolloutTrigger
from fleet_server.policy import Policy
from fleet_server.schemas import DecisionOut, RolloutOut

ACTION_LABELS = {
    "pause": "Pause",
    "resume": "Resume",
    "abort": "Abort",
    "approve": "Approve stage",
    "rollback": "Roll back",
}
ACTION_CONSEQUENCES = {
    "pause": "No new devices are sent the model until the rollout is resumed or approved.",
    "resume": "Devices are sent the model again where the rollout paused; those that could not"
    " fetch it are sent it once more.",
    "abort": "Nothing more is sent; devices keep what they run now. This cannot be undone.",
    "approve": "The current stage is accepted: a manual gate passes, or a gate that paused is overridden.",
    "rollback": "Every device that got this model is sent the model it ran before. This cannot be undone.",
}
TROUBLED = frozenset({"failed", "timed_out", "held", "retry_wait"})
MAX_TROUBLED = 50  # the page lists this many devices in trouble; the API pages through them all
HALTING = frozenset({"roll_back", "roll_back_cohort", "pause", "pause_cohort"})


@dataclass(frozen=True)
class GateRow:
    """One gate over one cohort: its figure, its threshold, and the engine's verdict on them."""

    gate: str
    value: str
    threshold: str
    verdict: str  # "pass" | "breach" | "no data"
    reason: str = ""


@dataclass(frozen=True)
class CohortGates:
    cohort: str  # a hardware id, or "all cohorts" for the pooled figures
    rows: list[GateRow]


@dataclass(frozen=True)
class DecisionView:
    ts: datetime
    action: str
    reason: str
    gate: str | None
    cohort: str | None
    halting: bool


@dataclass
class StageView:
    number: int  # 1-based
    label: str
    state: str
    target: int
    assigned: int
    done: int
    failed: int
    decisions: list[DecisionView] = field(default_factory=list)
    cohorts: list[CohortGates] = field(default_factory=list)


@dataclass(frozen=True)
class RolloutView:
    id: str
    model: str
    state: str
    stage_text: str
    stages: list[StageView]
    device_counts: list[tuple[str, int]]
    devices: int
    actions: list[str]  # the operator actions the lifecycle allows now
    why: DecisionView | None  # the latest decision that halted the rollout or a cohort
    rollback_requested: bool
    updated_at: datetime
    troubled: list[tuple[str, str, str]]  # (device, state, reason) of failed, timed out or held devices


def policy_of(out: RolloutOut) -> Policy:
    return Policy.model_validate({**out.policy, **out.settings})


def allowed_actions(state: str, holds_devices: bool = False) -> list[str]:
    """The operator actions worth a button now: those the lifecycle allows that change something.

    The lifecycle allows repeats (resuming a running rollout is a no-op), which a button should
    not offer; approving a running rollout matters only while a gate holds some of its devices.
    """
    out = []
    for a in OPERATOR_ACTIONS:
        trigger = RolloutTrigger(a)
        if not ROLLOUT.allows(state, trigger):
            continue
        if a == "approve" and state == "running" and not holds_devices:
            continue
        if a != "approve" and ROLLOUT.move(state, trigger) == state:
            continue
        out.append(str(a))
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def gate_rows(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> list[GateRow]:
    """The gates the policy turns on, each with its figure from ``f`` and its verdict."""
    rows: list[tuple[str, str, str]] = [
        (
            "failure_rate",
            f"{_pct(f.get('failure_rate'))} ({f.get('failed', 0)} of {f.get('assigned', 0)})",
            f"<= {_pct(p.max_failure_rate)}",
        ),
        (
            "delivery",
            f"{gates.delivery_failed(f)} could not fetch the release",
            f"{p.delivery_action} when the failures above count them",
        ),
        (
            "error_rate",
            f"{_pct(f.get('error_rate'))} of {f.get('inferences', 0)} inferences",
            f"<= {_pct(p.max_error_rate)} (min {p.min_inferences} inferences)",
        ),
    ]
    if p.max_failures is not None:
        rows.append(("failures", str(f.get("failed", 0)), f"<= {p.max_failures}"))
    if p.min_success_rate:
        rows.append(("install_success", _pct(f.get("success_rate")), f">= {_pct(p.min_success_rate)}"))
    if p.max_latency_ratio is not None:
        rows.append(
            ("latency_p95", _num(f.get("latency_p95_ratio"), "{:.2f}x"), f"<= {p.max_latency_ratio:g}x")
        )
    if p.max_output_psi is not None:
        rows.append(
            (
                "output_drift",
                f"PSI {_num(f.get('output_psi'))} ({f.get('drift_samples', 0)} outputs)",
                f"<= {p.max_output_psi:g} (min {p.min_drift_samples})",
            )
        )
    if p.min_shadow_agreement is not None:
        rows.append(
            (
                "shadow_agreement",
                f"{_pct(f.get('shadow_agreement'))} of {f.get('shadow_samples', 0)}",
                f">= {_pct(p.min_shadow_agreement)} (min {p.min_shadow_samples})",
            )
        )
    if p.max_accuracy_drop is not None:
        rows.append(
            (
                "accuracy",
                f"change {_num(f.get('accuracy_change'), '{:+.4f}')},"
                f" p {_num(f.get('accuracy_p_value'), '{:.3g}')}"
                f" ({f.get('labels', 0)} labels)",
                f"drop <= {p.max_accuracy_drop:g} at alpha {_num(f.get('accuracy_alpha'), '{:.3g}')}",
            )
        )
    out = []
    for gate, value, threshold in rows:
        try:
            trip = gates.verdict(p, f, stage_finished, gate)
            evidence = gates.has_evidence(gate, f)
        except KeyError:  # figures of another shape (an operator's decision): nothing to judge
            out.append(GateRow(gate, value, threshold, "no data"))
            continue
        if trip is not None:
            out.append(GateRow(gate, value, threshold, "breach", trip.reason))
        else:
            out.append(GateRow(gate, value, threshold, "pass" if evidence else "no data"))
    return out


def _judged(figures: Mapping[str, Any]) -> bool:
    return "assigned" in figures and "error_rate" in figures


def cohort_gates(p: Policy, figures: Mapping[str, Any], stage_finished: bool) -> list[CohortGates]:
    """Per cohort (``figures["cohorts"]``), then pooled, when the decision carries gate figures."""
    out = [
        CohortGates(hw, gate_rows(p, f, stage_finished))
        for hw, f in sorted((figures.get("cohorts") or {}).items())
        if isinstance(f, Mapping) and _judged(f)
    ]
    if _judged(figures):
        out.append(CohortGates("all cohorts", gate_rows(p, figures, stage_finished)))
    return out


def decision_view(d: DecisionOut) -> DecisionView:
    f = d.figures or {}
    gate = f.get("gate")
    cohort = f.get("cohort")
    return DecisionView(
        d.ts,
        d.action,
        d.reason,
        gate if isinstance(gate, str) else None,
        cohort if isinstance(cohort, str) else None,
        d.action in HALTING,
    )


def stage_label(value: float, unit: str) -> str:
    return f"{value:g}%" if unit == "percent" else f"{value:g} devices"


def build(out: RolloutOut) -> RolloutView:
    """The detail page's view of one rollout."""
    p = policy_of(out)
    stages = [
        StageView(
            i + 1,
            stage_label(s.percent, out.stage_unit),
            s.state,
            s.target_count,
            s.assigned,
            s.done,
            s.failed,
        )
        for i, s in enumerate(out.stages)
    ]
    judged: dict[int, DecisionOut] = {}
    current = 0
    why: DecisionView | None = None
    for d in out.decisions:
        index = min(current, len(stages) - 1)
        view = decision_view(d)
        stages[index].decisions.append(view)
        if _judged(d.figures or {}):
            judged[index] = d
        if view.halting:
            why = view
        if d.action == "next_stage":
            current += 1
    for index, d in judged.items():
        finished = stages[index].state != "running"
        stages[index].cohorts = cohort_gates(p, d.figures, finished)
    counts = Counter(str(s) for s in out.devices.values())
    return RolloutView(
        id=out.id,
        model=out.model,
        state=str(out.state),
        stage_text=f"{min(out.current_stage + 1, len(stages))}/{len(stages)}",
        stages=stages,
        device_counts=sorted(counts.items()),
        devices=len(out.devices),
        actions=allowed_actions(str(out.state), counts.get("held", 0) > 0),
        why=why,
        rollback_requested=out.rollback_requested,
        updated_at=out.updated_at,
        troubled=[
            (device, str(state), out.device_reasons.get(device, ""))
            for device, state in out.devices.items()
            if str(state) in TROUBLED
        ][:MAX_TROUBLED],
    )


__all__ = [
    "ACTION_CONSEQUENCES",
    "ACTION_LABELS",
    "CohortGates",
    "DecisionView",
    "GateRow",
    "RolloutView",
    "StageView",
    "allowed_actions",
    "build",
    "cohort_gates",
    "gate_rows",
    "policy_of",
]
