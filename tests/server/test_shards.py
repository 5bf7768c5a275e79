"""Placing devices on broker shards: stable, balanced, and adding a shard moves few devices."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fleet_server.mqtt_client import MqttConfigError, shard_endpoints
from fleet_server.settings import ServerSettings
from fleet_server.shards import (
    DEFAULT_SHARD,
    Shard,
    ShardError,
    assign,
    load_shards,
    resolve,
    shard_names,
    write_shards,
)

DEVICES = [f"cam-{i:05d}" for i in range(10_000)]


def test_the_same_device_always_lands_on_the_same_shard_whatever_the_list_order() -> None:
    names = ["shard-0", "shard-1", "shard-2"]
    first = {d: assign(d, names) for d in DEVICES[:500]}
    assert first == {d: assign(d, list(reversed(names))) for d in DEVICES[:500]}
    assert first == {d: assign(d, names) for d in DEVICES[:500]}  # and again


@pytest.mark.parametrize("n", [2, 3, 5])
def test_shards_share_the_fleet_evenly(n: int) -> None:
    names = [f"shard-{i}" for i in range(n)]
    counts = Counter(assign(d, names) for d in DEVICES)
    assert set(counts) == set(names)
    mean = len(DEVICES) / n
    # binomial spread: sd = sqrt(N p (1-p)) <= 50 here; 5 % of the mean is > 3.3 sd for n <= 5
    assert max(abs(c - mean) for c in counts.values()) <= 0.05 * mean, counts


def test_adding_a_shard_moves_only_its_share_and_only_onto_it() -> None:
    before = {d: assign(d, ["shard-0", "shard-1", "shard-2"]) for d in DEVICES}
    after = {d: assign(d, ["shard-0", "shard-1", "shard-2", "shard-3"]) for d in DEVICES}
    moved = [d for d in DEVICES if before[d] != after[d]]
    assert {after[d] for d in moved} == {"shard-3"}  # nothing moves between the old shards
    assert abs(len(moved) - len(DEVICES) / 4) <= 0.05 * len(DEVICES) / 4


def test_removing_a_shard_moves_only_its_own_devices() -> None:
    before = {d: assign(d, ["a", "b", "c"]) for d in DEVICES}
    after = {d: assign(d, ["a", "b"]) for d in DEVICES}
    assert all(before[d] == "c" for d in DEVICES if before[d] != after[d])


def test_a_record_from_before_shards_stays_on_the_first_shard() -> None:
    assert resolve(None, ["old", "new"]) == "old"
    assert resolve("new", ["old", "new"]) == "new"


def test_no_shards_is_an_error() -> None:
    with pytest.raises(ShardError):
        assign("cam-1", [])


def test_shards_file_round_trip_with_relative_paths(tmp_path: Path) -> None:
    shards = [
        Shard("s0", "broker-a", 8883, tmp_path / "s0" / "fleet-server.json", tmp_path / "s0" / "passwd"),
        Shard("s1", "broker-b", 8883, tmp_path / "s1" / "fleet-server.json"),
    ]
    path = tmp_path / "shards.json"
    write_shards(path, shards)
    assert json.loads(path.read_text())["shards"][0]["server_credentials"] == "s0/fleet-server.json"
    assert load_shards(path) == shards
    assert shard_names(path) == ["s0", "s1"]
    assert shard_names(None) == [DEFAULT_SHARD]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("not json", "cannot read"),
        ('{"shards": {}}', "list under 'shards'"),
        ('{"shards": []}', "at least one shard"),
        ('{"shards": [{"name": "a", "host": "h"}]}', "needs a name, a host and a port"),
        ('{"shards": [{"name": "a", "host": "h", "port": 0}]}', "invalid port"),
        ('{"shards": [{"name": "a b", "host": "h", "port": 1}]}', "invalid shard name"),
        ('{"shards": [{"name": "a", "host": "h", "port": 1, "colour": 1}]}', "unknown keys colour"),
        (
            '{"shards": [{"name": "a", "host": "h", "port": 1}, {"name": "a", "host": "i", "port": 2}]}',
            "duplicate shard names: a",
        ),
    ],
)
def test_a_bad_shards_file_is_refused_with_the_reason(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "shards.json"
    path.write_text(content)
    with pytest.raises(ShardError, match=why):
        load_shards(path)


def test_the_server_reaches_each_shard_with_its_own_credentials(tmp_path: Path) -> None:
    for name, port in (("s0", 9001), ("s1", 9002)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "fleet-server.json").write_text(
            json.dumps({"host": f"{name}.example", "port": port, "tls": False})
        )
    write_shards(
        tmp_path / "shards.json",
        [Shard(n, "h", 8883, tmp_path / n / "fleet-server.json") for n in ("s0", "s1")],
    )
    # a single-broker field set in the environment must not leak into the shards' endpoints
    settings = ServerSettings(mqtt_shards=tmp_path / "shards.json", mqtt_host="elsewhere", mqtt_port=1)
    got = {name: (e.host, e.port) for name, e in shard_endpoints(settings).items()}
    assert got == {"s0": ("s0.example", 9001), "s1": ("s1.example", 9002)}
    assert list(shard_endpoints(ServerSettings(mqtt_host="one", mqtt_port=7))) == [DEFAULT_SHARD]

    write_shards(tmp_path / "bare.json", [Shard("s0", "h", 8883)])
    with pytest.raises(MqttConfigError, match="names no server_credentials"):
        shard_endpoints(ServerSettings(mqtt_shards=tmp_path / "bare.json"))


def test_registration_places_a_device_for_good_and_directives_follow_the_record(tmp_path: Path) -> None:
    from sqlmodel import Session

    from fleet_server.devices import register_device
    from fleet_server.models import Device
    from fleet_server.shard_router import ShardRouter
    from fleet_server.store import make_engine

    engine = make_engine(ServerSettings(data_dir=tmp_path))
    names = ["a", "b", "c"]
    with Session(engine) as s:
        for i in range(30):
            register_device(s, f"cam-{i}", "rpi4", {}, names)
        s.add(Device(id="old-1", hardware_id="rpi4"))  # registered before the fleet had shards
        s.commit()
        # registering again with the shard list grown changes nothing
        again, created = register_device(s, "cam-0", "rpi4", {}, [*names, "d"])
        assert not created and again.broker_shard == assign("cam-0", names)
    router = ShardRouter(engine, [*names, "d"])  # a shard added since: records still decide
    assert {f"cam-{i}": router.shard_of(f"cam-{i}") for i in range(30)} == {
        f"cam-{i}": assign(f"cam-{i}", names) for i in range(30)
    }
    assert router.shard_of("old-1") == "a"  # the first shard: the broker it always had
    with Session(engine) as s:  # registered after the router loaded the records
        register_device(s, "late-1", "rpi4", {}, [*names, "d"])
    assert router.shard_of("late-1") == assign("late-1", [*names, "d"])
    assert ShardRouter(engine, ["only"]).shard_of("cam-0") == "only"  # one broker: no lookups
    engine.dispose()
