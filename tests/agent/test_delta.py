"""Delta installs end to end: a real agent (TUF mode), a real static web server over the repository
directory (as a mirror serves it), the deltas the server's own code builds, and a model trained here.

A head-only fine-tune installs from a delta with a fraction of the bytes; every way a delta can be
wrong (missing, oversize, corrupt, rebuilding other bytes) falls back to the full file and the
install still succeeds; a file that is wrong both ways never swaps in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compiler.examples import train_digits
from device_agent import protocol
from device_agent.agent import Agent
from edgefleet.broker import BrokerInfo
from fleet_server.deltas import make_delta
from signing.keyring import KeyDir
from signing.manifest import sign_bundle

from .harness import (
    HW,
    ArtifactServer,
    Bundle,
    LoopThread,
    Observer,
    TufServer,
    X,
    agent_config,
    sign_directive,
    start_agent,
    unique_id,
    wait_for,
)

DS = protocol.DeploymentState


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP trained here (compiler.examples), the model a head-only fine-tune starts from."""
    return train_digits(tmp_path_factory.mktemp("digits"), hidden=64).model_path


def fine_tuned(src: Path, dest: Path, seed: int) -> Path:
    """``src`` with only its last layer's weights retrained (moved), every other byte as it was."""
    model = onnx.load(str(src))
    last = next(t for t in reversed(model.graph.initializer) if len(t.dims) == 2)
    w = numpy_helper.to_array(last)
    w = w + 0.05 * np.random.default_rng(seed).standard_normal(w.shape).astype(w.dtype)
    last.CopyFrom(numpy_helper.from_array(w, last.name))
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


def bundle_of(root: Path, model: Path, keydir: KeyDir, version: str) -> Bundle:
    d = root / f"digits-{version}"
    d.mkdir(parents=True)
    shutil.copy(model, d / "model.onnx")
    fields = {"name": "digits", "version": version, "release": int(version), "target": "arm64-cpu"}
    manifest = sign_bundle(d, {**fields, "hardware_ids": [HW]}, ["model.onnx"], keydir.key("release"))
    f = manifest.model_file
    return Bundle(d, f.sha256, f.length, "digits", version, "arm64-cpu", "model.onnx")


class Fleet:
    """What a fleet server and its mirror hold, and one TUF-mode device installing from them."""

    def __init__(
        self,
        tmp: Path,
        keydir: KeyDir,
        broker: BrokerInfo,
        artifacts: ArtifactServer,
        observer: Observer,
        loop: LoopThread,
        **config: object,
    ) -> None:
        self.tmp, self.keydir, self.artifacts, self.observer = tmp, keydir, artifacts, observer
        self.tuf = TufServer(tmp / "www", keydir)
        self.dev = unique_id("delta")
        cfg = agent_config(
            broker,
            tmp / self.dev,
            keydir.trust_path,
            self.dev,
            tuf_root_path=keydir.tuf_root_path,
            tuf_url=self.tuf.url,
            **config,
        )
        self.agent = start_agent(loop, Agent(cfg, keydir.trust_root()))
        self.seq = 0

    def release(self, model: Path, version: str) -> Bundle:
        b = bundle_of(self.tmp / "bundles", model, self.keydir, version)
        self.artifacts.add(b)
        self.tuf.release(b)
        return b

    def delta_file(self, base: Bundle, new: Bundle) -> Path:
        return self.tuf.repo.targets_dir / protocol.delta_path(base.sha256, new.sha256)

    def install(self, b: Bundle, expect: protocol.DeploymentState = DS.SERVING) -> protocol.Event:
        """Direct the device to ``b``; return the event that carried the install's byte count."""
        self.seq += 1
        ref = self.artifacts.model_ref(b, release=int(b.version))
        self.observer.publish(self.dev, sign_directive(self.keydir.key("fleet"), self.dev, self.seq, ref))
        self.observer.wait_event(self.dev, expect, seq=self.seq, timeout=30)
        events = [e for e in self.observer.events(self.dev) if e.seq == self.seq]
        counted = [e for e in events if e.bytes_fetched]
        assert len(counted) <= 1, counted  # one count per install: summing events never counts twice
        event = counted[0] if counted else self.observer.wait_event(self.dev, expect, seq=self.seq)
        # how the model came (delta or full file, and why) is the `installing` step's detail
        return event.model_copy(update={"detail": installing_detail(events)})

    def model_gets(self, b: Bundle) -> int:
        return sum(1 for path, _, _ in self.artifacts.requests if path == f"/m/{b.sha256}")

    def serving(self) -> str | None:
        s = self.agent.serving
        return s.sha256 if s is not None else None


