"""The scenario file format: every shipped file loads, and bad files fail early with the bad key named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet_server.lifecycle import OPERATOR_ACTIONS
from simulator.scenario import OPERATOR_OPS, ScenarioError, load_scenario, parse_scenario

SCENARIOS = sorted((Path(__file__).parents[2] / "scenarios").glob("*.toml"))


def minimal(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "fleet": {"devices": 10, "classes": [{"name": "a", "share": 3}, {"name": "b"}]},
        "models": {"v1": {"version": "1"}},
        "steps": [{"action": "rollout", "id": "r", "model": "v1", "stages": [50, 100]}],
        "expect": [{"check": "rollout_state", "rollout": "r", "states": ["completed"]}],
    }
    data.update(over)
    return data


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
@pytest.mark.parametrize("small", [False, True])
def test_shipped_scenarios_load(path: Path, small: bool) -> None:
    sc = load_scenario(path, small=small)
    assert sum(sc.class_counts().values()) == sc.fleet.devices
    if small:
        assert sc.fleet.devices <= 30  # CI size


def test_shipped_set_covers_the_issue() -> None:
    assert {p.stem for p in SCENARIOS} >= {
        "canary-rollback",
        "offline-catch-up",
        "broker-restart",
        "hardware-class-failure",
        "server-restart",
        "device-faults",
    }


def test_class_counts_split_by_share_and_never_leave_a_class_empty() -> None:
    sc = parse_scenario(minimal())
    assert sc.class_counts() == {"a": 8, "b": 2}
    tiny = parse_scenario(
        minimal(fleet={"devices": 2, "classes": [{"name": "a", "share": 100}, {"name": "b", "share": 1}]})
    )
    assert tiny.class_counts() == {"a": 1, "b": 1}


def test_small_overrides_are_deep_merged() -> None:
    data = minimal(small={"fleet": {"devices": 3}})
    assert parse_scenario(data).fleet.devices == 10
    small = parse_scenario(data, small=True)
    assert small.fleet.devices == 3
    assert [c.name for c in small.fleet.classes] == ["a", "b"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fleet": {"devices": 10, "classes": [{"name": "a", "shar": 1}]}}, "fleet.classes.0.shar"),
        ({"steps": [{"action": "rollout", "id": "r", "model": "v1"}]}, "needs stages"),
        ({"steps": [{"action": "explode"}]}, "steps.0.action"),
        ({"steps": [{"action": "rollout", "id": "r", "model": "v9", "stages": [100]}]}, "unknown model 'v9'"),
        ({"steps": [{"action": "rollout", "id": "r", "model": "v1", "stages": [50, 10]}]}, "increasing"),
        ({"steps": [{"action": "wait_rollout", "rollout": "nope", "states": ["completed"]}]}, "not started"),
        ({"steps": [{"action": "heal", "group": "ghost"}]}, "group 'ghost'"),
        ({"steps": [{"action": "sleep", "seconds": 1, "when_state": "downloading"}]}, "when_state"),
        ({"expect": [{"check": "ever_ran", "model": "v1"}]}, "at_most"),
        ({"expect": [{"check": "rollout_state", "rollout": "zz", "states": ["x"]}]}, "unknown rollout"),
        ({"fleet": {"devices": 5, "classes": [{"name": "a", "network": "5g"}]}}, "unknown network '5g'"),
        ({"fleet": {"devices": 5, "classes": [{"name": "a", "fails_models": ["v7"]}]}}, "unknown model 'v7'"),
        ({"fleet": {"devices": 0, "classes": [{"name": "a"}]}}, "fleet.devices"),
        ({"network": {"bad": {"loss": 1.5}}}, "network.bad.loss"),
        ({"small": 3}, "[small] must be a table"),
        ({"fleet": {"devices": 5, "classes": [{"name": "a", "clock_skew_s": [60, -60]}]}}, "clock_skew_s"),
        ({"fleet": {"devices": 5, "processes": 0, "classes": [{"name": "a"}]}}, "fleet.processes"),
        ({"steps": [{"action": "fill_disk", "devices": 1, "hw_class": "a"}]}, "class with disk_mb"),
        ({"expect": [{"check": "devices_running", "model": "v1", "group": "g"}]}, "group 'g'"),
        ({"fleet": {"devices": 5, "mirrors": ["cdn.example"], "classes": [{"name": "a"}]}}, "http(s)://"),
        ({"fleet": {"devices": 5, "mirrors": ["nginx", "nginx"], "classes": [{"name": "a"}]}}, "twice"),
        (
            {"fleet": {"devices": 5, "installs_at_once": 0, "classes": [{"name": "a"}]}},
            "fleet.installs_at_once",
        ),
    ],
)
def test_bad_scenarios_are_refused_with_the_key_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(minimal(**change), source="x.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("x.toml")


def test_unreadable_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[fleet\n')
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)


def test_clock_skew_is_fixed_or_drawn_per_device_and_stable() -> None:
    from simulator.scenario import skew_of

    sc = parse_scenario(
        minimal(
            fleet={
                "devices": 10,
                "classes": [{"name": "a", "clock_skew_s": [-7200, 3600]}, {"name": "b", "clock_skew_s": 30}],
            }
        )
    )
    a, b = sc.fleet.classes
    skews = [skew_of(a, sc.seed, n) for n in range(8)]
    assert all(-7200 <= x <= 3600 for x in skews) and len(set(skews)) == 8
    assert skews == [skew_of(a, sc.seed, n) for n in range(8)]
    assert skew_of(b, sc.seed, 3) == 30.0


def test_a_rollout_step_takes_the_policys_retries() -> None:
    data = minimal(
        steps=[
            {
                "action": "rollout",
                "id": "r",
                "model": "v1",
                "stages": [100],
                "retry_limits": {"delivery_unavailable": 2},
                "retry_backoff_seconds": 5.0,
                "rate_per_minute": 3000,
                "delivery_action": "roll_back",
                "delivery_retries": 0,
            }
        ]
    )
    step = parse_scenario(data).steps[0]
    assert step.retry_limits == {"delivery_unavailable": 2} and step.retry_backoff_seconds == 5.0
    assert step.rate_per_minute == 3000
    assert (step.delivery_action, step.delivery_retries) == ("roll_back", 0)
    assert parse_scenario(minimal()).steps[0].retry_limits is None  # unset: the server's default


ROLLOUT_STEP = {"action": "rollout", "id": "r", "model": "v1", "stages": [100]}


def test_an_operate_step_plays_the_operator_on_a_rollout() -> None:
    """Hold -> fix -> resume: the scenario resumes the rollout the way an operator would."""
    steps = [
        ROLLOUT_STEP,
        {"action": "wait_rollout", "rollout": "r", "states": ["paused"]},
        {"action": "heal", "devices": "all"},
        {"action": "operate", "rollout": "r", "op": "resume"},
    ]
    sc = parse_scenario(minimal(steps=steps))
    assert (sc.steps[-1].action, sc.steps[-1].rollout, sc.steps[-1].op) == ("operate", "r", "resume")
    for op in ("pause", "resume", "approve", "abort", "rollback"):
        step = {"action": "operate", "rollout": "r", "op": op}
        assert parse_scenario(minimal(steps=[ROLLOUT_STEP, step])).steps[1].op == op
    # the simulator may not import the server: its list of the operator's actions is a copy, kept equal
    assert set(OPERATOR_ACTIONS) == set(OPERATOR_OPS)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"action": "operate", "rollout": "r", "op": "resum"}, "unknown op 'resum'; known: pause, resume"),
        ({"action": "operate", "rollout": "r"}, "action 'operate' needs op"),
        ({"action": "operate", "op": "pause"}, "action 'operate' needs rollout"),
        ({"action": "operate", "rollout": "zz", "op": "pause"}, "rollout 'zz' is not started"),
        ({"action": "sleep", "seconds": 1, "op": "pause"}, "op applies to operate only"),
    ],
)
def test_a_bad_operate_step_is_refused_naming_what_is_wrong(step: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(minimal(steps=[ROLLOUT_STEP, step]), source="x.toml")
    assert message in str(info.value)
    assert "steps.1" in str(info.value) or "steps[1]" in str(info.value)  # the bad step, named
