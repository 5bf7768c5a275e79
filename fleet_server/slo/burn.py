"""One evaluation of an SLO: each objective's SLI, error budget and burn rates, and which rules breach.

Pure: a spec and its samples in, a status out. A rule breaches when the burn rate
exceeds its factor over both its windows and the short window holds the
objective's minimum of events and the rule's, whichever is larger (a handful of
requests says nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleet_server.slo.series import Sample, burn_rate, sli_value, window_events
from fleet_server.slo.spec import BurnRule, Objective, Severity, SloSpec


@dataclass(frozen=True)
class RuleStatus:
    rule: BurnRule
    long_burn: float
    short_burn: float
    short_events: int
    breaching: bool


@dataclass(frozen=True)
class ObjectiveStatus:
    objective: Objective
    sli: float | None  # share of good events over the window; None without events
    events: int
    bad: int
    budget_remaining: float  # share of the window's budget left: 1 untouched, 0 spent, < 0 overspent
    rules: tuple[RuleStatus, ...]

    @property
    def budget_spent(self) -> bool:
        return self.events > 0 and self.budget_remaining <= 0.0

    def breaching(self, severity: Severity) -> list[RuleStatus]:
        return [r for r in self.rules if r.breaching and r.rule.severity == severity]


@dataclass(frozen=True)
class SloStatus:
    spec: SloSpec
    at: float
    objectives: tuple[ObjectiveStatus, ...]

    @property
    def budget_spent(self) -> bool:
        return any(o.budget_spent for o in self.objectives)

    def severity(self) -> Severity | None:
        """The most urgent severity any rule breaches at."""
        for severity in (Severity.PAGE, Severity.TICKET):
            if any(o.breaching(severity) for o in self.objectives):
                return severity
        return None


def budget_remaining(bad: int, total: int, objective: Objective) -> float:
    """The share of the window's error budget left, the budget being ``(1 - target) * events``."""
    if total == 0:
        return 1.0
    allowed = objective.budget * total
    return 1.0 - bad / allowed


def evaluate_objective(
    objective: Objective, rules: Sequence[BurnRule], samples: Sequence[Sample], now: float
) -> ObjectiveStatus:
    bad, total = window_events(objective, samples, now, objective.window_s)
    statuses = []
    for rule in rules:
        lb, lt = window_events(objective, samples, now, rule.long_s)
        sb, st = window_events(objective, samples, now, rule.short_s)
        long_burn, short_burn = burn_rate(lb, lt, objective), burn_rate(sb, st, objective)
        enough = st >= max(objective.min_events, rule.min_events)
        breaching = enough and long_burn > rule.factor and short_burn > rule.factor
        statuses.append(RuleStatus(rule, long_burn, short_burn, st, breaching))
    return ObjectiveStatus(
        objective, sli_value(bad, total), total, bad, budget_remaining(bad, total, objective), tuple(statuses)
    )


def evaluate(spec: SloSpec, samples: Sequence[Sample], now: float) -> SloStatus:
    return SloStatus(
        spec, now, tuple(evaluate_objective(o, spec.rules, samples, now) for o in spec.objectives)
    )