@pytest.fixture
def fleet(
    tmp_path: Path,
    keydir: KeyDir,
    broker_info: BrokerInfo,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, keydir, broker_info, artifacts, observer, loop_thread)
    yield f
    loop_thread.run(f.agent.stop())
    f.tuf.close()


def installing_detail(events: list[protocol.Event]) -> str:
    """The detail of the `installing` event among one directive's events: the delta's verdict."""
    return " ".join(e.detail or "" for e in events if e.state == DS.INSTALLING)


def test_a_head_only_fine_tune_installs_from_a_delta_with_far_fewer_bytes(
    fleet: Fleet, digits_onnx: Path
) -> None:
    v1 = fleet.release(digits_onnx, "1")
    v2 = fleet.release(fine_tuned(digits_onnx, fleet.tmp / "ft" / "v2.onnx", seed=2), "2")

    first = fleet.install(v1)  # nothing served yet: no base, the full file
    assert first.bytes_fetched is not None and first.bytes_fetched > v1.length
    assert "no_base" in (first.detail or "")
    size = make_delta(v1.model_path, v2.model_path, fleet.delta_file(v1, v2))
    assert size < 0.25 * v2.length, (size, v2.length)

    second = fleet.install(v2)
    assert fleet.serving() == v2.sha256
    assert fleet.model_gets(v2) == 0  # the full file was never asked for
    envelope = len((v2.dir / "bundle.dsse.json").read_bytes())
    assert second.bytes_fetched == envelope + size, (second.bytes_fetched, second.detail)
    assert second.bytes_fetched < 0.5 * first.bytes_fetched
    assert "rebuilt from" in (second.detail or "")
    active = fleet.agent.slots.state.active
    assert active is not None
    slot = fleet.agent.slots.slot_dir(active)
    assert hashlib.sha256((slot / "model.onnx").read_bytes()).hexdigest() == v2.sha256
    assert not list(slot.glob("*.delta")) and not list(slot.glob("*.rebuild"))


