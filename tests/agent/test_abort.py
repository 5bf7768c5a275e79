"""``Agent.abort()``: the in-process power cut the simulator pulls (no clean shutdown, the will fires)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from device_agent import protocol
from device_agent.agent import Agent, NoModelError
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    LoopThread,
    Observer,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    start_agent,
    unique_id,
    wait_for,
)

DS = protocol.DeploymentState


def _statuses(observer: Observer, dev: str) -> list[str]:
    t = protocol.topic(dev, "status")
    return [protocol.decode_status(p).state for tp, p in list(observer.messages) if tp == t and p]


def test_abort_is_a_power_cut_and_a_new_agent_recovers(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    dev = unique_id("abort")
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    # a long telemetry window: whatever is in it when the plug is pulled must be lost, not sent
    cfg = agent_config(broker_info, tmp_path / dev, keydir.trust_path, dev, telemetry_interval=60.0)
    agent = start_agent(loop_thread, Agent(cfg, keydir.trust_root()))
    observer.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle)))
    observer.wait_event(dev, DS.SERVING, seq=1)
    for _ in range(20):
        assert agent.infer(X).ok
    state_before = (tmp_path / dev / "state.json").read_bytes()
    wait_for(lambda: _statuses(observer, dev) == ["online"], what="online status")

    loop_thread.run(agent.abort())

    # the broker noticed the dead connection and published the will; the agent sent nothing itself
    wait_for(lambda: _statuses(observer, dev)[-1:] == ["offline"], what="last will (offline)")
    assert not observer.telemetry(dev), "abort must not flush the open telemetry window"
    assert (tmp_path / dev / "state.json").read_bytes() == state_before  # nothing written on the way down
    with sqlite3.connect(tmp_path / dev / "telemetry.db") as db:  # the window was not cut on the way down
        assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0
    with pytest.raises(NoModelError):
        agent.infer(X)
    assert agent.link is not None and not agent.link.connected
    assert agent.metrics["telemetry_dropped_batches"] == 0  # still readable after the power cut
    assert all(t.done() for t in asyncio.all_tasks(loop_thread.loop) if dev in t.get_name())
    loop_thread.run(agent.abort())  # idempotent
    loop_thread.run(agent.stop())  # and stop() after abort is a no-op
    with pytest.raises(RuntimeError):
        loop_thread.run(agent.start())

    # power back on: a new agent on the same disk serves at once and reports the truth
    again = start_agent(loop_thread, Agent(cfg, keydir.trust_root()))
    try:
        assert again.infer(X).model_sha256 == bundle.sha256
        wait_for(lambda: _statuses(observer, dev)[-1:] == ["online"], what="online again")
        rep = wait_for(
            lambda: [r for r in observer.reported(dev) if r.running and r.deployment_seq == 1][-2:],
            what="Reported after the reboot",
        )[-1]
        assert rep.running is not None and rep.running.sha256 == bundle.sha256
        assert rep.deployment_state == DS.SERVING
    finally:
        loop_thread.run(again.stop())
