"""The agent shell with its link and fetcher in memory: a real agent, real onnxruntime, no broker, no server.

The MQTT and HTTP edges are tested against the real Mosquitto and a real HTTP server
elsewhere (``test_agent.py``, ``test_https.py``); here the shell's own behaviour is
driven directly and fast, including a Hypothesis property over directive sequences.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.memory_link import MemoryLink
from signing.keyring import KeyDir

from .harness import HW, Bundle, LoopThread, X, make_bundle, model_ref, sign_directive, unique_id, wait_for
from .memory_fetcher import MemoryFetcher

DS = protocol.DeploymentState
# the events of one full install, in order (the envelope is downloaded and verified before the model)
AN_INSTALL = [
    DS.DOWNLOADING,
    DS.VERIFYING,
    DS.DOWNLOADING,
    DS.INSTALLING,
    DS.WARMING,
    DS.SWAPPING,
    DS.SERVING,
]


@dataclass
class Device:
    agent: Agent
    link: MemoryLink
    fetcher: MemoryFetcher
    loop: LoopThread
    keydir: KeyDir

    @property
    def id(self) -> str:
        return self.agent.device_id

    def ref(self, bundle: Bundle, **changes: Any) -> protocol.ModelRef:
        model_url, envelope_url = self.fetcher.add(bundle)
        return model_ref(bundle, model_url=model_url, envelope_url=envelope_url, **changes)

    def direct(self, seq: int, bundle: Bundle | None, device: str | None = None, **kw: Any) -> None:
        ref = self.ref(bundle) if bundle is not None else None
        self.link.deliver(sign_directive(self.keydir.key("fleet"), device or self.id, seq, ref, **kw))

    def events(self) -> list[protocol.Event]:
        return [protocol.decode_event(m.payload) for m in self.link.published(protocol.Channel.EVENTS)]

    def wait_event(self, state: protocol.DeploymentState, seq: int, timeout: float = 10.0) -> protocol.Event:
        def find() -> protocol.Event | None:
            return next((e for e in self.events() if e.state == state and e.seq == seq), None)

        return wait_for(find, timeout, f"{state} event for seq {seq}")

    def reported(self) -> protocol.Reported:
        return protocol.decode_reported(self.link.published(protocol.Channel.REPORTED)[-1].payload)


def _device(keydir: KeyDir, data: Path, loop: LoopThread, **config: Any) -> Device:
    dev = unique_id()
    admission = config.pop("admission", None)
    cfg = AgentConfig(
        dev, HW, data, keydir.trust_path, telemetry_interval=config.pop("telemetry_interval", 0.2), **config
    )
    link, fetcher = MemoryLink(dev), MemoryFetcher()
    agent = Agent(cfg, keydir.trust_root(), link=link, fetcher=fetcher, admission=admission)
    loop.run(agent.start())
    assert loop.run(agent.wait_connected(5))
    return Device(agent, link, fetcher, loop, keydir)


@pytest.fixture
def device(keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread) -> Iterator[Callable[..., Device]]:
    started: list[Device] = []

    def make(**config: Any) -> Device:
        d = _device(keydir, tmp_path / f"dev{len(started)}", loop_thread, **config)
        started.append(d)
        return d

    yield make
    for d in started:
        loop_thread.run(d.agent.stop())


def test_installs_and_serves_without_a_broker(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device()
    statuses = d.link.published(protocol.Channel.STATUS)
    assert [protocol.decode_status(m.payload).state for m in statuses] == ["online"]
    d.direct(1, a)
    d.wait_event(DS.SERVING, 1)
    assert [e.state for e in d.events()] == AN_INSTALL
    assert d.agent.infer(X).model_sha256 == a.sha256
    assert d.agent.deployment.model == d.agent.running_sha256 == a.sha256 and d.agent.history == [a.sha256]
    assert d.fetcher.calls == [f"mem://e/{a.sha256}", f"mem://m/{a.sha256}"]
    rep = wait_for(lambda: d.reported().served_ok.get(a.sha256), what="the proof report") and d.reported()
    assert rep.running is not None and rep.running.sha256 == a.sha256 and rep.deployment_seq == 1
    # the same retained directive after a reconnect is recognised, not redone
    d.link.disconnect()
    d.link.reconnect()
    wait_for(lambda: d.agent.metrics.get("duplicate_directives", 0) >= 1, what="duplicate after reconnect")
    assert len(d.events()) == 7 and d.fetcher.calls == [f"mem://e/{a.sha256}", f"mem://m/{a.sha256}"]


def test_an_unavailable_server_is_retried_within_the_budget(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, b = two_bundles
    d = device(delivery_retry_s=20.0)
    d.fetcher.away[f"mem://e/{a.sha256}"] = 2
    d.fetcher.away[f"mem://m/{a.sha256}"] = 2
    d.direct(1, a)
    d.wait_event(DS.SERVING, 1, timeout=20)
    assert not [e for e in d.events() if e.reason]
    d.agent.config.delivery_retry_s = 0.5
    d.fetcher.away[f"mem://e/{b.sha256}"] = 10_000
    d.direct(2, b)
    failed = d.wait_event(DS.FAILED, 2)
    assert failed.reason == "download_failed" and "503" in (failed.detail or "")
    assert d.agent.infer(X).model_sha256 == a.sha256


class Turns:
    """One turn at a time, shared by agents on one loop, counting who held it and how many at once."""

    def __init__(self) -> None:
        self.sem = asyncio.Semaphore(1)
        self.holders = self.most = self.turns = 0

    async def __aenter__(self) -> None:
        await self.sem.acquire()
        self.holders += 1
        self.turns += 1
        self.most = max(self.most, self.holders)

    async def __aexit__(self, *exc: object) -> None:  # any exception passes on
        self.holders -= 1
        self.sem.release()


def test_agents_sharing_a_cpu_take_turns_and_a_wait_is_not_the_delivery_budget(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle], loop_thread: LoopThread
) -> None:
    """The simulator's agents share one core: an install waits for its turn at the heavy steps
    without reporting anything, and the wait is not spent from its delivery retry budget."""
    a, _ = two_bundles
    turns = Turns()
    first, second = device(admission=turns), device(admission=turns, delivery_retry_s=0.5)
    loop_thread.run(turns.sem.acquire())  # someone else's install holds the only turn
    first.direct(1, a)
    second.fetcher.away[f"mem://e/{a.sha256}"] = 1  # one retry needed, well inside 0.5 s of budget
    second.direct(1, a)
    time.sleep(1.5)  # three budgets' worth of waiting
    for d in (first, second):  # announced, then nothing fetched and nothing failed
        assert [(e.state, e.reason) for e in d.events()] == [(DS.DOWNLOADING, None)]
    loop_thread.loop.call_soon_threadsafe(turns.sem.release)
    first.wait_event(DS.SERVING, 1)
    second.wait_event(DS.SERVING, 1)
    assert not [e for d in (first, second) for e in d.events() if e.reason]
    # a turn per fetch attempt (envelope, model; the second device's envelope twice) and one for
    # loading and checking the model: the backoff between the two envelope tries held none
    assert turns.most == 1 and turns.turns == 3 + 4


def test_refusals_and_failures_keep_the_model(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle], keydir: KeyDir
) -> None:
    a, b = two_bundles
    d = device()
    d.direct(5, a)
    d.wait_event(DS.SERVING, 5)
    d.fetcher.add(b)
    d.fetcher.files[f"mem://m/{b.sha256}"] = b"\x00" * b.length  # tampered in transit
    ref = protocol.ModelRef(**{**d.ref(a).model_dump(), "sha256": b.sha256, "length": b.length})
    ref = ref.model_copy(update={"model_url": f"mem://m/{b.sha256}", "envelope_url": f"mem://e/{b.sha256}"})
    d.link.deliver(sign_directive(keydir.key("fleet"), d.id, 6, ref))
    assert d.wait_event(DS.FAILED, 6).reason == "digest_mismatch"
    d.direct(4, b)
    assert d.wait_event(DS.REJECTED, 4).reason == "stale_sequence"
    d.link.deliver(b"[" * 100_000 + b"]" * 100_000)
    assert d.wait_event(DS.REJECTED, 0).reason == "malformed_envelope"
    assert d.agent.metrics["malformed_messages"] == 1 and d.agent.metrics["rejected_directives"] == 2
    assert d.agent.infer(X).model_sha256 == a.sha256 and d.agent.history == [a.sha256]
    assert d.agent.deployment_state == DS.FAILED and d.agent.deployment_error == "digest_mismatch"


def test_telemetry_is_kept_until_the_broker_acknowledges_it(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device()
    d.direct(1, a)
    d.wait_event(DS.SERVING, 1)
    d.link.acks = False
    for _ in range(5):
        d.agent.infer(X)
    wait_for(lambda: len(d.agent.telemetry.store) >= 1, what="a queued batch")
    time.sleep(0.5)
    assert len(d.agent.telemetry.store) >= 1  # sent, never acknowledged: kept
    d.link.acks = True
    wait_for(lambda: len(d.agent.telemetry.store) == 0, what="the queue drained once acknowledged")
    sent = [protocol.decode_telemetry(m.payload) for m in d.link.published(protocol.Channel.TELEMETRY)]
    assert sum(b.models[a.sha256].inferences for b in sent if a.sha256 in b.models) >= 5


@pytest.fixture(scope="module")
def three_bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Bundle]]]:
    """Keys and three release-signed models (two good, one whose outputs are NaN) shared by the examples."""
    from signing.keyring import init_keys

    root = tmp_path_factory.mktemp("shell-prop")
    init_keys(root / "keys")
    keys = KeyDir(root / "keys")
    release = keys.key("release")
    bundles = [
        make_bundle(root / "b", release, seed=1, version="1"),
        make_bundle(root / "b", release, seed=2, version="2"),
        make_bundle(root / "b", release, seed=3, version="3", nan=True),
    ]
    yield root / "keys", bundles


_actions = st.lists(
    st.one_of(
        st.tuples(st.just("install"), st.integers(0, 2), st.booleans()),  # which bundle, on probation?
        st.tuples(st.just("keep"), st.just(0), st.just(False)),  # model None: keep what serves
        st.tuples(st.just("stale"), st.just(0), st.just(False)),  # the last seq again, other bytes
        st.tuples(st.just("stranger"), st.just(0), st.just(False)),  # the next seq, for another device
    ),
    min_size=1,
    max_size=6,
)


def _ends(seq: int, e: protocol.Event) -> bool:
    return e.seq == seq and e.state in (DS.SERVING, DS.IDLE, DS.REVERTED)


def _settle(d: Device, seen: int, done: Callable[[protocol.Event], bool]) -> list[protocol.Event]:
    """Wait for the event that ends this step; return every event published since ``seen``."""
    wait_for(lambda: any(done(e) for e in d.events()[seen:]), what="the step's outcome")
    return d.events()[seen:]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_actions)
def test_the_model_changes_only_by_a_swap_or_a_revert(
    three_bundles: tuple[Path, list[Bundle]], actions: list[tuple[str, int, bool]]
) -> None:
    """Whatever the fleet sends, every model that comes to serve was announced by ``swapping``
    (or, after ``reverted``, is the one that served before), the core's record names the model
    that really serves, and the seqs the device acts on only rise."""
    keys, bundles = three_bundles
    keydir = KeyDir(keys)
    loop = LoopThread()
    two_ok = protocol.Probation(seconds=0.0, min_inferences=2, max_error_rate=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        d = _device(keydir, Path(tmp) / "data", loop)
        try:
            seq = 0
            for kind, which, on_probation in actions:
                before, seen = list(d.agent.history), len(d.events())
                if kind == "stale" and seq:
                    d.direct(seq, None)
                    _settle(d, seen, lambda e: e.state == DS.REJECTED and e.reason == "stale_sequence")
                elif kind == "stranger":
                    d.direct(seq + 1, None, device="someone-else")
                    _settle(d, seen, lambda e: e.state == DS.REJECTED and e.reason == "wrong_device")
                elif kind in ("install", "keep"):
                    seq += 1
                    bundle = bundles[which] if kind == "install" else None
                    watched = on_probation and bundle is not None and bundle.sha256 != d.agent.running_sha256
                    d.direct(seq, bundle, probation=two_ok if on_probation else None)
                    if watched:
                        d.wait_event(DS.PROBATION, seq)
                        d.agent.infer(X)
                        d.agent.infer(X)
                    new = _settle(d, seen, functools.partial(_ends, seq))
                    expected = list(before)
                    for e in new:
                        if e.state == DS.SWAPPING:
                            expected.append(e.model_sha256 or "")
                        elif e.state == DS.REVERTED and before:
                            expected.append(before[-1])
                    assert d.agent.history == expected
                assert d.agent.deployment.model == d.agent.running_sha256
            acted = [e.seq for e in d.events() if e.state != DS.REJECTED]
            assert acted == sorted(acted)
        finally:
            loop.run(d.agent.stop())
            loop.close()
