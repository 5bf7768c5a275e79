"""Alerts from SLO statuses: their lifecycle, deduplication and grouping, and silences.

One alert per (model, cohort, severity): however many SLOs and objectives of a
model breach at once, the person paged gets one page naming every cause, and a
burn that goes on is the same alert, not a new one each evaluation. An alert
moves through ``TRANSITIONS`` (one table; an illegal move raises): pending while
a breach has lasted less than ``pending_s``, firing, resolved when no rule
has breached for ``resolve_s``, by default the short window of the rules that
fired it (a burn hovering at a rule's threshold would otherwise fire and
resolve every few evaluations: Prometheus' ``keep_firing_for``; measured over
28 days exactly at a 99.5% SLO, the ticket rule fired 256 times without it,
11 times with it).

A silence (a declared planned-rollout window for a model, optionally one cohort)
lets the alert go through its lifecycle but holds its notifications; an alert
still firing when the window ends is notified then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from fleet_server.slo.burn import SloStatus
from fleet_server.slo.spec import Severity


class AlertState(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


class AlertEvent(StrEnum):
    BREACH = "breach"  # some rule of the group breaches at this evaluation
    CLEAR = "clear"  # none does
    HELD = "held"  # the breach has lasted the pending time
    QUIET = "quiet"  # no breach for the resolve time


S, E = AlertState, AlertEvent
TRANSITIONS: Mapping[tuple[AlertState, AlertEvent], AlertState] = {
    (S.INACTIVE, E.BREACH): S.PENDING,
    (S.INACTIVE, E.CLEAR): S.INACTIVE,
    (S.PENDING, E.BREACH): S.PENDING,
    (S.PENDING, E.HELD): S.FIRING,
    (S.PENDING, E.CLEAR): S.INACTIVE,
    (S.FIRING, E.BREACH): S.FIRING,
    (S.FIRING, E.CLEAR): S.FIRING,
    (S.FIRING, E.QUIET): S.RESOLVED,
    (S.RESOLVED, E.BREACH): S.PENDING,
    (S.RESOLVED, E.CLEAR): S.RESOLVED,
}


class IllegalTransition(ValueError):
    pass


def transition(state: AlertState, event: AlertEvent) -> AlertState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"alert {state} cannot take {event}") from None


@dataclass(frozen=True, order=True)
class AlertKey:
    model: str
    hardware_id: str  # "" for the whole fleet
    severity: Severity

    @property
    def id(self) -> str:
        return f"{self.model}/{self.hardware_id or '*'}/{self.severity}"


@dataclass(frozen=True)
class Alert:
    key: AlertKey
    state: AlertState = AlertState.INACTIVE
    since: float = 0.0  # when the current state began
    fired_at: float | None = None
    resolved_at: float | None = None
    causes: tuple[str, ...] = ()  # "slo objective rule: burn rates", for the person paged
    silenced: bool = False
    notified: bool = False  # a firing notification went out and no resolved one since
    clear_since: float | None = None  # firing, but no rule has breached since then
    quiet_s: float = 0.0  # how long it must stay clear to resolve (the breaching rules' short window)


@dataclass(frozen=True)
class Silence:
    """A planned-rollout window: alerts of ``model`` (one cohort, or all) are not notified in it."""

    model: str
    starts: float
    ends: float
    hardware_id: str | None = None
    reason: str = ""

    def covers(self, key: AlertKey, now: float) -> bool:
        return (
            self.model == key.model
            and (self.hardware_id is None or self.hardware_id == key.hardware_id)
            and self.starts <= now < self.ends
        )


@dataclass(frozen=True)
class Notification:
    alert: Alert
    status: str  # "firing" | "resolved"


@dataclass
class Step:
    alerts: dict[AlertKey, Alert] = field(default_factory=dict)
    notifications: list[Notification] = field(default_factory=list)


def breaches(statuses: Iterable[SloStatus]) -> dict[AlertKey, list[str]]:
    """The causes of every breaching rule, grouped by (model, cohort, severity)."""
    return {k: v[0] for k, v in _breaches(statuses).items()}


def _breaches(statuses: Iterable[SloStatus]) -> dict[AlertKey, tuple[list[str], float]]:
    """Per alert: the causes, and the longest short window of the rules breaching."""
    out: dict[AlertKey, tuple[list[str], float]] = {}
    for status in statuses:
        spec = status.spec
        for o in status.objectives:
            for r in o.rules:
                if r.breaching:
                    key = AlertKey(spec.model, spec.hardware_id or "", r.rule.severity)
                    causes, quiet = out.get(key, ([], 0.0))
                    out[key] = (causes, max(quiet, r.rule.short_s))
                    causes.append(
                        f"{spec.name} {o.objective.sli} {r.rule.name}: burn {r.long_burn:.1f}x"
                        f"/{r.short_burn:.1f}x over {r.rule.factor:g}x"
                    )
    return out


def step_alerts(
    current: Mapping[AlertKey, Alert],
    statuses: Sequence[SloStatus],
    silences: Sequence[Silence],
    now: float,
    *,
    pending_s: float = 0.0,
    resolve_s: float | None = 0.0,
    keep_resolved_s: float = 86400.0,
) -> Step:
    """The alerts after one evaluation, and the notifications to send. ``resolve_s``: how long a
    firing alert must be clear to resolve; None: the short window of the rules that breached."""
    found = _breaches(statuses)
    out = Step()
    for key in sorted(set(current) | set(found)):
        alert = current.get(key) or Alert(key, since=now)
        event = AlertEvent.BREACH if key in found else AlertEvent.CLEAR
        state = transition(alert.state, event)
        quiet_s = max(alert.quiet_s, found[key][1]) if key in found else alert.quiet_s
        clearing = state == AlertState.FIRING and event == AlertEvent.CLEAR
        clear_since = (alert.clear_since or now) if clearing else None
        if clear_since is not None and now - clear_since >= (quiet_s if resolve_s is None else resolve_s):
            state, clear_since = transition(state, AlertEvent.QUIET), None
        since = alert.since if state == alert.state else now
        if state == AlertState.PENDING and now - since >= pending_s:
            state, since = transition(state, AlertEvent.HELD), now
        silenced = any(s.covers(key, now) for s in silences)
        causes = tuple(found[key][0]) if key in found else alert.causes
        if state == AlertState.RESOLVED:
            quiet_s = 0.0
        new = replace(
            alert,
            state=state,
            since=since,
            causes=causes,
            silenced=silenced,
            clear_since=clear_since,
            quiet_s=quiet_s,
        )
        if state == AlertState.FIRING and alert.state != AlertState.FIRING:
            new = replace(new, fired_at=now, resolved_at=None)
        if state == AlertState.RESOLVED and alert.state == AlertState.FIRING:
            new = replace(new, resolved_at=now)
        if state == AlertState.FIRING and not new.notified and not silenced:
            new = replace(new, notified=True)
            out.notifications.append(Notification(new, "firing"))
        elif state == AlertState.RESOLVED and new.notified:
            new = replace(new, notified=False)
            out.notifications.append(Notification(new, "resolved"))
        if state == AlertState.INACTIVE or (
            state == AlertState.RESOLVED
            and new.resolved_at is not None
            and now - new.resolved_at > keep_resolved_s
        ):
            continue  # nothing to remember
        out.alerts[key] = new
    return out
