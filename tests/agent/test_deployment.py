"""The deployment state machine: one table, illegal moves raise, restores are legal, docs show the table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.deployment import (
    CARRIES_ERROR,
    MODEL_CHANGES,
    RESTING,
    TRANSITIONS,
    WORKING,
    Deployment,
    IllegalTransition,
    Outcome,
    Trigger,
    mermaid,
)
from device_agent.wire import DeploymentState, ReasonCode

DS = DeploymentState
DOC = Path(__file__).resolve().parents[2] / "docs" / "agent.md"
SHAS = ["a" * 64, "b" * 64, "c" * 64]


def _step(dep: Deployment, trigger: Trigger, seq: int, sha: str) -> Deployment:
    """Fire ``trigger`` with the arguments it needs (a reason for fail/revert, a model for a swap)."""
    error = ReasonCode.INTERNAL_ERROR if trigger in CARRIES_ERROR else None
    model = sha if trigger in MODEL_CHANGES else None
    return dep.on(trigger, seq, error=error, model=model)


def test_the_table_is_closed_and_has_no_dead_ends() -> None:
    machine = set(RESTING) | set(WORKING)
    assert DS.REJECTED not in machine  # a refused directive never becomes the deployment
    for (src, _), dst in TRANSITIONS.items():
        assert src in machine and dst in machine
    for state in machine:  # every state can fail; every resting state can take up a directive
        assert TRANSITIONS[(state, Trigger.FAIL)] == DS.FAILED
    for state in RESTING:
        assert TRANSITIONS[(state, Trigger.BEGIN)] == state
    for state in WORKING:  # a working state only leads on
        assert (state, Trigger.BEGIN) not in TRANSITIONS


def test_an_update_walks_the_table() -> None:
    dep = Deployment()
    dep = dep.on(Trigger.BEGIN, 1)
    for trigger in (Trigger.VERIFY, Trigger.DOWNLOAD, Trigger.VERIFY, Trigger.DOWNLOAD, Trigger.INSTALL):
        dep = dep.on(trigger, 1)
    dep = dep.on(Trigger.WARM, 1).on(Trigger.SWAP, 1)
    dep = dep.on(Trigger.SWAPPED_ON_PROBATION, 1, model=SHAS[0])
    assert (dep.state, dep.model, dep.seq) == (DS.PROBATION, SHAS[0], 1)
    dep = dep.on(Trigger.REVERT, 1, error=ReasonCode.ERROR_RATE, model=SHAS[1])
    assert (dep.state, dep.error, dep.model) == (DS.REVERTED, "error_rate", SHAS[1])
    assert dep.outcome == Outcome(1, DS.REVERTED, "error_rate")


@pytest.mark.parametrize(
    ("state", "trigger", "kw"),
    [
        (DS.IDLE, Trigger.SWAP, {}),
        (DS.SERVING, Trigger.PASS, {}),
        (DS.DOWNLOADING, Trigger.WARM, {}),
        (DS.WARMING, Trigger.BEGIN, {}),
        (DS.SWAPPING, Trigger.SWAPPED, {}),  # a swap must name its model
        (DS.IDLE, Trigger.FAIL, {}),  # a failure must carry its reason
        (DS.IDLE, Trigger.VERIFY, {"error": "x"}),  # only fail and revert carry one
        (DS.IDLE, Trigger.KEEP, {"model": SHAS[0]}),  # only a swap or a revert changes the model
    ],
)
def test_illegal_moves_raise_and_change_nothing(state: DeploymentState, trigger: Trigger, kw: Any) -> None:
    dep = Deployment(seq=3, state=state, model=SHAS[2])
    with pytest.raises(IllegalTransition) as raised:
        dep.on(trigger, 4, **kw)
    assert raised.value.code == "internal_error" and raised.value.state == state
    assert dep == Deployment(seq=3, state=state, model=SHAS[2])


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.sampled_from(list(Trigger)), st.integers(0, 5), st.sampled_from(SHAS)), max_size=40)
)
def test_no_event_sequence_reaches_an_illegal_state(steps: list[tuple[Trigger, int, str]]) -> None:
    """Any sequence of events, legal or not: each legal one lands on a state of the table, each
    illegal one raises and leaves the record as it was, and the model changes only by a swap or a revert."""
    dep = Deployment()
    for trigger, seq, sha in steps:
        before = dep
        try:
            dep = _step(dep, trigger, seq, sha)
        except IllegalTransition:
            assert (before.state, trigger) not in TRANSITIONS
            assert dep == before
            continue
        assert dep.state == TRANSITIONS[(before.state, trigger)]
        assert dep.state in RESTING or dep.state in WORKING
        if dep.model != before.model:
            assert trigger in MODEL_CHANGES
        assert (dep.error is not None) == (trigger in CARRIES_ERROR)
        assert (dep.state, Trigger.FAIL) in TRANSITIONS  # never stuck


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_outcomes = st.fixed_dictionaries(
    {},
    optional={
        "seq": st.integers(-3, 10**12) | _json,
        "state": st.sampled_from([s.value for s in DS]) | _json,
        "error": st.text(max_size=20) | _json,
    },
)


@settings(max_examples=300)
@given(
    st.one_of(_json, _outcomes),
    st.integers(0, 10**6),
    st.sampled_from([None, *SHAS]),
    st.integers(1, 9) | st.none(),
)
def test_restoring_from_any_persisted_state_is_legal(
    stored: Any, last_seq: int, model: str | None, prob: int | None
) -> None:
    dep = Deployment.restored(Outcome.from_dict(stored), last_seq)
    assert dep.state in RESTING and dep.seq >= 0 and dep.model is None
    booted = dep.booted(model, prob)
    assert booted.state in RESTING and booted.model == model
    booted.on(Trigger.BEGIN, booted.seq + 1)  # the next directive can always be taken up
    booted.on(Trigger.FAIL, booted.seq + 1, error="x")


def test_restore_keeps_what_was_true() -> None:
    assert Deployment.restored(Outcome(7, DS.REVERTED, "error_rate"), 7) == Deployment(7, DS.REVERTED)
    assert Deployment.restored(Outcome(7, DS.FAILED, "disk_full"), 7).error == "disk_full"
    assert Deployment.restored(Outcome(7, DS.WARMING), 7).state == DS.IDLE  # interrupted: redone
    assert Deployment.restored(None, 4) == Deployment(seq=4)
    # a model on disk but no directive ever finished: it serves
    assert Deployment().booted(SHAS[0]).state == DS.SERVING
    assert Deployment(seq=3, state=DS.FAILED).booted(SHAS[0]).state == DS.FAILED
    resumed = Deployment(seq=3, state=DS.SERVING).booted(SHAS[1], probation_seq=4)
    assert (resumed.seq, resumed.state, resumed.model) == (4, DS.PROBATION, SHAS[1])


def test_the_diagram_in_the_docs_is_the_table() -> None:
    text = DOC.read_text()
    found = re.search(
        r"<!-- deployment-diagram -->\n```mermaid\n(.*?)```\n<!-- /deployment-diagram -->", text, re.S
    )
    assert found, f"{DOC} lacks the generated deployment diagram block"
    assert found.group(1) == mermaid(), (
        "docs/agent.md's diagram differs from device_agent.deployment.TRANSITIONS; "
        "paste the output of `python -m device_agent.deployment` between the markers"
    )


def test_the_diagram_follows_a_changed_table() -> None:
    changed = dict(TRANSITIONS)
    changed[(DS.WARMING, Trigger.SWAPPED)] = DS.SERVING
    assert "warming --> serving: swapped" in mermaid(changed)
    assert "warming --> serving" not in mermaid()
