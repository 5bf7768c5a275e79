"""The engine acts when there is something to decide, not only every ``tick_interval``: a new
rollout is assigned at once, and the report that settles a stage's last device starts the next
stage (``Ticker.wake``, ``Watch``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from device_agent.protocol import DeploymentState
from fleet_server.engine import DeviceSnapshot
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.runner import ServerThread
from fleet_server.ticker import Watch
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_rollout_flow import directives, serve, status


def test_watch_wakes_when_the_last_device_settles_and_when_it_finishes() -> None:
    watch = Watch()
    watch.track(
        "r",
        [
            DeviceSnapshot("a", DS.NOTIFIED, stage=0, seq=3),
            DeviceSnapshot("b", DS.INSTALLING, stage=0, seq=5, reported_seq=5, reported_state="downloading"),
            DeviceSnapshot("c", DS.DONE, stage=0, seq=2),
            DeviceSnapshot("d", DS.PENDING),
        ],
    )
    assert not watch.seen("d", 1, DeploymentState.SERVING)  # not in flight
    assert not watch.seen("c", 2, DeploymentState.SERVING)  # done already
    assert not watch.seen("a", 3, DeploymentState.SWAPPING)
    assert not watch.seen("a", 3, DeploymentState.PROBATION)  # swapped, on probation: not settled
    assert not watch.seen("a", 3, DeploymentState.SERVING)  # probation passed: a finished, b is not
    assert not watch.seen("b", 4, DeploymentState.FAILED)  # another seq than the one it was sent
    assert not watch.seen("b", 5, DeploymentState.SWAPPING)
    assert watch.seen("b", 5, DeploymentState.SERVING)  # the last one settles: the stage may end now
    assert watch.seen("b", 5, DeploymentState.SERVING)  # its proof: the last device finished
    assert not watch.seen("b", 5, DeploymentState.SERVING)  # once
    watch.forget("r")
    assert not watch.seen("a", 3, DeploymentState.SERVING)


def test_watch_counts_a_failure_as_finished_and_knows_the_states_reported_before() -> None:
    watch = Watch()
    watch.track(
        "r",
        [
            DeviceSnapshot("a", DS.INSTALLING, stage=0, seq=3, reported_seq=3, reported_state="serving"),
            DeviceSnapshot("b", DS.NOTIFIED, stage=0, seq=4),
        ],
    )
    assert not watch.seen("a", 3, DeploymentState.SERVING)  # a's proof; b is on its way
    assert watch.seen("b", 4, DeploymentState.FAILED)  # settles and finishes the last device


def test_watch_leaves_a_rollout_with_a_retry_waiting_to_the_interval() -> None:
    watch = Watch()
    watch.track(
        "r",
        [
            DeviceSnapshot("a", DS.NOTIFIED, stage=0, seq=3),
            DeviceSnapshot("b", DS.RETRY_WAIT, stage=0, seq=2),
        ],
    )
    assert not watch.seen("a", 3, DeploymentState.SERVING)


def test_stages_follow_the_reports_not_the_tick_interval(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    """With a 60 s interval, three engine steps (assign the first stage; finish it and assign the
    second; finish the rollout) take the time of the reports alone."""
    server = make_server(tick_interval=60.0)
    client = httpx.Client(base_url=server.url, timeout=10)
    upload(client, make_bundle(tmp_path, keydir.key("release"), version="2"))
    devs = []
    for i in range(2):
        register(client, f"w-{i}")
        devs.append(fake_device(f"w-{i}"))
        devs[-1].subscribe_desired()
    rid = client.post(
        "/api/v1/rollouts",
        json={"model": "det:2", "stages": [50, 100], "soak_seconds": 0, "min_inferences": 1},
    ).json()["id"]
    served: set[str] = set()

    def step() -> bool:
        for dev in devs:
            got = directives(dev, keydir)
            if got and dev.device_id not in served:
                serve(dev, got[-1], inferences=2)
                served.add(dev.device_id)
        return status(client, rid)["state"] == "completed"

    wait_for(step, timeout=20, interval=0.05)  # a third of one interval, for three steps
    final = status(client, rid)
    assert set(final["devices"].values()) == {"done"}
    assert [d["action"] for d in final["decisions"]] == [
        "created", "assign", "stage_finished", "next_stage", "assign", "stage_finished", "completed",
    ]  # fmt: skip
    ticker = server.context.ticker
    assert ticker is not None and ticker.woken_ticks >= 3
    client.close()
