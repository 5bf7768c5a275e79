"""Capture end to end: a real agent samples its inferences by the signed directive's policy, keeps them
on a real disk within the quota and uploads them, signed with the device's fleet-CA certificate, to a
real HTTP server that verifies every signature. Killed mid-upload, restarted, the server away or
refusing: every captured inference arrives exactly once, or is counted as evicted or refused.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509

from device_agent.capture_store import JOURNAL
from edgefleet.broker import BrokerInfo, device_mqtt_keys
from edgefleet.provision import fleet_ca
from signing.keyring import KeyDir

from .field_device import CaptureServer, FieldDevice, device_identity, start_device, write_agent_toml
from .harness import (
    ArtifactServer,
    Bundle,
    LoopThread,
    Observer,
    make_bundle,
    sign_directive,
    unique_id,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]

RNG = np.random.default_rng(7)


@pytest.fixture
def server(keydir: KeyDir) -> Iterator[CaptureServer]:
    srv = CaptureServer(fleet_ca(keydir).cert).start()
    yield srv
    srv.stop()


@pytest.fixture
def bundle(tmp_path: Path, keydir: KeyDir) -> Bundle:
    return make_bundle(tmp_path / "b", keydir.key("release"), seed=3)


def _policy(server: CaptureServer, **kw: Any) -> dict[str, Any]:
    return {"upload_url": server.url, "sample_rate": 1.0, "keep": "both", **kw}


def _device(keydir: KeyDir, tmp_path: Path, loop: LoopThread, device_id: str, **kw: Any) -> FieldDevice:
    """The same device (id, certificate, data dir) every time it is started."""
    identity = device_identity(keydir, device_id, tmp_path) if kw.pop("identity", True) else {}
    return start_device(
        keydir,
        tmp_path / device_id,
        loop,
        device_id=device_id,
        identity=False,
        capture_batch_age_s=kw.pop("capture_batch_age_s", 0.2),
        **identity,
        **kw,
    )


def _infer(dev: FieldDevice, n: int) -> list[str]:
    return [dev.agent.infer(RNG.standard_normal((1, 64)).astype(np.float32)).inference_id for _ in range(n)]


def _infer_captured(dev: FieldDevice, n: int) -> list[str]:
    """``n`` inferences, paced so the capture queue never overflows (every one is captured)."""
    ids: list[str] = []
    start = dev.agent.metrics.get("captured", 0)

    def written() -> bool:
        return bool(dev.agent.metrics.get("captured", 0) == start + len(ids))

    while len(ids) < n:
        ids += _infer(dev, min(100, n - len(ids)))
        wait_for(written, 20, "captures written")
    return ids


def _on_disk(data: Path) -> list[str]:
    """The inference ids a device holds for upload (sealed batches and the open journal)."""
    ids = []
    for f in sorted((data / "capture" / "batches").glob("*.json")):
        try:
            raw = f.read_bytes()
        except FileNotFoundError:  # uploaded and forgotten between the listing and the read
            continue
        ids += [i["inference_id"] for i in json.loads(raw)["items"]]
    try:
        journal = (data / "capture" / JOURNAL).read_bytes()
    except FileNotFoundError:  # none open, or sealed into a batch since the listing
        journal = b""
    if journal:
        for line in journal.split(b"\n")[1:]:
            try:
                ids.append(json.loads(line)["inference_id"])
            except ValueError:  # empty, or torn by a kill mid-write: never counted as captured
                continue
    return ids


def _stop(loop: LoopThread, dev: FieldDevice) -> None:
    loop.run(dev.agent.stop())


def test_sampled_inferences_arrive_signed_with_their_ids_and_arrays(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"))
    try:
        dev.serve(bundle, capture=_policy(server))
        xs = [RNG.standard_normal((1, 64)).astype(np.float32) for _ in range(40)]
        results = {r.inference_id: (x, r) for x in xs for r in [dev.agent.infer(x)]}
        wait_for(lambda: sorted(server.ids()) == sorted(results), 20, "every capture uploaded")
        assert len(server.ids()) == 40
        for stored in server.stored.values():
            assert stored.device_id == dev.id
            for item in stored.items:
                x, r = results[item["inference_id"]]
                t = item["inputs"]["input"]
                got = np.frombuffer(base64.b64decode(t["data"]), np.dtype(t["dtype"])).reshape(t["shape"])
                assert np.array_equal(got, x)
                (o,) = item["outputs"]
                out = np.frombuffer(base64.b64decode(o["data"]), np.dtype(o["dtype"])).reshape(o["shape"])
                assert np.array_equal(out, r.outputs[0])
        assert dev.stats(bundle.sha256)["captured"] == 40
        wait_for(lambda: dev.agent.metrics.get("capture_items_uploaded") == 40, 10, "the answers counted")
        assert "capture_batches_refused" not in dev.agent.metrics
    finally:
        _stop(loop_thread, dev)


@pytest.mark.parametrize("keep", ["inputs", "outputs"])
def test_keep_says_what_is_captured(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle, keep: str
) -> None:
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"))
    try:
        dev.serve(bundle, capture=_policy(server, keep=keep))
        ids = _infer(dev, 5)
        wait_for(lambda: sorted(server.ids()) == sorted(ids), 20, "captures uploaded")
        for stored in server.stored.values():
            for item in stored.items:
                assert set(item) == {"inference_id", "ts", keep}
    finally:
        _stop(loop_thread, dev)


def test_a_sample_rate_captures_about_that_share(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"))
    try:
        dev.serve(bundle, capture=_policy(server, sample_rate=0.1))
        ids = set(_infer(dev, 2000))
        wait_for(lambda: dev.agent.metrics.get("captured", 0) > 0, 10, "captures")
        captured = wait_for(
            lambda: len(server.ids()) == dev.agent.metrics["captured"] and len(server.ids()), 20
        )
        assert 120 <= captured <= 290  # 200 expected; binomial sd ~13
        assert set(server.ids()) <= ids
    finally:
        _stop(loop_thread, dev)


def test_killed_mid_upload_and_restarted_every_capture_arrives_exactly_once(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    device_id = unique_id("cap")
    dev = _device(keydir, tmp_path, loop_thread, device_id)
    dev.serve(bundle, capture=_policy(server))
    server.hold_s = 3.0  # the server stores the first batch, then keeps the device waiting
    ids = _infer(dev, 15)
    wait_for(lambda: server.stored, 10, "a batch stored while its upload is still open")
    ids += _infer(dev, 15)
    wait_for(lambda: dev.agent.metrics.get("captured") == 30, 10, "all 30 on disk")
    loop_thread.run(dev.agent.abort())  # the plug is pulled before the device heard 201
    assert server.answers == []  # no answer reached the device
    on_disk = _on_disk(tmp_path / device_id)
    assert sorted(set(on_disk) | set(server.ids())) == sorted(ids)
    assert set(server.ids()) <= set(on_disk)  # the stored batch is still on the device
    server.hold_s = 0.0

    again = _device(keydir, tmp_path, loop_thread, device_id)  # no directive needed: the policy is kept
    try:
        wait_for(lambda: not _on_disk(tmp_path / device_id), 30, "every capture sent after the restart")
        assert sorted(server.ids()) == sorted(ids)
        assert len(server.ids()) == 30  # none twice
        assert 200 in [status for status, _ in server.answers]  # the resend found it stored
        assert again.agent.capture.rate == 1.0  # sampling resumed from the stored policy
    finally:
        _stop(loop_thread, again)


def test_a_server_away_then_busy_loses_nothing(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    server.stop()  # connection refused
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"))
    try:
        dev.serve(bundle, capture=_policy(server))
        ids = _infer(dev, 20)
        wait_for(lambda: dev.agent.metrics.get("capture_upload_retries", 0) >= 2, 20, "failed attempts")
        ids += _infer(dev, 20)
        server.script = [503, 503]
        server.start()
        wait_for(lambda: sorted(server.ids()) == sorted(ids), 60, "every capture once the server is back")
        assert len(server.ids()) == 40
        assert [s for s, _ in server.answers][:2] == [503, 503]
        assert "capture_batches_refused" not in dev.agent.metrics
    finally:
        _stop(loop_thread, dev)


def test_a_refused_batch_is_dropped_and_counted_and_the_rest_go_on(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    refused: list[str] = []

    def refuse_first(doc: dict[str, Any]) -> str | None:
        if not refused or refused[0] == doc["batch_id"]:
            refused.append(doc["batch_id"])
            return "unknown_model"
        return None

    server.refuse = refuse_first
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"))
    try:
        dev.serve(bundle, capture=_policy(server))
        first = _infer(dev, 10)
        wait_for(lambda: dev.agent.metrics.get("capture_batches_refused") == 1, 20, "the refusal")
        later = _infer(dev, 10)
        wait_for(lambda: set(later) <= set(server.ids()), 20, "the later captures")
        assert refused == refused[:1]  # the refused batch was never sent again
        lost = set(first) - set(server.ids())
        assert lost and dev.agent.metrics["capture_items_refused"] == len(lost)
        # the server stores a batch before its 201 reaches the device, which deletes the file then
        wait_for(lambda: _on_disk(tmp_path / dev.id) == [], 10, "the delivered batches deleted")
    finally:
        _stop(loop_thread, dev)


def test_a_full_quota_evicts_the_oldest_and_counts_them(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    server.stop()
    quota = 64 << 10
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"))
    try:
        dev.serve(bundle, capture=_policy(server, quota_bytes=quota))
        ids = _infer_captured(dev, 400)  # ~600 bytes each: four times the quota
        evicted = dev.agent.metrics["capture_evicted"]
        assert evicted > 0
        assert sum(b.capture_evicted for b in dev.batches()) == evicted
        store = dev.agent.capture.store
        assert store.used_bytes() <= quota
        kept = _on_disk(tmp_path / dev.id)
        position = {i: n for n, i in enumerate(ids)}
        gone = [i for i in ids if i not in set(kept)]
        assert len(gone) == evicted and kept == sorted(kept, key=position.__getitem__)
        # The oldest went first, except a batch an upload was trying to send (to the stopped server)
        # when the quota was hit: one in flight is never evicted under its upload, the next is.
        outlived = [position[i] for i in kept if position[i] < position[gone[-1]]]
        if outlived:  # one batch: a run of consecutive inferences
            assert outlived == list(range(outlived[0], outlived[0] + len(outlived)))
        server.start()
        wait_for(lambda: sorted(server.ids()) == sorted(kept), 60, "what was kept, uploaded")
    finally:
        _stop(loop_thread, dev)


def test_without_a_device_certificate_nothing_is_sent_and_nothing_is_lost(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"), identity=False)
    try:
        dev.serve(bundle, capture=_policy(server))
        ids = _infer(dev, 10)
        wait_for(lambda: dev.agent.metrics.get("capture_upload_refused", 0) > 0, 20, "the local refusal")
        assert server.received == 0
        assert sorted(_on_disk(tmp_path / dev.id)) == sorted(ids)
    finally:
        _stop(loop_thread, dev)


def test_uploads_keep_to_the_configured_rate(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    server.stop()  # everything is sealed before the first upload
    rate = 50_000
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"), capture_upload_bytes_per_s=rate)
    try:
        dev.serve(bundle, capture=_policy(server, quota_bytes=128 << 10))  # batches of <= 32 KiB
        ids = _infer_captured(dev, 180)  # ~100 KB
        capture = tmp_path / dev.id / "capture"
        wait_for(lambda: not (capture / JOURNAL).exists(), 10, "the last batch sealed")
        sizes = [f.stat().st_size for f in sorted((capture / "batches").glob("*.json"))]
        assert len(sizes) >= 4 and sum(sizes) <= 128 << 10
        server.start()
        wait_for(lambda: sorted(server.ids()) == sorted(ids), 60, "everything uploaded")
        took = server.answered_at[-1] - server.answered_at[0]
        assert took >= 0.8 * (sum(sizes) - sizes[-1] - sizes[0]) / rate, (took, sizes)
    finally:
        _stop(loop_thread, dev)


def test_a_directive_without_capture_stops_sampling_but_what_is_kept_still_goes(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, server: CaptureServer, bundle: Bundle
) -> None:
    server.stop()
    dev = _device(keydir, tmp_path, loop_thread, unique_id("cap"))
    try:
        dev.serve(bundle, capture=_policy(server))
        ids = _infer(dev, 10)
        wait_for(lambda: dev.agent.metrics.get("captured") == 10, 10, "captured")
        dev.direct(bundle)  # the next directive has no capture policy
        wait_for(lambda: dev.agent.capture.rate == 0.0, 10, "sampling off")
        _infer(dev, 10)
        assert dev.agent.metrics["captured"] == 10
        server.start()
        wait_for(lambda: sorted(server.ids()) == sorted(ids), 60, "the kept captures uploaded")
    finally:
        _stop(loop_thread, dev)


def test_a_real_agent_process_killed_mid_upload_loses_and_repeats_nothing(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    """``kill -9`` of ``python -m device_agent`` while the server holds an upload it has stored, with
    the synthetic workload capturing all along; the restarted process sends what was on disk."""
    dev = unique_id("kill")
    keys = device_mqtt_keys(broker_info, dev)
    ca = x509.load_pem_x509_certificate(Path(keys["mqtt_ca_file"]).read_bytes())
    server = CaptureServer(ca).start()
    server.hold_s = 2.0
    data = tmp_path / dev
    conf = write_agent_toml(tmp_path, keydir, broker_info, dev)
    bundle = make_bundle(tmp_path / "b", keydir.key("release"), seed=4)
    artifacts.add(bundle)
    cmd = [sys.executable, "-m", "device_agent", "--config", str(conf)]
    proc = subprocess.Popen([*cmd, "--workload-hz", "40"], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        directive = sign_directive(
            keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle), capture=_policy(server)
        )
        observer.publish(dev, directive)
        wait_for(lambda: server.stored, 30, "a batch stored while its upload is held open")
        wait_for(lambda: len(_on_disk(data)) > len(server.ids()), 10, "more captured meanwhile")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
    at_kill = set(_on_disk(data)) | set(server.ids())
    assert server.answers == [] and set(server.ids()) <= set(_on_disk(data))
    server.hold_s = 0.0
    proc = subprocess.Popen([*cmd, "--workload-hz", "0"], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not _on_disk(data) and at_kill <= set(server.ids()), 30, "everything sent again")
        ids = server.ids()
        assert len(ids) == len(set(ids)) == len(at_kill)  # each captured inference exactly once
        assert 200 in [status for status, _ in server.answers]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        server.stop()
