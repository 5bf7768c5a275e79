"""Creating a rollout on SQLite and PostgreSQL: the devices it targets are exactly those the
selector's Python test (``matches``) picks, and its device rows, written in bulk, are the pending
rows the engine expects."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, insert
from sqlmodel import col, select

from fleet_server import rollouts
from fleet_server.engine import assignment_order
from fleet_server.errors import Conflict
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.models import Device, Model, Rollout, RolloutDecision, RolloutDevice, utcnow
from fleet_server.rollouts import claim_joiners, create_rollout, enrol_joiners, find_joiners, joiner_rollouts
from fleet_server.schemas import RolloutIn
from fleet_server.selector import matches
from fleet_server.store import new_session

SITES = ("lab", "berlin", "oslo", "austin")
HARDWARE = ("rpi4", "jetson", "imx8")


def _fleet(engine: Engine, n: int) -> None:
    now = utcnow()
    rows = []
    for i in range(n):
        runtimes = {"onnxruntime": "1.20"} if i % 2 else {"litert": "1.0"}
        rows.append(
            {
                "id": f"dev-{i:04d}",
                "hardware_id": HARDWARE[i % 3],
                "tags": {"site": SITES[i % len(SITES)], "line": str(i % 5)},
                "registered_at": now,
                "agent_version": f"0.{i % 4}.0",
                "reported": {"capabilities": {"runtimes": runtimes}},
                "running_sha256": "b" * 64,
            }
        )
    with engine.begin() as c:
        c.execute(insert(Device.__table__), rows)  # type: ignore[attr-defined]
        c.execute(
            insert(Model.__table__),  # type: ignore[attr-defined]
            [
                {
                    "id": 1, "name": "m", "version": "1", "release": 1, "target": "arm64-cpu",
                    "hardware_ids": ["rpi4", "jetson"], "sha256": "a" * 64, "length": 1, "manifest": {},
                    "storage_path": "/nowhere", "created_at": now,
                }
            ],
        )  # fmt: skip


def _register_late_lab(engine: Engine) -> None:
    """A lab device that registers after the rollouts were created."""
    with engine.begin() as c:
        c.execute(
            insert(Device.__table__),  # type: ignore[attr-defined]
            [{"id": "late-lab", "hardware_id": "rpi4", "tags": {"site": "lab"}, "registered_at": utcnow()}],
        )


LAB = {"model": "m:1", "selector": {"tags": {"site": "lab"}}, "stages": [100]}


SELECTORS = [
    {},
    {"hardware_id": "rpi4"},
    {"tags": {"site": "lab"}},
    {"tags": {"site": "oslo", "line": "3"}},
    {"runtime": "onnxruntime"},
    {"agent_version": ">=0.2"},
    {"hardware_id": "jetson", "tags": {"line": "1"}, "runtime": "litert", "agent_version": "<0.3"},
]


@pytest.mark.parametrize("selector", SELECTORS, ids=[str(s) or "all" for s in SELECTORS])
def test_targets_what_matches_picks_in_bulk_rows(store: Engine, selector: dict[str, object]) -> None:
    _fleet(store, 300)
    with new_session(store) as session:
        expected = {
            d.id for d in session.exec(select(Device)).all() if matches(d, selector, ["rpi4", "jetson"])
        }
        assert expected, "the selector picks someone"
        rollout = create_rollout(
            session, RolloutIn.model_validate({"model": "m:1", "selector": selector, "stages": [10, 100]})
        )
        session.commit()
        rid = rollout.id
    with new_session(store) as session:
        rows = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rid)).all()
        assert {r.device_id for r in rows} == expected
        for r in rows:
            assert (r.state, r.stage, r.seq, r.attempts) == (DS.PENDING, None, None, 0)
            assert r.order_key == assignment_order(rid, r.device_id)
        created = session.exec(select(RolloutDecision).where(RolloutDecision.rollout_id == rid)).one()
        assert created.figures["targeted"] == len(expected)


def test_busy_devices_refused_or_skipped_and_joiners_added_in_bulk(store: Engine) -> None:
    _fleet(store, 90)
    with new_session(store) as session:
        first = create_rollout(session, RolloutIn.model_validate(LAB))
        session.commit()
        first_id = first.id
    every = RolloutIn.model_validate({"model": "m:1", "selector": {}, "stages": [100]})
    with new_session(store) as session, pytest.raises(Conflict, match="16 targeted device"):
        create_rollout(session, every)
    with new_session(store) as session:
        second = create_rollout(session, every.model_copy(update={"conflict": "skip"}))
        session.commit()
        second_id = second.id
        decision = session.exec(select(RolloutDecision).where(RolloutDecision.rollout_id == second_id)).one()
        lab = [f"dev-{i:04d}" for i in range(90) if i % 4 == 0 and HARDWARE[i % 3] != "imx8"]
        assert decision.figures["skipped"] == lab
        assert decision.figures["targeted"] == 60 - len(lab)  # rpi4 and jetson, less the busy ones
    _register_late_lab(store)  # a device that registers later joins the oldest rollout that wants it
    with new_session(store) as session:
        assert enrol_joiners(session, [first_id, second_id]) == 1
        session.commit()
        late = session.exec(select(RolloutDevice).where(RolloutDevice.device_id == "late-lab")).all()
        assert [(r.rollout_id, r.state, r.order_key) for r in late] == [
            (first_id, DS.PENDING, assignment_order(first_id, "late-lab"))
        ]


def test_a_free_device_joins_the_first_rollout_that_wants_it_and_only_that_one() -> None:
    devices = [
        Device(id="both", hardware_id="rpi4", tags={"site": "lab"}),
        Device(id="newer-only", hardware_id="rpi4", tags={"site": "oslo"}),
        Device(id="wrong-hardware", hardware_id="imx8", tags={"site": "lab"}),
        Device(id="nobody", hardware_id="jetson", tags={"site": "austin"}),
    ]
    older = ("older", {"tags": {"site": "lab"}}, ["rpi4", "jetson"])
    newer = ("newer", {"hardware_id": "rpi4"}, ["rpi4"])
    assert claim_joiners([older, newer], devices) == {"older": ["both"], "newer": ["newer-only"]}
    # the order given decides, whatever the ids: the caller passes the oldest rollout first
    assert claim_joiners([newer, older], devices) == {"newer": ["both", "newer-only"]}
    assert claim_joiners([], devices) == {}


class _Paused:
    """Holds the thread named ``first`` inside ``fn`` (after it returns its value) until released,
    so that a second transaction runs while the first has read which devices are free."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        value = self.fn(*args, **kwargs)
        if threading.current_thread().name == "first":
            self.inside.set()
            self.release.wait(30)
        return value


