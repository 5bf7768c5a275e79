"""Hot swap: 100 swaps under continuous load from several threads, zero failed or wrong answers."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from device_agent import protocol
from device_agent.agent import Agent, InferenceResult
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    LoopThread,
    Observer,
    agent_config,
    make_bundle,
    sign_directive,
    start_agent,
    swapped,
    unique_id,
    wait_for,
)

DS = protocol.DeploymentState
SWAPS = 100


@pytest.mark.slow
def test_100_swaps_under_load_zero_failures_and_right_model_answers(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    dev = unique_id()
    fleet, release = keydir.key("fleet"), keydir.key("release")
    a = make_bundle(tmp_path, release, seed=1)
    b = make_bundle(tmp_path, release, seed=2, version="2")
    artifacts.add(a)
    artifacts.add(b)
    x = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
    expected = {
        bd.sha256: ort.InferenceSession(str(bd.model_path)).run(None, {"input": x})[0] for bd in (a, b)
    }
    agent = start_agent(
        loop_thread,
        Agent(agent_config(broker_info, tmp_path / dev, keydir.trust_path, dev), keydir.trust_root()),
    )
    refs = [artifacts.model_ref(a), artifacts.model_ref(b)]
    stop = threading.Event()
    results: list[list[InferenceResult]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def hammer(out: list[InferenceResult]) -> None:
        while not stop.is_set():
            try:
                out.append(agent.infer(x))
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(r,)) for r in results]
    try:
        observer.publish(dev, sign_directive(fleet, dev, 1, refs[0]))
        observer.wait_event(dev, DS.SERVING, seq=1)
        for t in threads:
            t.start()
        for seq in range(2, SWAPS + 2):
            observer.publish(dev, sign_directive(fleet, dev, seq, refs[(seq - 1) % 2]))
            wait_for(functools.partial(swapped, agent, seq), what=f"swap {seq}")
        stop.set()
        for t in threads:
            t.join(10)
        flat = [r for rs in results for r in rs]
        assert not failures and len(flat) > 1000
        assert all(r.ok for r in flat)
        assert {r.model_sha256 for r in flat} == {a.sha256, b.sha256}
        # each answer came from the model it names (no torn or wrong-version outputs): every answer
        # against its model's, in one comparison per model (one assert_allclose per answer was most
        # of the test's CPU: tens of thousands of answers)
        for sha, want in expected.items():
            got = np.stack([r.outputs[0] for r in flat if r.model_sha256 == sha])
            np.testing.assert_allclose(
                got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-5, err_msg=sha
            )
        assert len(agent.history) == SWAPS + 1
    finally:
        stop.set()
        loop_thread.run(agent.stop())
