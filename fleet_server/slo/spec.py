"""What an SLO is, as data: a model (optionally one hardware cohort), objectives, burn-rate rules.

An objective is a target share of good events over a rolling window: the share of
predictions served (availability), of inferences without an error (error rate), of
inferences faster than a threshold (latency p95/p99: "p95 under 20 ms" is "95% of
inferences under 20 ms"), of labelled predictions that were right (accuracy), and
for drift of evaluation steps whose output distribution stayed within a PSI of the
model's own history (a time-slice SLI: each step is one event).

The alerting rules are the Google SRE workbook's multi-window, multi-burn-rate
scheme: a rule breaches when the budget burns faster than ``factor`` times the
sustainable rate over both its long and its short window (the short one makes
the alert stop soon after the burn does), and its short window holds enough
events to mean something. By default a fourth, fast page tier comes before the
workbook's three (``DEFAULT_RULES``): see ``FAST_PAGE_RULE`` for why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Sli(StrEnum):
    AVAILABILITY = "availability"
    ERROR_RATE = "error_rate"
    LATENCY_P95 = "latency_p95"
    LATENCY_P99 = "latency_p99"
    DRIFT_PSI = "drift_psi"
    ACCURACY = "accuracy"


class Severity(StrEnum):
    PAGE = "page"  # wakes someone: the budget goes within days
    TICKET = "ticket"  # a person looks during work hours


# SLIs that need a threshold, with its unit; the latency SLIs fix their share by name.
THRESHOLD_UNIT = {Sli.LATENCY_P95: "ms", Sli.LATENCY_P99: "ms", Sli.DRIFT_PSI: "psi"}
LATENCY_SHARE = {Sli.LATENCY_P95: 0.95, Sli.LATENCY_P99: 0.99}
# below this many events in a rule's short window a rule says nothing (one error in ten requests
# is not a page); drift counts evaluation steps, so a few are enough
DEFAULT_MIN_EVENTS = 100
DRIFT_MIN_EVENTS = 3
DRIFT_MIN_OUTPUTS = 100  # outputs a step needs before its drift is judged at all
DEFAULT_WINDOW_S = 28 * 86400.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float | int) -> float:
    """``"28d"``, ``"5m"``, ``"1h"`` or a number of seconds, in seconds (> 0)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if m is None:
            raise ValueError(f"{text!r} is not a duration (like 30s, 5m, 1h, 28d)")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNIT_S[unit] and seconds % _UNIT_S[unit] == 0:
            return f"{int(seconds // _UNIT_S[unit])}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class BurnRule:
    """Breach when the burn rate exceeds ``factor`` over both windows (seconds) and the short window
    holds at least ``min_events`` events, and the objective's own minimum (the larger counts)."""

    severity: Severity
    factor: float
    long_s: float
    short_s: float
    min_events: int = 0

    @property
    def name(self) -> str:
        return f"{self.severity}-{self.factor:g}x-{format_duration(self.long_s)}"

    def budget_share(self, window_s: float) -> float:
        """The share of a ``window_s`` budget spent when the rule just breaches (workbook table)."""
        return self.factor * self.long_s / window_s

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": str(self.severity),
            "factor": self.factor,
            "long": format_duration(self.long_s),
            "short": format_duration(self.short_s),
        }
        if self.min_events:
            out["min_events"] = self.min_events
        return out


# The SRE workbook's rules for a 30-day budget: 2% spent in 1 h, 5% in 6 h (pages), 10% in 3 days.
WORKBOOK_RULES: tuple[BurnRule, ...] = (
    BurnRule(Severity.PAGE, 14.4, 3600.0, 300.0),
    BurnRule(Severity.PAGE, 6.0, 6 * 3600.0, 1800.0),
    BurnRule(Severity.TICKET, 1.0, 3 * 86400.0, 6 * 3600.0),
)

# A page at 14.4x over 5 min and 1 min. With a 99.5% target the workbook's 1 h page needs ~43 min of
# a 10% error rate to fire (the 1 h mean must reach 7.2%); this one fires in ~4 min. Its price: it
# pages for a burst that spent only 0.2% of a 28-day budget, and a 1-minute window of a quiet model
# is a handful of requests. So it speaks only when that minute holds FAST_PAGE_MIN_EVENTS events
# (5 inferences a second): tripping it then takes at least 22 bad events in the minute and ~7% of
# ~1,500 over five (99.5% target); a quieter model is left to the workbook's slower tiers.
FAST_PAGE_MIN_EVENTS = 300
FAST_PAGE_RULE = BurnRule(Severity.PAGE, 14.4, 300.0, 60.0, FAST_PAGE_MIN_EVENTS)

# The default policy: the fast page tier, then the workbook's three.
DEFAULT_RULES: tuple[BurnRule, ...] = (FAST_PAGE_RULE, *WORKBOOK_RULES)


@dataclass(frozen=True)
class Objective:
    sli: Sli
    target: float  # share of good events, 0 < target < 1
    window_s: float = DEFAULT_WINDOW_S
    threshold: float | None = None  # ms for latency, PSI for drift
    min_events: int = DEFAULT_MIN_EVENTS

    @property
    def budget(self) -> float:
        """The share of events allowed to be bad."""
        return 1.0 - self.target

    @property
    def key(self) -> str:
        return str(self.sli)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sli": str(self.sli),
            "target": self.target,
            "window": format_duration(self.window_s),
            "min_events": self.min_events,
        }
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