def _pause(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> _Paused:
    """``owner.name`` replaced by a ``_Paused`` of itself for the test."""
    paused = _Paused(getattr(owner, name))
    monkeypatch.setattr(owner, name, paused)
    return paused


EVERY_SKIPPING_BUSY = {"model": "m:1", "selector": {}, "stages": [100], "conflict": "skip"}


def _side_by_side(
    first: Callable[[], object], second: Callable[[], object], paused: _Paused
) -> tuple[list[object], bool]:
    """Run ``first`` until it has read the free devices, then ``second`` (given a second to get
    past ``first`` if nothing stops it). Returns each one's result or exception, and whether
    ``second`` was still waiting when ``first`` went on."""
    results: list[object] = [None, None]

    def run(i: int, fn: Callable[[], object]) -> None:
        try:
            results[i] = fn()
        except Exception as exc:
            results[i] = exc

    one = threading.Thread(target=run, args=(0, first), name="first")
    two = threading.Thread(target=run, args=(1, second), name="second")
    one.start()
    try:
        assert paused.inside.wait(30), f"the first transaction read the free devices: {results}"
        two.start()
        two.join(1.0)
        waited = two.is_alive()
    finally:  # never leave the first holding the lock and its connection past the test
        paused.release.set()
        one.join(30)
        if two.ident is not None:
            two.join(30)
    return results, waited


def _active_rollouts_per_device(engine: Engine) -> Counter[str]:
    with new_session(engine) as session:
        rows = session.exec(
            select(RolloutDevice.device_id)
            .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
            .where(col(Rollout.state).in_(RS.ACTIVE))
        ).all()
    return Counter(rows)


def _create(engine: Engine, body: dict[str, Any]) -> str:
    with new_session(engine) as session:
        rollout = create_rollout(session, RolloutIn.model_validate(body))
        session.commit()
        return rollout.id


def test_two_rollouts_created_side_by_side_never_share_a_device(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fleet(store, 40)
    paused = _pause(monkeypatch, rollouts, "busy_among")
    (first, second), waited = _side_by_side(
        lambda: _create(store, LAB), lambda: _create(store, EVERY_SKIPPING_BUSY), paused
    )
    assert isinstance(first, str) and isinstance(second, str), (first, second)
    assert max(_active_rollouts_per_device(store).values()) == 1
    assert waited  # for the first one's commit
    with new_session(store) as session:
        skipped = session.exec(select(RolloutDecision).where(RolloutDecision.rollout_id == second)).one()
        assert skipped.figures["skipped"]  # the lab devices the first one took


def test_a_joiner_enrolled_while_a_rollout_is_created_goes_to_one_of_them(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fleet(store, 12)
    older = _create(store, LAB)
    _register_late_lab(store)
    paused = _pause(monkeypatch, rollouts, "claim_joiners")

    def enrol() -> int:
        with new_session(store) as session:
            joined = enrol_joiners(session, [older])
            session.commit()
            return joined

    (joined, newer), waited = _side_by_side(enrol, lambda: _create(store, EVERY_SKIPPING_BUSY), paused)
    assert joined == 1 and isinstance(newer, str), (joined, newer)
    per_device = _active_rollouts_per_device(store)
    assert per_device["late-lab"] == 1 and max(per_device.values()) == 1
    assert waited


def test_an_experiment_and_a_rollout_created_side_by_side_never_share_a_device(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet_server import experiments
    from fleet_server.experiment_schemas import ExperimentIn

    _fleet(store, 40)
    paused = _pause(monkeypatch, experiments, "busy_devices")
    arms = [
        {"name": "control", "model": "m:1", "weight": 1},
        {"name": "candidate", "model": "m:1", "weight": 1},
    ]
    body = {"name": "ab", "selector": {"tags": {"site": "lab"}}, "arms": arms}

    def experiment() -> str:
        with new_session(store) as session:
            exp = experiments.create_experiment(session, ExperimentIn.model_validate(body))
            session.commit()
            return exp.id

    (exp, rollout), waited = _side_by_side(experiment, lambda: _create(store, EVERY_SKIPPING_BUSY), paused)
    assert isinstance(exp, str) and isinstance(rollout, str), (exp, rollout)
    assert max(_active_rollouts_per_device(store).values()) == 1  # the arms' rollouts and the new one
    assert waited
    # the evaluation and a stop take the lock before the experiment's row (on PostgreSQL)
    with new_session(store) as session:
        assert experiments.tick(session) == 1
        session.commit()
    with new_session(store) as session:
        assert experiments.stop(session, exp, None, "done").state == "stopped"
        session.commit()


def test_a_rollout_paused_since_the_look_takes_no_joiner(store: Engine) -> None:
    _fleet(store, 12)
    rid = _create(store, LAB)
    _register_late_lab(store)
    with new_session(store) as session:  # the ticker's look, without the lock: someone to enrol
        assert find_joiners(session, joiner_rollouts(session, [rid])) == {rid: ["late-lab"]}
    with new_session(store) as session:
        session.get_one(Rollout, rid).state = RS.PAUSED
        session.commit()
    with new_session(store) as session:  # enrolling reads the rollout again, under the lock
        assert enrol_joiners(session, [rid]) == 0
