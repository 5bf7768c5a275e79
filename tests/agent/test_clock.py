"""A device whose wall clock is wrong: ``Agent(..., clock=SkewedClock(s))``.

Everything the agent dates uses the device clock (events, reports, status,
telemetry windows, directive and TUF expiry); everything it times (backoff,
probation, intervals) stays monotonic. Two hours either way must not stop an
install or telemetry; a clock far enough ahead sees the TUF timestamp expired,
and must say so, keep serving, and recover once the clock is right again.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime
from pathlib import Path

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.clock import SkewedClock
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    Bundle,
    LoopThread,
    Observer,
    TufServer,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    start_agent,
    unique_id,
    wait_for,
)

DS = protocol.DeploymentState
HOUR = 3600.0
DAY_TTL = 86400.0  # the fleet server's default directive lifetime


def _off_by(ts: datetime, skew: float) -> float:
    """How far ``ts`` is from the skewed device clock now, in seconds."""
    return abs(ts.timestamp() - (time.time() + skew))


def test_two_hours_fast_or_slow_still_installs_and_reports(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    for skew in (2 * HOUR, -2 * HOUR):
        dev = unique_id("skew")
        cfg = agent_config(broker_info, tmp_path / dev, keydir.trust_path, dev, telemetry_interval=0.3)
        agent = start_agent(loop_thread, Agent(cfg, keydir.trust_root(), clock=SkewedClock(skew)))
        try:
            payload = sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle), ttl=DAY_TTL)
            observer.publish(dev, payload)
            event = observer.wait_event(dev, DS.SERVING, seq=1)
            assert agent.infer(X).ok
            batch = wait_for(functools.partial(observer.telemetry, dev), what="telemetry")[0]
            rep = observer.reported(dev)[-1]
            status = [
                protocol.decode_status(p)
                for t, p in list(observer.messages)
                if t == protocol.topic(dev, "status")
            ][-1]
            # every date the device sent is on ITS clock, not the host's
            for ts in (event.ts, rep.ts, status.ts, batch.window_end):
                assert _off_by(ts, skew) < 60, (skew, ts)
            assert batch.models[bundle.sha256].inferences >= 1
            # timers are not dated: a window still closes every ~0.3 s, not every 2 h
            assert (batch.window_end - batch.window_start).total_seconds() < 30
        finally:
            loop_thread.run(agent.stop())


def test_clock_far_ahead_sees_tuf_metadata_expired_keeps_serving_and_recovers(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    tuf = TufServer(tmp_path / "www", keydir)
    fleet = keydir.key("fleet")
    v1 = make_bundle(tmp_path / "b", keydir.key("release"), seed=1, version="1")
    v2 = make_bundle(tmp_path / "b", keydir.key("release"), seed=2, version="2")
    for b in (v1, v2):
        artifacts.add(b)
        tuf.release(b)
    dev = unique_id("tufclk")
    clock = SkewedClock(2 * HOUR)  # two hours fast: still installs in TUF mode
    cfg = agent_config(
        broker_info,
        tmp_path / dev,
        keydir.trust_path,
        dev,
        tuf_root_path=keydir.tuf_root_path,
        tuf_url=tuf.url,
    )
    agent = start_agent(loop_thread, Agent(cfg, keydir.trust_root(), clock=clock))
    try:

        def direct(seq: int, b: Bundle, ttl: float = DAY_TTL) -> None:
            ref = artifacts.model_ref(b, release=int(b.version))
            observer.publish(dev, sign_directive(fleet, dev, seq, ref, ttl=ttl))

        direct(1, v1)
        observer.wait_event(dev, DS.SERVING, seq=1, timeout=20)
        # 36 h ahead: the directive (3-day lifetime) is valid, the 1-day TUF timestamp is not
        clock.skew_s = 36 * HOUR
        direct(2, v2, ttl=3 * 86400.0)
        failed = observer.wait_event(dev, DS.FAILED, seq=2, timeout=20)
        assert failed.reason == "metadata_expired", (failed.reason, failed.detail)
        assert "device clock" in (failed.detail or "") and _off_by(failed.ts, clock.skew_s) < 60
        assert agent.infer(X).model_sha256 == v1.sha256  # still serving the old model
        rep = wait_for(
            lambda: [r for r in observer.reported(dev) if r.last_rejection and r.last_rejection.seq == 2],
            what="Reported with the rejection",
        )[-1]
        assert rep.last_rejection is not None and rep.last_rejection.reason == "metadata_expired"
        assert rep.running is not None and rep.running.sha256 == v1.sha256
        # a directive past ITS lifetime on the device clock is refused before any download
        direct(3, v2)  # 1-day lifetime, device 36 h ahead
        rejected = observer.wait_event(dev, DS.REJECTED, seq=3)
        assert rejected.reason == "expired"
        # the clock is put right (NTP came back, two hours slow now): the same update goes through
        clock.skew_s = -2 * HOUR
        direct(4, v2)
        observer.wait_event(dev, DS.SERVING, seq=4, timeout=20)
        assert agent.infer(X).model_sha256 == v2.sha256
    finally:
        loop_thread.run(agent.stop())
        tuf.close()
