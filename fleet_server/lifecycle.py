"""The rollout lifecycle: the states of a rollout and of a device within it, and the one table of
legal moves for each.

Every state change goes through :meth:`Lifecycle.move`: the engine's decisions (gates, stages,
assignments, device reports) and the operator's actions (pause, resume, abort, approve,
rollback) alike, so the two can never disagree on what is allowed, and a move the table does
not list raises :class:`IllegalMove` instead of writing a state nobody designed for. The
operator's repeats (pausing a paused rollout) are listed as moves to the same state: they are
legal and change nothing.

The state diagrams in docs/rollouts.md are generated from these tables
(``python -m fleet_server.lifecycle`` prints them; a test fails when the page differs).

The state values are stored in the database and shown by the API and the CLI: never rename one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum, nonmember
from pathlib import Path
from typing import Any, Generic, TypeVar


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    AWAITING_APPROVAL = "awaiting_approval"  # a stage soaked; a human must approve the next one
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    # Plain-string tuples (not members) so they also serve as SQL ``IN`` lists.
    ACTIVE = nonmember((RUNNING, PAUSED, AWAITING_APPROVAL))
    FINISHED = nonmember((COMPLETED, ROLLED_BACK, ABORTED))


class DeviceRolloutState(StrEnum):
    PENDING = "pending"
    SHADOWING = "shadowing"  # runs the new model beside its current one, never served (shadow gate)
    NOTIFIED = "notified"
    INSTALLING = "installing"
    WAITING = "waiting"  # the device waits for its window, an app's deferral or its link: no timeout
    RETRY_WAIT = "retry_wait"  # failed with a retryable class; re-notified after a backoff
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"
    HELD = "held"  # not assigned: its hardware class (cohort) was halted by a gate
    IN_FLIGHT = nonmember((SHADOWING, NOTIFIED, INSTALLING, WAITING, RETRY_WAIT))
    FINISHED = nonmember((DONE, FAILED, TIMED_OUT))


class RolloutTrigger(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    APPROVE = "approve"
    ROLLBACK = "rollback"
    GATE_PAUSE = "gate_pause"
    GATE_ROLL_BACK = "gate_roll_back"
    AWAIT_APPROVAL = "await_approval"
    NEXT_STAGE = "next_stage"
    COMPLETE = "complete"


OPERATOR_ACTIONS = (
    RolloutTrigger.PAUSE,
    RolloutTrigger.RESUME,
    RolloutTrigger.ABORT,
    RolloutTrigger.APPROVE,
    RolloutTrigger.ROLLBACK,
)
"""The triggers an operator fires (``POST /api/v1/rollouts/{id}/{action}``); the engine fires the rest."""


class DeviceTrigger(StrEnum):
    ASSIGN = "assign"
    ASSIGN_SHADOW = "assign_shadow"
    PROMOTE = "promote"
    RETRY = "retry"
    RETRY_SHADOW = "retry_shadow"
    PROGRESS = "progress"
    WAIT = "wait"
    PROCEED = "proceed"
    SERVING_PROOF = "serving_proof"
    FAIL_RETRYABLE = "fail_retryable"
    FAIL = "fail"
    TIME_OUT = "time_out"
    HOLD = "hold"
    RELEASE = "release"
    REDELIVER = "redeliver"
    ROLL_BACK = "roll_back"


S = TypeVar("S", bound=StrEnum)
T = TypeVar("T", bound=StrEnum)


class IllegalMove(Exception):
    """A trigger the lifecycle does not allow in the current state (nothing was changed)."""

    def __init__(self, machine: str, state: str, trigger: str) -> None:
        super().__init__(f"{machine}: {trigger!r} is not allowed in state {state!r}")
        self.machine = machine
        self.state = state
        self.trigger = trigger


@dataclass(frozen=True)
class Lifecycle(Generic[S, T]):
    """One state machine: ``moves[state][trigger]`` is the state the trigger leads to."""

    name: str
    states: type[S]
    initial: S
    moves: Mapping[S, Mapping[T, S]]
    notes: Mapping[T, str]  # when each trigger fires, for the docs

    def move(self, state: str, trigger: T) -> S:
        """The state ``trigger`` leads to from ``state``; raises :class:`IllegalMove` if it may not happen."""
        try:
            return self.moves[state][trigger]  # type: ignore[index]  # a stored str equals its member
        except KeyError:
            raise IllegalMove(self.name, state, trigger) from None

    def allows(self, state: str, trigger: T) -> bool:
        return trigger in self.moves.get(state, {})  # type: ignore[call-overload]

    def sources(self, trigger: T) -> frozenset[S]:
        """Every state ``trigger`` may leave."""
        return frozenset(s for s, out in self.moves.items() if trigger in out)

    def edges(self) -> Iterator[tuple[S, T, S]]:
        for state, out in self.moves.items():
            for trigger, target in out.items():
                yield state, trigger, target

    def mermaid(self) -> str:
        """The table as a mermaid state diagram (one arrow per move, in table order)."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.initial}"]
        lines += [f"    {a} --> {b}: {t}" for a, t, b in self.edges()]
        lines += [f"    {s} --> [*]" for s in self.states if not self.moves.get(s)]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The diagram and what each trigger means, as docs/rollouts.md shows them."""
        triggers = dict.fromkeys(t for _, t, _ in self.edges())
        legend = [f"| `{t}` | {self.notes[t]} |" for t in triggers]
        return "\n".join(
            ["```mermaid", self.mermaid(), "```", "", "| trigger | when |", "|---|---|", *legend]
        )


RS, DS = RolloutState, DeviceRolloutState
RT, DT = RolloutTrigger, DeviceTrigger

ROLLOUT: Lifecycle[RolloutState, RolloutTrigger] = Lifecycle(
    "rollout",
    RolloutState,
    RS.RUNNING,
    {
        RS.RUNNING: {
            RT.NEXT_STAGE: RS.RUNNING,
            RT.AWAIT_APPROVAL: RS.AWAITING_APPROVAL,
            RT.COMPLETE: RS.COMPLETED,
            RT.GATE_PAUSE: RS.PAUSED,
            RT.GATE_ROLL_BACK: RS.ROLLED_BACK,
            RT.PAUSE: RS.PAUSED,
            RT.RESUME: RS.RUNNING,
            RT.APPROVE: RS.RUNNING,
            RT.ABORT: RS.ABORTED,
            RT.ROLLBACK: RS.ROLLED_BACK,
        },
        RS.AWAITING_APPROVAL: {
            RT.APPROVE: RS.RUNNING,
            RT.NEXT_STAGE: RS.RUNNING,
            RT.GATE_PAUSE: RS.PAUSED,
            RT.GATE_ROLL_BACK: RS.ROLLED_BACK,
            RT.PAUSE: RS.PAUSED,
            RT.ABORT: RS.ABORTED,
            RT.ROLLBACK: RS.ROLLED_BACK,
        },
        RS.PAUSED: {
            RT.RESUME: RS.RUNNING,
            RT.APPROVE: RS.RUNNING,
            RT.GATE_ROLL_BACK: RS.ROLLED_BACK,
            RT.PAUSE: RS.PAUSED,
            RT.ABORT: RS.ABORTED,
            RT.ROLLBACK: RS.ROLLED_BACK,
        },
        RS.COMPLETED: {RT.ROLLBACK: RS.ROLLED_BACK},
        RS.ABORTED: {RT.ABORT: RS.ABORTED, RT.ROLLBACK: RS.ROLLED_BACK},
        RS.ROLLED_BACK: {RT.ROLLBACK: RS.ROLLED_BACK},
    },
    {
        RT.NEXT_STAGE: "engine: the stage's devices finished, the gates pass and it soaked"
        " (approved first if the policy requires approval)",
        RT.AWAIT_APPROVAL: "engine: a stage soaked and `require_approval` wants a human before the next",
        RT.COMPLETE: "engine: the last stage soaked with the gates passing",
        RT.GATE_PAUSE: "engine: a gate whose action is `pause` trips (the gates keep watching while"
        " awaiting approval), or a stage waited `max_label_wait_seconds` for the accuracy gate's labels",
        RT.GATE_ROLL_BACK: "engine: a gate whose action is `roll_back` trips; also while paused: pausing"
        " stops assignment, not protection",
        RT.PAUSE: "operator: no new devices are notified (repeated: no-op)",
        RT.RESUME: "operator: assignment goes on; a pausing gate that still fails pauses again"
        " (repeated: no-op); from paused, the devices that could not fetch the release are sent it"
        " again",
        RT.APPROVE: "operator: accepts the current stage, passing a manual gate or overriding a pausing one",
        RT.ABORT: "operator: nothing more is sent; devices keep what they run (repeated: no-op)",
        RT.ROLLBACK: "operator asks, the engine leader carries it out on its next tick: every device"
        " that got the model is sent back to the one it ran before (repeated: no-op)",
    },
)

_FAILURES: dict[DeviceTrigger, DeviceRolloutState] = {
    DT.FAIL_RETRYABLE: DS.RETRY_WAIT,
    DT.FAIL: DS.FAILED,
    DT.TIME_OUT: DS.TIMED_OUT,
    DT.ROLL_BACK: DS.ROLLED_BACK,
}

DEVICE: Lifecycle[DeviceRolloutState, DeviceTrigger] = Lifecycle(
    "device in rollout",
    DeviceRolloutState,
    DS.PENDING,
    {
        DS.PENDING: {DT.ASSIGN: DS.NOTIFIED, DT.ASSIGN_SHADOW: DS.SHADOWING, DT.HOLD: DS.HELD},
        DS.HELD: {DT.RELEASE: DS.PENDING},
        DS.SHADOWING: {DT.PROMOTE: DS.NOTIFIED, **_FAILURES},
        DS.NOTIFIED: {
            DT.PROGRESS: DS.INSTALLING,
            DT.WAIT: DS.WAITING,
            DT.SERVING_PROOF: DS.DONE,
            **_FAILURES,
        },
        DS.INSTALLING: {DT.WAIT: DS.WAITING, DT.SERVING_PROOF: DS.DONE, **_FAILURES},
        DS.WAITING: {DT.PROCEED: DS.INSTALLING, DT.SERVING_PROOF: DS.DONE, **_FAILURES},
        DS.RETRY_WAIT: {DT.RETRY: DS.NOTIFIED, DT.RETRY_SHADOW: DS.SHADOWING, DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.DONE: {DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.FAILED: {DT.REDELIVER: DS.RETRY_WAIT, DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.TIMED_OUT: {DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.ROLLED_BACK: {},
    },
    {
        DT.ASSIGN: "its stage starts: a directive with the rollout model is published",
        DT.ASSIGN_SHADOW: "its stage starts under a shadow gate: the model runs beside its own, never served",
        DT.HOLD: "its hardware class (cohort) was halted by a gate; it is not assigned",
        DT.RELEASE: "a human approved the stage, or resumed the rollout after a delivery hold: a paused"
        " cohort's devices may be assigned again",
        DT.PROMOTE: "the rollout's shadow agreement passed with its minimum sample: the model for real",
        DT.FAIL_RETRYABLE: "failed, rejected, reverted or timed out, and its failure class has retries left",
        DT.FAIL: "failed, rejected or reverted for the directive's seq, no retries left",
        DT.TIME_OUT: "`device_timeout_seconds` without serving proof (counted from when it last stopped"
        " waiting), or `max_wait_seconds` waiting, no retries left",
        DT.ROLL_BACK: "a directive sends it back to the model it ran before (the rollout or its cohort"
        " rolls back)",
        DT.PROGRESS: "an event or a report for the directive's seq",
        DT.WAIT: "it reports waiting for the directive's seq: its maintenance window, an app's deferral or"
        " its metered link (not a failure; the device timeout stops)",
        DT.PROCEED: "it no longer reports waiting: the device timeout starts again from now",
        DT.SERVING_PROOF: "it reports the rollout model running, out of probation, and served at least"
        " one successful inference with it",
        DT.RETRY: "the backoff elapsed: the model again, in a directive with a higher seq",
        DT.RETRY_SHADOW: "the backoff elapsed while the rollout still shadows first",
        DT.REDELIVER: "a human resumed the paused rollout and its failure class is a delivery failure"
        " (it could not fetch the release): sent it again at once, with the delivery retries anew",
    },
)

MACHINES: dict[str, Lifecycle[Any, Any]] = {"rollout": ROLLOUT, "device": DEVICE}

_BEGIN = "<!-- {name} lifecycle from fleet_server/lifecycle.py: python -m fleet_server.lifecycle --write -->"
_END = "<!-- end of the generated {name} lifecycle -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "rollouts.md"


def render_into(doc: str) -> str:
    """``doc`` with each machine's block between its markers replaced by what the tables give now."""
    for name, machine in MACHINES.items():
        begin, end = _BEGIN.format(name=name), _END.format(name=name)
        head, found, rest = doc.partition(begin)
        _, found_end, tail = rest.partition(end)
        if not (found and found_end):
            raise ValueError(f"no {begin!r} ... {end!r} markers in the page")
        doc = f"{head}{begin}\n{machine.markdown()}\n{end}{tail}"
    return doc


def main(argv: list[str]) -> int:
    """Print the diagrams (``rollout``, ``device`` or both), or ``--write [PAGE]`` them into the docs."""
    if argv[:1] == ["--write"]:
        page = Path(argv[1]) if len(argv) > 1 else DOC
        page.write_text(render_into(page.read_text()))
        return 0
    for name in argv or list(MACHINES):
        if name not in MACHINES:
            print(f"unknown lifecycle {name!r}; known: {', '.join(MACHINES)}", file=sys.stderr)
            return 2
        print(MACHINES[name].markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