@dataclass(frozen=True)
class SloSpec:
    name: str
    model: str  # model name: every version of it counts
    hardware_id: str | None = None  # one cohort, or the whole fleet
    objectives: tuple[Objective, ...] = ()
    rules: tuple[BurnRule, ...] = DEFAULT_RULES
    labels: Mapping[str, str] = field(default_factory=dict)  # passed on to alerts (team, service)

    def objective(self, sli: Sli) -> Objective | None:
        return next((o for o in self.objectives if o.sli == sli), None)


_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")


def objective_from(data: Mapping[str, Any]) -> Objective:
    """An objective from its JSON form; a ValueError says what is wrong in one line."""
    try:
        sli = Sli(str(data.get("sli")))
    except ValueError:
        raise ValueError(f"sli must be one of {', '.join(Sli)}, not {data.get('sli')!r}") from None
    target = data.get("target", LATENCY_SHARE.get(sli))
    if target is None:
        raise ValueError(f"{sli}: a target is needed (a share like 0.995)")
    target = float(target)
    if not 0.0 < target < 1.0:
        raise ValueError(f"{sli}: target {target} must be between 0 and 1 (exclusive), like 0.995")
    if sli in LATENCY_SHARE and target != LATENCY_SHARE[sli]:
        raise ValueError(f"{sli}: the target is {LATENCY_SHARE[sli]} by its name; set only the threshold")
    threshold = data.get("threshold")
    if sli in THRESHOLD_UNIT:
        if threshold is None:
            raise ValueError(f"{sli}: a threshold in {THRESHOLD_UNIT[sli]} is needed")
        threshold = float(threshold)
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"{sli}: threshold {threshold} must be a positive number")
    elif threshold is not None:
        raise ValueError(f"{sli} takes no threshold")
    window_s = parse_duration(data.get("window", DEFAULT_WINDOW_S))
    default_min = DRIFT_MIN_EVENTS if sli == Sli.DRIFT_PSI else DEFAULT_MIN_EVENTS
    min_events = int(data.get("min_events", default_min))
    if min_events < 1:
        raise ValueError(f"{sli}: min_events must be at least 1")
    return Objective(sli, target, window_s, threshold, min_events)


def rule_from(data: Mapping[str, Any]) -> BurnRule:
    try:
        severity = Severity(str(data.get("severity")))
    except ValueError:
        raise ValueError(f"severity must be page or ticket, not {data.get('severity')!r}") from None
    factor = float(data.get("factor", 0))
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"burn rule factor {factor} must be a positive number")
    long_s, short_s = parse_duration(data.get("long", 0)), parse_duration(data.get("short", 0))
    if short_s >= long_s:
        raise ValueError(
            f"burn rule short window {data.get('short')} must be shorter than {data.get('long')}"
        )
    raw_min = data.get("min_events", 0)
    if isinstance(raw_min, bool) or not isinstance(raw_min, int) or raw_min < 0:
        raise ValueError(f"burn rule min_events {raw_min!r} must be a whole number of events, 0 or more")
    return BurnRule(severity, factor, long_s, short_s, raw_min)


def spec_from(data: Mapping[str, Any]) -> SloSpec:
    """An SLO from its JSON form (the API's body, the CLI's flags), checked whole."""
    name = str(data.get("name", ""))
    if not _NAME.match(name):
        raise ValueError(f"name {name!r}: lower-case letters, digits, '.', '_', '-', at most 64")
    model = str(data.get("model", ""))
    if not model or ":" in model or len(model) > 128:
        raise ValueError("model: a model name (every version counts), without ':version'")
    hardware_id = data.get("hardware_id")
    if hardware_id is not None and (
        not isinstance(hardware_id, str) or not hardware_id or len(hardware_id) > 128
    ):
        raise ValueError("hardware_id: a non-empty string of at most 128 characters")
    raw_objectives = data.get("objectives") or []
    if not isinstance(raw_objectives, Sequence) or not raw_objectives:
        raise ValueError("objectives: at least one")
    objectives = tuple(objective_from(o) for o in raw_objectives)
    if len({o.sli for o in objectives}) != len(objectives):
        raise ValueError("objectives: one per sli")
    raw_rules = data.get("rules")
    rules = tuple(rule_from(r) for r in raw_rules) if raw_rules else DEFAULT_RULES
    labels = dict(data.get("labels") or {})
    for k, v in labels.items():
        if not _LABEL_NAME.match(str(k)) or not isinstance(v, str) or len(v) > 128:
            raise ValueError(f"label {k!r}: a Prometheus label name and a string value")
    return SloSpec(name, model, hardware_id, objectives, rules, labels)


def spec_as_dict(spec: SloSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "model": spec.model,
        "hardware_id": spec.hardware_id,
        "objectives": [o.as_dict() for o in spec.objectives],
        "rules": [r.as_dict() for r in spec.rules],
        "labels": dict(spec.labels),
    }
