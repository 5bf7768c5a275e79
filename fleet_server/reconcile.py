"""Keeping devices honest, the decision: is a device off its desired state, and should its directive
be republished now?

Pure functions of (the directive this replica knows, the seq the database says it published,
what the device reported, when this replica last republished, now); the I/O around them (the
retained ``desired`` topics, reported messages as they are stored, a timer, publishing) is
``fleet_server.reconciler``.

Why a server must do this at all: a retained directive is the device's only copy of its desired
state, and it can go away (deleted with an empty retained message, a broker that lost its
store) or be missed (a device whose data directory was wiped and that picked up something
older). The device then stays where it is and says so in its reported snapshot; the server,
which knows the seq it published, sees the difference and sends the directive again. A
republished directive carries its original seq and signature, so a device that already has it
ignores it as a duplicate.

Drift kinds:

- ``seq_behind``: the device reports an older seq than the server published;
- ``model_mismatch``: the device reports the desired seq, settled (serving, probation, idle),
  but runs another model than the directive names (not while it reports waiting for that seq:
  its maintenance window, an app's deferral or its metered link);
- ``seq_ahead``: the device reports a seq the server never published (counted; republishing
  cannot fix it, the rollout engine's next directive will);
- ``directive_missing``: a retained directive this replica holds was deleted (restored at
  once, rate-limited; a deletion of a topic it holds nothing for is no drift).

Never republished: within the grace after the directive went out (the device is on its way),
before its ``not_before`` window, after it expired (the engine issues a new one), when the
device refused that very seq (its ``last_rejection``; repeating it changes nothing), or when this
replica does not hold the directive for the seq the database names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

SETTLED_STATES = frozenset({"serving", "probation", "idle"})


class Drift(StrEnum):
    NONE = "in_sync"
    BEHIND = "seq_behind"
    AHEAD = "seq_ahead"
    MODEL = "model_mismatch"
    MISSING = "directive_missing"


@dataclass(frozen=True)
class Directive:
    """What a replica knows of the directive it (or another replica) published to one device."""

    seq: int
    model_sha256: str | None  # None: "keep what you run"
    shadow: bool  # a shadow directive: the device keeps serving its current model
    expires_at: datetime
    not_before: datetime | None
    seen_at: float  # monotonic time this replica published it or first saw it retained


@dataclass(frozen=True)
class Reported:
    """The parts of a device's reported snapshot that say where it is."""

    seq: int
    state: str
    running_sha256: str | None
    rejected_seq: int | None = None  # the seq of its last refused or failed directive
    waiting_seq: int | None = None  # the seq it holds and waits with (window, deferral, metered link)


@dataclass(frozen=True)
class Observation:
    """A live reported snapshot, as stored, with the seq the database says was last published."""

    device_id: str
    desired_seq: int
    reported: Reported


@dataclass(frozen=True)
class Policy:
    grace: float = 10.0  # s a device may take to pick a directive up before it counts as drift
    interval: float = 30.0  # s between two republishes to one device


@dataclass(frozen=True)
class Verdict:
    drift: Drift
    republish: bool = False
    retry_at: float | None = None  # look again then (monotonic), with the device's latest report
    why: str = ""

    @property
    def drifting(self) -> bool:
        return self.drift is not Drift.NONE


def classify(desired_seq: int, directive: Directive | None, reported: Reported) -> Drift:
    """Where the device is relative to the newest seq published to it (database or directive)."""
    target = max(desired_seq, directive.seq if directive is not None else 0)
    if target == 0:
        return Drift.NONE  # never directed
    if reported.seq > target:
        return Drift.AHEAD
    if reported.seq < target:
        return Drift.BEHIND
    if reported.waiting_seq == target:
        return Drift.NONE  # it has the directive and says why it waits: republishing changes nothing
    if (
        directive is not None
        and directive.seq == target
        and directive.model_sha256 is not None
        and not directive.shadow
        and reported.state in SETTLED_STATES
        and reported.running_sha256 != directive.model_sha256
    ):
        return Drift.MODEL
    return Drift.NONE


def decide(
    desired_seq: int,
    directive: Directive | None,
    reported: Reported,
    last_republish: float | None,
    now: float,
    wall: datetime,
    policy: Policy,
) -> Verdict:
    """Republish the directive now, look again later, or leave the device alone."""
    drift = classify(desired_seq, directive, reported)
    if drift is Drift.NONE:
        return Verdict(drift)
    if drift is Drift.AHEAD:
        return Verdict(drift, why=f"reports seq {reported.seq}, never published (newest {desired_seq})")
    if directive is None or directive.seq < desired_seq:
        return Verdict(drift, why=f"this replica does not hold the directive for seq {desired_seq}")
    if reported.rejected_seq == directive.seq:
        return Verdict(drift, why=f"the device refused seq {directive.seq}; the engine decides what next")
    return _when(drift, directive, last_republish, now, wall, policy)


def restore(
    directive: Directive | None, last_republish: float | None, now: float, wall: datetime, policy: Policy
) -> Verdict:
    """The retained directive was deleted: put it back at once (no grace), but rate-limited."""
    if directive is None:  # nothing retained that this replica knows of: nothing to put back
        return Verdict(Drift.NONE, why="no directive held for the device")
    return _when(Drift.MISSING, directive, last_republish, now, wall, Policy(0.0, policy.interval))


def _when(
    drift: Drift,
    directive: Directive,
    last_republish: float | None,
    now: float,
    wall: datetime,
    policy: Policy,
) -> Verdict:
    if directive.expires_at <= wall:
        return Verdict(drift, why=f"seq {directive.seq} expired; the engine issues a new directive")
    if directive.not_before is not None and directive.not_before > wall and drift is Drift.BEHIND:
        wait = (directive.not_before - wall).total_seconds()
        return Verdict(drift, retry_at=now + wait + policy.grace, why="waiting for its maintenance window")
    due = directive.seen_at + policy.grace
    if last_republish is not None:
        due = max(due, last_republish + policy.interval)
    if now < due:
        return Verdict(drift, retry_at=due, why="within grace or rate limit")
    return Verdict(drift, republish=True, why=f"republish seq {directive.seq}")
