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
    RETRY_WAIT = "retry_wait"  # failed with a retryable class; re-notified after a backoff
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"
    HELD = "held"  # not assigned: its hardware class (cohort) was halted by a gate
    IN_FLIGHT = nonmember((SHADOWING, NOTIFIED, INSTALLING, RETRY_WAIT))
    FINISHED = nonmember((DONE, FAILED, TIMED_OUT))


class RolloutTrigger(StrEnum):
    # operator actions (POST /api/v1/rollouts/{id}/{action})
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    APPROVE = "approve"  # accept the current stage: passes a manual gate or overrides a pausing one
    ROLLBACK = "rollback"  # the operator asks; the engine leader carries it out on its next tick
    # engine decisions
    GATE_PAUSE = "gate_pause"
    GATE_ROLL_BACK = "gate_roll_back"
    AWAIT_APPROVAL = "await_approval"  # a stage soaked and the policy wants a human for the next
    NEXT_STAGE = "next_stage"
    COMPLETE = "complete"


OPERATOR_ACTIONS = (
    RolloutTrigger.PAUSE,
    RolloutTrigger.RESUME,
    RolloutTrigger.ABORT,
    RolloutTrigger.APPROVE,
    RolloutTrigger.ROLLBACK,
)


class DeviceTrigger(StrEnum):
    ASSIGN = "assign"  # its stage starts: a directive with the rollout model
    ASSIGN_SHADOW = "assign_shadow"  # ... with the rollout model as a shadow beside its own
    PROMOTE = "promote"  # the rollout's shadow agreement passed: the model for real
    RETRY = "retry"  # the backoff elapsed: the model again, in a directive with a higher seq
    RETRY_SHADOW = "retry_shadow"
    PROGRESS = "progress"  # an event or a report for the directive's seq
    SERVING_PROOF = "serving_proof"  # runs the model, out of probation, served successfully with it
    FAIL_RETRYABLE = "fail_retryable"  # failed, rejected, reverted or timed out; its class has retries left
    FAIL = "fail"  # failed, rejected or reverted; no retries left
    TIME_OUT = "time_out"  # device_timeout_seconds without serving proof; no retries left
    HOLD = "hold"  # its hardware class (cohort) was halted by a gate
    RELEASE = "release"  # a human approved the stage: a paused cohort's device may be assigned again
    ROLL_BACK = "roll_back"  # a directive sends it back to the model it ran before


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
        terminal = [s for s in self.states if not self.moves.get(s)]
        lines += [f"    {s} --> [*]" for s in terminal]
        return "\n".join(lines)


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
            RT.NEXT_STAGE: RS.RUNNING,  # the stage is approved (``approved_through``) and soaked
            RT.GATE_PAUSE: RS.PAUSED,  # the gates still watch the devices already notified
            RT.GATE_ROLL_BACK: RS.ROLLED_BACK,
            RT.PAUSE: RS.PAUSED,
            RT.ABORT: RS.ABORTED,
            RT.ROLLBACK: RS.ROLLED_BACK,
        },
        RS.PAUSED: {
            RT.RESUME: RS.RUNNING,  # a pausing gate that still fails pauses it again
            RT.APPROVE: RS.RUNNING,  # ... unless a human approved the stage
            RT.GATE_ROLL_BACK: RS.ROLLED_BACK,  # pausing stops assignment, not protection
            RT.PAUSE: RS.PAUSED,
            RT.ABORT: RS.ABORTED,
            RT.ROLLBACK: RS.ROLLED_BACK,
        },
        RS.COMPLETED: {RT.ROLLBACK: RS.ROLLED_BACK},
        RS.ABORTED: {RT.ABORT: RS.ABORTED, RT.ROLLBACK: RS.ROLLED_BACK},
        RS.ROLLED_BACK: {RT.ROLLBACK: RS.ROLLED_BACK},
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
        DS.NOTIFIED: {DT.PROGRESS: DS.INSTALLING, DT.SERVING_PROOF: DS.DONE, **_FAILURES},
        DS.INSTALLING: {DT.SERVING_PROOF: DS.DONE, **_FAILURES},
        DS.RETRY_WAIT: {DT.RETRY: DS.NOTIFIED, DT.RETRY_SHADOW: DS.SHADOWING, DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.DONE: {DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.FAILED: {DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.TIMED_OUT: {DT.ROLL_BACK: DS.ROLLED_BACK},
        DS.ROLLED_BACK: {},
    },
)

MACHINES: dict[str, Lifecycle[Any, Any]] = {"rollout": ROLLOUT, "device": DEVICE}


def main(argv: list[str]) -> int:
    """Print the diagrams docs/rollouts.md holds: ``rollout``, ``device`` or both."""
    names = argv or list(MACHINES)
    for name in names:
        if name not in MACHINES:
            print(f"unknown lifecycle {name!r}; known: {', '.join(MACHINES)}", file=sys.stderr)
            return 2
        print(f"```mermaid\n{MACHINES[name].mermaid()}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
