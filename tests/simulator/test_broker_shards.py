"""Three real brokers in the production configuration, one killed mid-rollout (scenarios/broker-shards.toml).

The scenario's own steps prove the devices on the two other brokers all run the new model while
the killed one is down, and its checks that the rollout completes with every device on it. Here,
from the server's database afterwards: each device record holds the shard provisioning placed it
on; no device of the killed shard got anything to the server while it was down, and some of them
finished only after it returned (the kill really was mid-rollout for them); every device of the
other shards was done before it returned.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from edgefleet.broker import mosquitto_binary
from edgefleet.sim_harness import run_scenario
from fleet_server.shards import assign

SCENARIO = Path(__file__).parent.parent.parent / "scenarios" / "broker-shards.toml"
SHARDS = ["shard-0", "shard-1", "shard-2"]


def _epoch(value: str | datetime) -> float:
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_a_killed_shard_stops_only_its_own_devices(tmp_path: Path) -> None:
    outcome = run_scenario(SCENARIO, small=True, workdir=tmp_path / "work", report_dir=tmp_path / "report")
    result = outcome.result
    assert result.ok, (tmp_path / "report" / "summary.md").read_text()
    assert (tmp_path / "report" / "timeline.png").read_bytes().startswith(b"\x89PNG")
    events = {what: result.started_at + t for t, what in result.events}
    killed, back = events["broker shard-1 killed"], events["broker shard-1 back"]

    engine = create_engine(f"sqlite:///{tmp_path / 'work' / 'server' / 'fleet.db'}")
    with engine.connect() as db:
        placed = dict(db.execute(text("SELECT id, broker_shard FROM device")).all())
        rollout = db.execute(text("SELECT id FROM rollout ORDER BY created_at DESC LIMIT 1")).scalar_one()
        done = {
            d: _epoch(at)
            for d, at, state in db.execute(
                text("SELECT device_id, updated_at, state FROM rolloutdevice WHERE rollout_id = :r"),
                {"r": rollout},
            ).all()
            if state == "done"
        }
    engine.dispose()

    assert placed and all(shard == assign(d, SHARDS) for d, shard in placed.items()), placed
    assert set(placed.values()) == set(SHARDS)  # the small fleet still spans all three
    assert set(done) == set(placed), "every device finished the rollout"
    on_killed = [d for d, s in placed.items() if s == "shard-1"]
    others = [d for d, s in placed.items() if s != "shard-1"]
    # nothing from shard-1's devices reached the server while their broker was down (a report the
    # broker had delivered before SIGKILL may still be in the server's ingest queue for a moment
    # on a loaded machine: INGEST_LAG_S after the kill, the server has drained it) ...
    silent = [d for d in on_killed if killed + INGEST_LAG_S < done[d] < back]
    assert not silent, (silent, killed, back, {d: done[d] for d in on_killed})
    # ... and some were still installing when it died: they finished after it came back
    assert [d for d in on_killed if done[d] > back]
    # the others carried on: all of them were done while shard-1 was still down
    assert all(done[d] < back for d in others), [(d, done[d] - back) for d in others if done[d] >= back]


INGEST_LAG_S = 3.0


def _scenario(steps: list[dict[str, object]], shards: int = 3) -> dict[str, object]:
    return {
        "name": "s",
        "fleet": {"devices": 3, "broker_shards": shards, "classes": [{"name": "rpi4"}]},
        "models": {"v1": {"version": "1"}},
        "steps": steps,
        "expect": [{"check": "devices_running", "model": "v1"}],
    }


@pytest.mark.parametrize(
    ("steps", "shards", "why"),
    [
        ([{"action": "stop_broker", "shards": ["shard-3"]}], 3, "unknown shards"),
        ([{"action": "stop_broker"}], 3, "needs shards"),
        ([{"action": "start_broker", "shards": ["shard-1"]}], 1, "unknown shards"),
        ([{"action": "sleep", "seconds": 1, "shards": ["shard-0"]}], 3, "for the broker steps"),
        ([{"action": "sleep", "seconds": 1, "kill": True}], 3, "kill is for"),
    ],
)
def test_bad_shard_steps_are_refused_at_load(steps: list[dict[str, object]], shards: int, why: str) -> None:
    from simulator.scenario import ScenarioError, parse_scenario

    with pytest.raises(ScenarioError, match=why):
        parse_scenario(_scenario(steps, shards))


def test_the_shipped_scenario_loads_with_three_shards() -> None:
    from simulator.scenario import load_scenario

    sc = load_scenario(SCENARIO, small=True)
    assert sc.fleet.shard_names == SHARDS
    assert [s.action for s in sc.steps if s.shards] == ["stop_broker", "wait_devices", "start_broker"]
