"""Probation with auto-revert and shadow mode, against a real broker, HTTP server and onnxruntime."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from device_agent import protocol
from device_agent.agent import Agent
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    Bundle,
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


def _top1(model: Path) -> int:
    import onnxruntime as ort

    return int(ort.InferenceSession(str(model)).run(None, {"input": X})[0].argmax())


def _agent(broker: BrokerInfo, keydir: KeyDir, tmp_path: Path, dev: str) -> Agent:
    return Agent(agent_config(broker, tmp_path / dev, keydir.trust_path, dev), keydir.trust_root())


def test_probation_reports_success_only_after_window_and_n_inferences(
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    two_bundles: tuple[Bundle, Bundle],
    running_agent: Callable[..., Agent],
) -> None:
    dev = unique_id()
    fleet = keydir.key("fleet")
    a, b = two_bundles
    agent = running_agent(dev)
    observer.publish(dev, sign_directive(fleet, dev, 1, artifacts.model_ref(a)))
    observer.wait_event(dev, DS.SERVING, seq=1)
    prob = protocol.Probation(seconds=0.3, min_inferences=5, max_error_rate=0.0)
    observer.publish(dev, sign_directive(fleet, dev, 2, artifacts.model_ref(b), probation=prob))
    observer.wait_event(dev, DS.PROBATION, seq=2)
    assert agent.running_sha256 == b.sha256  # swapped in, being watched
    for _ in range(4):
        assert agent.infer(X).model_sha256 == b.sha256
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 0.6, what="probation window to pass")
    # window over but only 4 of 5 inferences: still on probation, no success reported
    assert agent.deployment_state == DS.PROBATION
    assert not [e for e in observer.events(dev) if e.seq == 2 and e.state == DS.SERVING]
    agent.infer(X)
    observer.wait_event(dev, DS.SERVING, seq=2)
    state = json.loads((tmp_path / dev / "state.json").read_text())
    assert state["probation"] is None and state["deployment"]["state"] == "serving"
    rep = wait_for(
        lambda: [
            r for r in observer.reported(dev) if r.deployment_seq == 2 and r.deployment_state == DS.SERVING
        ],
        what="serving report",
    )[-1]
    assert rep.running is not None and rep.running.sha256 == b.sha256


def test_probation_reverts_a_misbehaving_model_by_itself(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    dev = unique_id()
    fleet, release = keydir.key("fleet"), keydir.key("release")
    good = make_bundle(tmp_path, release, seed=1)
    bad = make_bundle(tmp_path, release, seed=2, version="2", nan=True)
    artifacts.add(good)
    artifacts.add(bad)
    agent = start_agent(loop_thread, _agent(broker_info, keydir, tmp_path, dev))
    try:
        observer.publish(dev, sign_directive(fleet, dev, 1, artifacts.model_ref(good)))
        observer.wait_event(dev, DS.SERVING, seq=1)
        prob = protocol.Probation(seconds=30, min_inferences=3, max_error_rate=0.1)
        observer.publish(dev, sign_directive(fleet, dev, 2, artifacts.model_ref(bad), probation=prob))
        observer.wait_event(dev, DS.PROBATION, seq=2)
        results = [agent.infer(X) for _ in range(3)]
        assert not any(r.ok for r in results) and {r.error for r in results} == {"non_finite"}
        ev = observer.wait_event(dev, DS.REVERTED, seq=2)
        assert ev.reason == "error_rate" and ev.model_sha256 == bad.sha256
        assert agent.running_sha256 == good.sha256
        assert agent.infer(X).ok
        state = json.loads((tmp_path / dev / "state.json").read_text())
        assert state["slots"][state["active"]]["sha256"] == good.sha256
        assert state["deployment"] == {"seq": 2, "state": "reverted", "error": "error_rate"}
        rep = wait_for(
            lambda: [r for r in observer.reported(dev) if r.deployment_state == DS.REVERTED], what="report"
        )[-1]
        assert rep.running is not None and rep.running.sha256 == good.sha256
        assert rep.last_rejection is not None and rep.last_rejection.reason == "error_rate"
        assert rep.served_errors.get(bad.sha256) == 3
        assert not [e for e in observer.events(dev) if e.seq == 2 and e.state == DS.SERVING]
    finally:
        loop_thread.run(agent.stop())


def test_shadow_runs_a_candidate_unserved_then_promotes_on_directive(
    keydir: KeyDir,
    artifacts: ArtifactServer,
    observer: Observer,
    two_bundles: tuple[Bundle, Bundle],
    running_agent: Callable[..., Agent],
) -> None:
    dev = unique_id()
    fleet = keydir.key("fleet")
    a, b = two_bundles
    expected_agree = _top1(a.model_path) == _top1(b.model_path)
    agent = running_agent(dev)
    observer.publish(dev, sign_directive(fleet, dev, 1, artifacts.model_ref(a)))
    observer.wait_event(dev, DS.SERVING, seq=1)
    observer.publish(
        dev,
        sign_directive(
            fleet, dev, 2, artifacts.model_ref(a), shadow=artifacts.model_ref(b), shadow_sample_rate=0.5
        ),
    )
    observer.wait_event(dev, DS.SHADOWING, seq=2)
    assert agent.shadow_sha256 == b.sha256
    served = [agent.infer(X) for _ in range(40)]
    assert {r.model_sha256 for r in served} == {a.sha256}  # never served
    batches = wait_for(
        lambda: [t for t in observer.telemetry(dev) if b.sha256 in t.shadow], what="shadow stats"
    )
    wait_for(
        lambda: (
            sum(s.samples for t in observer.telemetry(dev) for k, s in t.shadow.items() if k == b.sha256)
            >= 20
        ),
        what="20 shadow samples",
    )
    stats = [t.shadow[b.sha256] for t in observer.telemetry(dev) if b.sha256 in t.shadow]
    samples = sum(s.samples for s in stats)
    assert samples == 20  # every 2nd of 40 live inputs (rate 0.5)
    assert sum(s.top1_agree for s in stats) == (samples if expected_agree else 0)
    assert sum(sum(s.latency_buckets) for s in stats) == samples
    assert batches and all(b.sha256 not in t.models for t in observer.telemetry(dev))
    rep = wait_for(lambda: [r for r in observer.reported(dev) if r.shadow_sha256 == b.sha256], what="rep")
    assert rep[-1].running is not None and rep[-1].running.sha256 == a.sha256
    # promotion is a later directive; the candidate is already in a slot, nothing is downloaded
    downloads = sum(1 for p, _, _ in artifacts.requests if p.startswith("/m/"))
    observer.publish(dev, sign_directive(fleet, dev, 3, artifacts.model_ref(b)))
    observer.wait_event(dev, DS.SERVING, seq=3)
    assert agent.infer(X).model_sha256 == b.sha256 and agent.shadow_sha256 is None
    assert sum(1 for p, _, _ in artifacts.requests if p.startswith("/m/")) == downloads
