"""The rollout lifecycle tables: the docs are generated from them, illegal moves raise, no dead ends."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from fleet_server.lifecycle import (
    DEVICE,
    DOC,
    OPERATOR_ACTIONS,
    ROLLOUT,
    DeviceRolloutState,
    DeviceTrigger,
    IllegalMove,
    Lifecycle,
    RolloutState,
    RolloutTrigger,
    main,
    render_into,
)


def test_the_docs_show_the_tables_as_they_are() -> None:
    page = DOC.read_text()
    assert render_into(page) == page, (
        "docs/rollouts.md is stale: run python -m fleet_server.lifecycle --write"
    )
    for machine in (ROLLOUT, DEVICE):
        assert machine.mermaid() in page


def test_a_changed_table_makes_the_docs_stale() -> None:
    moves = {**ROLLOUT.moves, RolloutState.COMPLETED: {}}  # say completed could not be rolled back
    changed = Lifecycle("rollout", RolloutState, RolloutState.RUNNING, moves, ROLLOUT.notes)
    assert "completed --> rolled_back: rollback" in ROLLOUT.mermaid()
    assert "completed --> rolled_back" not in changed.mermaid()
    assert changed.mermaid() not in DOC.read_text()


def test_render_refuses_a_page_without_the_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        render_into("# Rollouts\n\nno diagrams here\n")


def test_main_prints_the_diagrams(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollout"]) == 0
    assert ROLLOUT.mermaid() in capsys.readouterr().out
    assert main(["nope"]) == 2


@pytest.mark.parametrize(
    ("machine", "state", "trigger"),
    [
        (ROLLOUT, RolloutState.COMPLETED, RolloutTrigger.PAUSE),
        (ROLLOUT, RolloutState.AWAITING_APPROVAL, RolloutTrigger.RESUME),
        (ROLLOUT, RolloutState.PAUSED, RolloutTrigger.NEXT_STAGE),  # a paused rollout assigns nobody
        (ROLLOUT, RolloutState.ROLLED_BACK, RolloutTrigger.APPROVE),
        (DEVICE, DeviceRolloutState.PENDING, DeviceTrigger.SERVING_PROOF),  # never sent the model
        (DEVICE, DeviceRolloutState.ROLLED_BACK, DeviceTrigger.ASSIGN),  # never gets it again
        (DEVICE, DeviceRolloutState.HELD, DeviceTrigger.ASSIGN),  # released first, by an approval
    ],
)
def test_an_illegal_move_raises_naming_state_and_trigger(
    machine: Lifecycle[Any, Any], state: str, trigger: str
) -> None:
    assert not machine.allows(state, trigger)
    with pytest.raises(IllegalMove) as caught:
        machine.move(state, trigger)
    assert (caught.value.state, caught.value.trigger) == (state, trigger)
    assert str(state) in str(caught.value) and str(trigger) in str(caught.value)


def test_stored_strings_move_like_their_members() -> None:
    """The database holds the plain values; the tables take them as they come."""
    assert ROLLOUT.move("awaiting_approval", RolloutTrigger.APPROVE) is RolloutState.RUNNING
    assert DEVICE.move("notified", DeviceTrigger.PROGRESS) is DeviceRolloutState.INSTALLING


def _reachable(machine: Lifecycle[Any, Any], start: Any) -> set[Any]:
    seen, todo = {start}, deque([start])
    while todo:
        for target in machine.moves[todo.popleft()].values():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("machine", [ROLLOUT, DEVICE])
def test_every_state_is_reachable_and_in_the_table(machine: Lifecycle[Any, Any]) -> None:
    states = set(machine.states.__members__.values())
    assert set(machine.moves) == states
    assert _reachable(machine, machine.initial) == states
    assert set(machine.notes) == {t for _, t, _ in machine.edges()}  # every trigger explained, no stale note


def test_no_rollout_state_is_a_dead_end() -> None:
    """From every state a rollout can still be ended, and every active one can still finish."""
    for state in RolloutState:
        assert _reachable(ROLLOUT, state) & set(RolloutState.FINISHED), state
        assert ROLLOUT.allows(state, RolloutTrigger.ROLLBACK)  # the operator's last resort, always
    for active in RolloutState.ACTIVE:
        assert RolloutState.COMPLETED in _reachable(ROLLOUT, RolloutState(active))


def test_operator_repeats_are_moves_to_the_same_state() -> None:
    repeats = {
        RolloutTrigger.PAUSE: RolloutState.PAUSED,
        RolloutTrigger.RESUME: RolloutState.RUNNING,
        RolloutTrigger.ABORT: RolloutState.ABORTED,
        RolloutTrigger.ROLLBACK: RolloutState.ROLLED_BACK,
    }
    for trigger, state in repeats.items():
        assert ROLLOUT.move(state, trigger) is state
    assert set(repeats) < set(OPERATOR_ACTIONS)


def test_devices_that_got_the_model_are_the_ones_a_roll_back_concerns() -> None:
    sent = DEVICE.sources(DeviceTrigger.ROLL_BACK)
    assert sent == set(DeviceRolloutState.IN_FLIGHT) | set(DeviceRolloutState.FINISHED)
    assert DeviceRolloutState.PENDING not in sent and DeviceRolloutState.HELD not in sent


def test_only_a_failed_device_is_sent_the_release_again() -> None:
    """``redeliver`` (a resume after a delivery hold) leaves ``failed`` only, back in flight."""
    assert DEVICE.sources(DeviceTrigger.REDELIVER) == {DeviceRolloutState.FAILED}
    assert DEVICE.move("failed", DeviceTrigger.REDELIVER) is DeviceRolloutState.RETRY_WAIT
    assert DeviceRolloutState.RETRY_WAIT in DeviceRolloutState.IN_FLIGHT
    for state in set(DeviceRolloutState) - {DeviceRolloutState.FAILED}:
        with pytest.raises(IllegalMove, match="redeliver"):
            DEVICE.move(state, DeviceTrigger.REDELIVER)
