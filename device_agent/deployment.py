"""The deployment state machine: one table of (state, trigger) -> state, and nothing else moves it.

The agent reports its deployment state on the wire (``Reported.deployment_state``,
``Event.state``), so the states are the wire's :class:`DeploymentState` values.
Every change of state goes through :meth:`Deployment.on`, which looks the move up
in :data:`TRANSITIONS` and raises :class:`IllegalTransition` when the table does
not allow it (h11's rule: the table is the machine, and the diagram in
``docs/agent.md`` is generated from it by :func:`mermaid`).

States fall in two groups. *Resting* states are where a directive's work ends
and where the next one may begin: ``idle``, ``serving``, ``shadowing``,
``probation`` (a newer directive supersedes a probation), ``staged`` (the
model waits in the inactive slot for its maintenance window; a newer directive
supersedes it too), ``reverted`` and ``failed``. *Working* states
(``verifying``, ``downloading``, ``installing``, ``warming``, ``swapping``)
only lead on, or to ``failed``. ``rejected`` is never a state the device is
in: a refused directive never became the deployment, so it is only ever the
state of an Event.

The record also names the model that serves. Only a swap (``swapped``,
``swapped_on_probation``) or a probation's ``revert`` may change it; a restart
restores it from disk (:meth:`Deployment.restored`, :meth:`Deployment.booted`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from device_agent.wire import DeploymentState, ReasonCode
from signing.errors import CodedError

DS = DeploymentState


class Trigger(StrEnum):
    """What happened; the table says where each leads from each state."""

    BEGIN = "begin"  # a newer directive is taken up: same state, its seq, no error
    KEEP = "keep"  # the directive asks for the model that serves already
    KEEP_NONE = "keep_none"  # the directive asks for nothing new and no model serves
    VERIFY = "verify"  # checking release metadata, a bundle envelope or a model already on disk
    DOWNLOAD = "download"  # fetching the bundle envelope or the model file
    INSTALL = "install"  # committing the verified download into the inactive slot
    WARM = "warm"  # loading and warming the new model aside
    STAGE = "stage"  # verified in the inactive slot; its window is closed (or an app defers)
    SWAP = "swap"  # about to replace the serving reference
    SWAPPED = "swapped"  # the new model serves
    SWAPPED_ON_PROBATION = "swapped_on_probation"  # the new model serves, watched, the old one kept
    PASS = "pass"  # the probation passed
    REVERT = "revert"  # the probation failed: the previous model serves again
    SHADOW = "shadow"  # a candidate runs beside the serving model, never served
    FAIL = "fail"  # the directive could not be carried out; nothing was swapped


RESTING: tuple[DeploymentState, ...] = (
    DS.IDLE,
    DS.SERVING,
    DS.SHADOWING,
    DS.PROBATION,
    DS.STAGED,
    DS.REVERTED,
    DS.FAILED,
)
WORKING: tuple[DeploymentState, ...] = (DS.VERIFYING, DS.DOWNLOADING, DS.INSTALLING, DS.WARMING, DS.SWAPPING)

_FROM_REST: dict[Trigger, DeploymentState] = {
    Trigger.KEEP: DS.SERVING,
    Trigger.KEEP_NONE: DS.IDLE,
    Trigger.VERIFY: DS.VERIFYING,
    Trigger.DOWNLOAD: DS.DOWNLOADING,
    Trigger.FAIL: DS.FAILED,
}

# The one table. Read a row as: in this state, on this trigger, go there.
TRANSITIONS: Mapping[tuple[DeploymentState, Trigger], DeploymentState] = {
    **{(rest, Trigger.BEGIN): rest for rest in RESTING},
    **{(rest, trigger): target for rest in RESTING for trigger, target in _FROM_REST.items()},
    (DS.VERIFYING, Trigger.VERIFY): DS.VERIFYING,  # release metadata first, then the file on disk
    (DS.VERIFYING, Trigger.DOWNLOAD): DS.DOWNLOADING,
    (DS.VERIFYING, Trigger.WARM): DS.WARMING,  # the model was already in a slot
    (DS.VERIFYING, Trigger.SHADOW): DS.SHADOWING,  # the candidate was already in a slot
    (DS.VERIFYING, Trigger.FAIL): DS.FAILED,
    (DS.DOWNLOADING, Trigger.VERIFY): DS.VERIFYING,  # the envelope arrived: check it before the model
    (DS.DOWNLOADING, Trigger.INSTALL): DS.INSTALLING,
    (DS.DOWNLOADING, Trigger.FAIL): DS.FAILED,
    (DS.VERIFYING, Trigger.STAGE): DS.STAGED,  # already in a slot, but its window is closed
    (DS.INSTALLING, Trigger.STAGE): DS.STAGED,
    (DS.STAGED, Trigger.WARM): DS.WARMING,  # the window opened (and no app defers any more)
    (DS.INSTALLING, Trigger.WARM): DS.WARMING,
    (DS.INSTALLING, Trigger.SHADOW): DS.SHADOWING,
    (DS.INSTALLING, Trigger.FAIL): DS.FAILED,
    (DS.WARMING, Trigger.SWAP): DS.SWAPPING,
    (DS.WARMING, Trigger.FAIL): DS.FAILED,
    (DS.SWAPPING, Trigger.SWAPPED): DS.SERVING,
    (DS.SWAPPING, Trigger.SWAPPED_ON_PROBATION): DS.PROBATION,
    (DS.SWAPPING, Trigger.FAIL): DS.FAILED,
    (DS.PROBATION, Trigger.PASS): DS.SERVING,
    (DS.PROBATION, Trigger.REVERT): DS.REVERTED,
}

MODEL_CHANGES = frozenset({Trigger.SWAPPED, Trigger.SWAPPED_ON_PROBATION, Trigger.REVERT})
CARRIES_ERROR = frozenset({Trigger.FAIL, Trigger.REVERT})


class IllegalTransition(CodedError):
    """A move the table does not allow: a defect in the agent, reported as ``internal_error``."""

    code = ReasonCode.INTERNAL_ERROR

    def __init__(self, state: DeploymentState, trigger: Trigger, why: str = "") -> None:
        super().__init__(f"cannot {trigger.value} while {state.value}" + (f": {why}" if why else ""))
        self.state, self.trigger = state, trigger


@dataclass(frozen=True)
class Outcome:
    """What ``state.json`` keeps of the last directive: its seq, where it ended, why it failed."""

    seq: int
    state: DeploymentState
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "state": self.state.value, "error": self.error}

    @classmethod
    def from_dict(cls, data: object) -> Outcome | None:
        """Read a stored outcome; None for anything that is not one (a damaged file loses only this)."""
        if not isinstance(data, dict):
            return None
        seq, state, error = data.get("seq"), data.get("state"), data.get("error")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            return None
        if not isinstance(state, str) or state not in DS.__members__.values():
            return None
        return cls(seq, DS(state), error if isinstance(error, str) else None)


@dataclass(frozen=True)
class Deployment:
    """Where the device stands: the directive it works on or finished last, and what serves."""

    seq: int = 0
    state: DeploymentState = DS.IDLE
    error: str | None = None
    model: str | None = None  # sha256 of the serving model

    def on(
        self, trigger: Trigger, seq: int, *, error: str | None = None, model: str | None = None
    ) -> Deployment:
        """The record after ``trigger`` for directive ``seq``; IllegalTransition if the table forbids it.

        ``error`` is the reason of a ``fail`` or ``revert`` (and only of those); ``model``
        is what serves after a swap or a revert (a revert with nothing to go back to
        keeps the model that serves).
        """
        target = TRANSITIONS.get((self.state, trigger))
        if target is None:
            raise IllegalTransition(self.state, trigger)
        if (error is not None) != (trigger in CARRIES_ERROR):
            raise IllegalTransition(self.state, trigger, "only fail and revert carry a reason")
        if model is not None and trigger not in MODEL_CHANGES:
            raise IllegalTransition(self.state, trigger, "only a swap or a revert changes the model")
        if trigger in (Trigger.SWAPPED, Trigger.SWAPPED_ON_PROBATION) and model is None:
            raise IllegalTransition(self.state, trigger, "a swap names the model it swapped in")
        return Deployment(seq, target, error, self.model if model is None else model)

    @property
    def resting(self) -> bool:
        return self.state in RESTING

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.seq, self.state, self.error)

    @classmethod
    def restored(cls, stored: Outcome | None, last_seq: int) -> Deployment:
        """The record a (re)started agent begins with, before any model is loaded.

        Always a resting state: work interrupted by a restart left nothing behind
        that the retained directive will not redo, and an unknown or refused state
        (``rejected`` is never stored) reads as idle.
        """
        if stored is None:
            return cls(seq=max(0, last_seq))
        # ``staged`` is never stored (a restart stages the retained directive again), but a file
        # that says so must not end the directive's work either.
        state = stored.state if stored.state in RESTING and stored.state is not DS.STAGED else DS.IDLE
        return cls(seq=max(0, stored.seq), state=state, error=stored.error if state is DS.FAILED else None)

    def booted(self, model: str | None, probation_seq: int | None = None) -> Deployment:
        """After the restart loaded ``model`` from disk (None: nothing usable).

        A swap still on probation resumes (``probation_seq``); a device that serves a
        model but never finished a directive (installed before it was enrolled, say)
        reports ``serving`` rather than ``idle``.
        """
        if probation_seq is not None and model is not None:
            return Deployment(probation_seq, DS.PROBATION, None, model)
        state = self.state
        if model is not None and state in (DS.IDLE, DS.FAILED) and self.seq == 0:
            state = DS.SERVING
        return replace(self, state=state, model=model)


def moves(
    table: Mapping[tuple[DeploymentState, Trigger], DeploymentState] = TRANSITIONS,
) -> list[tuple[DeploymentState, DeploymentState, list[Trigger]]]:
    """Each (from, to) pair of the table once, with the triggers that make it, in a stable order."""
    states, triggers = list(DS), list(Trigger)
    pairs: dict[tuple[DeploymentState, DeploymentState], list[Trigger]] = {}
    for (src, trigger), dst in table.items():
        pairs.setdefault((src, dst), []).append(trigger)
    return [
        (src, dst, sorted(ts, key=triggers.index))
        for (src, dst), ts in sorted(
            pairs.items(), key=lambda kv: (states.index(kv[0][0]), states.index(kv[0][1]))
        )
    ]


def mermaid(table: Mapping[tuple[DeploymentState, Trigger], DeploymentState] = TRANSITIONS) -> str:
    """The table as a mermaid ``stateDiagram-v2`` (``docs/agent.md`` shows it; a test compares them).

    A move every resting state makes alike (a new directive's first step, a
    failure) is drawn once from a node standing for all of them; the ``begin``
    self-loops are left out. A restart enters at ``idle`` or at the resting state
    restored from disk.
    """
    shared = {
        trigger: target
        for trigger in Trigger
        if trigger is not Trigger.BEGIN
        and len({table.get((rest, trigger)) for rest in RESTING}) == 1
        and (target := table.get((RESTING[0], trigger))) is not None
    }
    lines = [
        "stateDiagram-v2",
        '    state "any resting state" as resting',
        f"    note right of resting: {', '.join(s.value for s in RESTING)}",
        f"    [*] --> {DS.IDLE.value}",
    ]
    lines += [f"    resting --> {target.value}: {trigger.value}" for trigger, target in shared.items()]
    for src, dst, triggers in moves(table):
        shown = [
            t.value
            for t in triggers
            if not (src in RESTING and (t in shared or (t is Trigger.BEGIN and src == dst)))
        ]
        if shown:
            lines.append(f"    {src.value} --> {dst.value}: {' / '.join(shown)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m device_agent.deployment > diagram.mmd
    print(mermaid(), end="")


__all__ = [
    "CARRIES_ERROR",
    "MODEL_CHANGES",
    "RESTING",
    "TRANSITIONS",
    "WORKING",
    "Deployment",
    "IllegalTransition",
    "Outcome",
    "Trigger",
    "mermaid",
    "moves",
]