def test_a_missing_oversize_corrupt_or_wrong_delta_falls_back_and_still_installs(
    fleet: Fleet, digits_onnx: Path
) -> None:
    versions = [fleet.release(digits_onnx, "1")] + [
        fleet.release(fine_tuned(digits_onnx, fleet.tmp / "ft" / f"v{n}.onnx", seed=n), str(n))
        for n in range(2, 6)
    ]
    v1, v2, v3, v4, v5 = versions
    fleet.install(v1)
    # v1 -> v2: no delta published (404)
    # v2 -> v3: a delta longer than 60% of the full file (refused on its declared length)
    fleet.delta_file(v2, v3).parent.mkdir(parents=True, exist_ok=True)
    fleet.delta_file(v2, v3).write_bytes(b"\0" * int(0.7 * v3.length))
    # v3 -> v4: a corrupt frame
    make_delta(v3.model_path, v4.model_path, fleet.delta_file(v3, v4))
    patch = bytearray(fleet.delta_file(v3, v4).read_bytes())
    patch[len(patch) // 2 :] = bytes(len(patch) - len(patch) // 2)
    fleet.delta_file(v3, v4).write_bytes(bytes(patch))
    # v4 -> v5: a well-formed delta that rebuilds other bytes (v2's) under v5's name
    make_delta(v4.model_path, v2.model_path, fleet.delta_file(v4, v5))
    cases = [
        (v2, "delta_not_found"),
        (v3, "delta_too_large"),
        (v4, "delta_corrupt"),
        (v5, "rebuild_mismatch"),
    ]
    for new, why in cases:
        event = fleet.install(new)
        assert why in (event.detail or ""), (why, event.detail)
        assert fleet.serving() == new.sha256
        assert fleet.model_gets(new) >= 1  # the full file came
        assert event.bytes_fetched is not None and event.bytes_fetched >= new.length
    served = fleet.agent.history
    assert v2.sha256 not in served[served.index(v4.sha256) :]  # the wrong rebuild never served


def test_a_device_with_deltas_off_takes_the_full_file(
    tmp_path: Path,
    keydir: KeyDir,
    broker_info: BrokerInfo,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
    digits_onnx: Path,
) -> None:
    fleet = Fleet(tmp_path, keydir, broker_info, artifacts, observer, loop_thread, delta_updates=False)
    try:
        v1 = fleet.release(digits_onnx, "1")
        v2 = fleet.release(fine_tuned(digits_onnx, fleet.tmp / "ft" / "v2.onnx", seed=2), "2")
        fleet.install(v1)
        make_delta(v1.model_path, v2.model_path, fleet.delta_file(v1, v2))
        event = fleet.install(v2)
        assert "deltas_disabled" in (event.detail or "") and fleet.model_gets(v2) == 1
        assert event.bytes_fetched is not None and event.bytes_fetched > v2.length
    finally:
        loop_thread.run(fleet.agent.stop())
        fleet.tuf.close()


def test_a_file_wrong_as_delta_and_as_full_file_never_swaps(fleet: Fleet, digits_onnx: Path) -> None:
    v1 = fleet.release(digits_onnx, "1")
    v2 = fleet.release(fine_tuned(digits_onnx, fleet.tmp / "ft" / "v2.onnx", seed=2), "2")
    evil = fine_tuned(digits_onnx, fleet.tmp / "ft" / "evil.onnx", seed=66)
    fleet.install(v1)
    make_delta(v1.model_path, evil, fleet.delta_file(v1, v2))
    fleet.artifacts.overrides[v2.sha256] = evil.read_bytes()[: v2.length].ljust(v2.length, b"\0")
    failed = fleet.install(v2, expect=DS.FAILED)
    assert failed.reason == "digest_mismatch", (failed.reason, failed.detail)
    assert fleet.serving() == v1.sha256
    # the repository is mended: the next attempt installs (by the delta, now a right one)
    del fleet.artifacts.overrides[v2.sha256]
    make_delta(v1.model_path, v2.model_path, fleet.delta_file(v1, v2))
    assert "rebuilt from" in (fleet.install(v2).detail or "")


def test_leftovers_of_a_rebuild_cut_short_do_not_stop_the_next_one(fleet: Fleet, digits_onnx: Path) -> None:
    v1 = fleet.release(digits_onnx, "1")
    v2 = fleet.release(fine_tuned(digits_onnx, fleet.tmp / "ft" / "v2.onnx", seed=2), "2")
    fleet.install(v1)
    make_delta(v1.model_path, v2.model_path, fleet.delta_file(v1, v2))
    # what a power cut mid-rebuild leaves in the inactive slot: half a patch, half a rebuilt file
    slots = fleet.agent.slots
    inactive = slots.slot_dir(slots.inactive)
    (inactive / f"{v2.sha256}.delta").write_bytes(fleet.delta_file(v1, v2).read_bytes()[:10])
    (inactive / f"{v2.sha256}.rebuild").write_bytes(v2.model_path.read_bytes()[:100])
    assert fleet.serving() == v1.sha256
    assert "rebuilt from" in (fleet.install(v2).detail or "")
    assert fleet.serving() == v2.sha256


@pytest.mark.slow
def test_the_fleet_server_builds_the_delta_a_device_then_installs_from(
    tmp_path: Path,
    keydir: KeyDir,
    broker_info: BrokerInfo,
    observer: Observer,
    loop_thread: LoopThread,
    digits_onnx: Path,
) -> None:
    """Push v1, roll it out; push a head-only fine-tune: the server builds the delta from v1 into its
    TUF targets tree at push, and the device (repository URL derived from its directive) uses it."""
    from edgefleet.broker import server_mqtt_settings
    from edgefleet.client import ApiClient
    from fleet_server.runner import ServerThread
    from fleet_server.settings import ServerSettings

    settings = ServerSettings(
        data_dir=tmp_path / "server",
        keys_dir=keydir.path,
        **server_mqtt_settings(broker_info),
        tick_interval=0.1,
        auth_required=True,
        # the streams in the server's own client, as the server tests' servers unless they test the
        # workers: no forkserver left running in this test process after the module
        ingest_workers=0,
    )
    release = keydir.key("release")
    v1 = bundle_of(tmp_path / "b", digits_onnx, keydir, "1")
    v2 = bundle_of(tmp_path / "b", fine_tuned(digits_onnx, tmp_path / "ft" / "v2.onnx", seed=2), keydir, "2")
    dev = unique_id("fleetdelta")
    cfg = agent_config(
        broker_info, tmp_path / dev, keydir.trust_path, dev, tuf_root_path=keydir.tuf_root_path
    )
    server = ServerThread(settings).start()
    assert server.wait_subscribed(30), "the server subscribed"  # before the device
    agent = Agent(cfg, keydir.trust_root())
    try:
        with ApiClient(server.url, token=server.admin_token) as api:
            api.register_device(dev, HW)
            start_agent(loop_thread, agent)

            def installed(b: Bundle) -> None:
                api.push_bundle(b.dir, release_keys=[release])
                rid = api.create_rollout(
                    model=f"digits:{b.version}", selector={"hardware_id": HW}, stages=[100], min_inferences=1
                )["id"]

                def running() -> bool:
                    return agent.running_sha256 == b.sha256

                def completed() -> bool:
                    return bool(api.rollout(rid)["state"] == "completed")

                wait_for(running, 30, f"v{b.version} installed")
                agent.infer(X)
                wait_for(completed, 30, "rollout completed")

            installed(v1)
            installed(v2)
        delta = tmp_path / "server" / "tuf" / "targets" / protocol.delta_path(v1.sha256, v2.sha256)
        assert delta.is_file() and delta.stat().st_size < 0.25 * v2.length
        counted = [e for e in observer.events(dev) if e.bytes_fetched]
        assert len(counted) == 2, counted
        assert counted[0].bytes_fetched is not None and counted[0].bytes_fetched > v1.length
        second = installing_detail([e for e in observer.events(dev) if e.seq == counted[1].seq])
        assert "rebuilt from" in second, second
        assert counted[1].bytes_fetched is not None and counted[1].bytes_fetched < 0.5 * v2.length
        assert agent.running_sha256 == v2.sha256
    finally:
        loop_thread.run(agent.stop())
        server.stop()


def test_a_delta_streamed_past_its_bound_is_cut_off_whatever_it_declares(tmp_path: Path) -> None:
    """A server that sends no length and then endless bytes: the device stops at the bound."""
    import asyncio

    from device_agent.delta import DeltaRefused, Fallback
    from device_agent.http_fetcher import HttpFetcher
    from tests.support.loopback_http import LoopbackServer, QuietHandler

    class Endless(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body runs until the connection closes
            for _ in range(64):
                self.wfile.write(b"\0" * 4096)

    with LoopbackServer(Endless) as server, pytest.raises(DeltaRefused) as refused:
        asyncio.run(HttpFetcher("dev-1").delta(f"{server.url}/d", tmp_path / "d", max_bytes=10_000))
    assert refused.value.why is Fallback.TOO_LARGE
    assert 10_000 < refused.value.received < 64 * 4096


def test_a_frame_asking_for_a_window_beyond_the_signed_length_is_refused_before_it_allocates(
    tmp_path: Path,
) -> None:
    from device_agent.delta import DeltaRefused, Fallback, rebuild

    base, new = tmp_path / "base", tmp_path / "new"
    base.write_bytes(bytes(range(256)) * 256)
    new.write_bytes(bytes(range(256)) * 512)  # 128 KiB: its delta's window is 2**17
    make_delta(base, new, tmp_path / "p")
    with pytest.raises(DeltaRefused) as refused:  # a directive naming a 1 KiB file: window 2**10 at most
        rebuild(base, tmp_path / "p", tmp_path / "out", length=1024, sha256="0" * 64)
    assert refused.value.why is Fallback.CORRUPT
    assert not (tmp_path / "out").exists()
    rebuild(base, tmp_path / "p", tmp_path / "out", length=new.stat().st_size, sha256=_sha(new))
    assert (tmp_path / "out").read_bytes() == new.read_bytes()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_power_cut_mid_delta_leaves_the_served_model_and_the_next_boot_installs(
    tmp_path: Path,
    keydir: KeyDir,
    broker_info: BrokerInfo,
    artifacts: ArtifactServer,
    observer: Observer,
    digits_onnx: Path,
) -> None:
    """The agent process is killed -9 while the delta streams in (a slow mirror); on restart the
    old model serves, and the retained directive is carried out from the delta."""
    import time
    from typing import Any

    from tests.support.loopback_http import LoopbackServer, QuietFiles

    from .test_power_loss import _api, _finished, _spawn, _stop, _write_conf

    www = tmp_path / "www"
    tuf = TufServer(www, keydir)

    class SlowDeltas(QuietFiles):
        def copyfile(self, source: Any, outputfile: Any) -> None:
            if "/deltas/" not in self.path:
                return super().copyfile(source, outputfile)
            while chunk := source.read(128):
                outputfile.write(chunk)
                outputfile.flush()
                time.sleep(0.1)

    mirror = LoopbackServer(lambda *a, **kw: SlowDeltas(*a, directory=str(www), **kw))
    fleet_key = keydir.key("fleet")
    old = bundle_of(tmp_path / "b", digits_onnx, keydir, "1")
    new = bundle_of(tmp_path / "b", fine_tuned(digits_onnx, tmp_path / "ft" / "v2.onnx", seed=2), keydir, "2")
    for b in (old, new):
        artifacts.add(b)
        tuf.release(b)
    make_delta(old.model_path, new.model_path, www / "targets" / protocol.delta_path(old.sha256, new.sha256))
    dev, data = unique_id("cut"), tmp_path / "device"
    mode = {"tuf_root_path": str(keydir.tuf_root_path), "tuf_url": mirror.url}
    conf = _write_conf(tmp_path / "agent.toml", dev, data, keydir.trust_path, broker_info, **mode)

    def ref(b: Bundle) -> protocol.ModelRef:
        return artifacts.model_ref(b, release=int(b.version))

    proc = _spawn(conf)
    try:
        observer.publish(dev, sign_directive(fleet_key, dev, 1, ref(old)))
        observer.wait_event(dev, DS.SERVING, seq=1, timeout=30)
        observer.publish(dev, sign_directive(fleet_key, dev, 2, ref(new)))
        wait_for(lambda: list(data.glob(f"slots/*/{new.sha256}.delta")), 30, "the delta streaming in")
    finally:
        _stop(proc, kill=True)  # power loss mid-delta
    state = json.loads((data / "state.json").read_text())
    assert state["slots"][state["active"]]["sha256"] == old.sha256
    (data / "api.sock").unlink(missing_ok=True)
    proc = _spawn(conf)
    try:
        wait_for(lambda: _finished(observer, dev, 2), 60, "the update finished after the power cut")
        status, doc = _api(data, "GET", "/v1/model") or (0, {})
        assert status == 200 and doc["model_sha256"] == new.sha256
        installs = [e for e in observer.events(dev) if e.seq == 2 and e.bytes_fetched]
        detail = installing_detail([e for e in observer.events(dev) if e.seq == 2])
        assert installs and "rebuilt from" in detail, detail
        assert not any(path == f"/m/{new.sha256}" for path, _, _ in artifacts.requests)
    finally:
        _stop(proc)
        mirror.close()
        tuf.close()
