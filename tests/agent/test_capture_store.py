"""The capture store on a real disk: batches sealed by size and model, a quota kept by evicting the
oldest, a crash's journal recovered without a torn line and without an item twice, the policy kept."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from device_agent.capture import QUEUE, Capturer, encode_item
from device_agent.capture_store import BODY_OVERHEAD, JOURNAL, CaptureStore, PolicyState
from device_agent.capture_upload import Outcome, batch_url, outcome
from device_agent.ids import IdMinter, format_id, parse_id
from device_agent.metrics import Metrics
from device_agent.telemetry import Telemetry
from device_agent.telemetry_store import BatchStore
from device_agent.wire import Capture

SHA_A, SHA_B = "a" * 64, "b" * 64


def _store(root: Path, quota: int = 1 << 20) -> CaptureStore:
    mint = IdMinter()
    store = CaptureStore(root, "cam-1", lambda: format_id(mint()))
    store.set_quota(quota)
    return store


def _line(mint: IdMinter, size: int = 64) -> tuple[str, bytes]:
    id128 = mint()
    x = np.arange(size, dtype=np.float32)[None, :]
    return format_id(id128), encode_item(id128, "input", x, [x[:, :10]], "both")


def _bodies(store: CaptureStore) -> list[dict[str, object]]:
    return [json.loads((store.batches / p.name).read_bytes()) for p in store.pending()]


def _ids(store: CaptureStore) -> list[str]:
    return [str(i["inference_id"]) for b in _bodies(store) for i in b["items"]]  # type: ignore[attr-defined]


def test_items_are_sealed_into_bodies_that_fit_and_keep_their_order(tmp_path: Path) -> None:
    store = _store(tmp_path, quota=1 << 30)  # a batch may hold up to the contract's 1 MiB
    mint = IdMinter()
    ids = []
    for _ in range(3000):
        iid, line = _line(mint)
        ids.append(iid)
        assert store.append(SHA_A, line).stored
    store.seal()
    bodies = _bodies(store)
    assert len(bodies) > 1
    for p, b in zip(store.pending(), bodies, strict=True):
        raw = (store.batches / p.name).read_bytes()
        assert len(raw) <= store.max_batch_bytes() <= 1 << 20
        assert b["device_id"] == "cam-1" and b["model_sha256"] == SHA_A and b["batch_id"] == p.batch_id
        assert parse_id(p.batch_id) is not None and len(b["items"]) == p.items  # type: ignore[arg-type]
    assert _ids(store) == ids  # every item once, oldest batch first
    item = bodies[0]["items"][0]  # type: ignore[index]
    got = np.frombuffer(base64.b64decode(item["inputs"]["input"]["data"]), np.float32)
    assert item["inputs"]["input"]["shape"] == [1, 64] and (got == np.arange(64)).all()
    assert item["ts"].endswith("Z") and len(item["outputs"]) == 1


def test_a_new_model_starts_a_new_batch(tmp_path: Path) -> None:
    store = _store(tmp_path)
    mint = IdMinter()
    assert not store.append(SHA_A, _line(mint)[1]).sealed
    assert store.append(SHA_B, _line(mint)[1]).sealed
    store.seal()
    assert [b["model_sha256"] for b in _bodies(store)] == [SHA_A, SHA_B]


def test_the_quota_evicts_the_oldest_batches_and_counts_their_items(tmp_path: Path) -> None:
    quota = 64 << 10
    store = _store(tmp_path, quota=quota)
    mint = IdMinter()
    evicted, kept_order = 0, []
    for _ in range(1000):
        iid, line = _line(mint)
        kept_order.append(iid)
        done = store.append(SHA_A, line)
        assert done.stored
        evicted += done.evicted
        assert store.used_bytes() <= quota
    store.seal()
    on_disk = _ids(store)
    assert evicted > 0 and len(on_disk) + evicted == 1000
    assert on_disk == kept_order[evicted:]  # what went is exactly the oldest
    assert sum(f.stat().st_size for f in store.batches.iterdir()) <= quota


def test_the_batch_being_uploaded_is_never_evicted(tmp_path: Path) -> None:
    store = _store(tmp_path, quota=64 << 10)
    mint = IdMinter()
    while len(store.pending()) < 2:
        store.append(SHA_A, _line(mint)[1])
    oldest = store.pending()[0]
    assert store.read(oldest) is not None  # in flight now
    for _ in range(1000):
        store.append(SHA_A, _line(mint)[1])
    assert store.pending()[0] == oldest
    store.done(oldest)
    assert oldest not in store.pending() and not (store.batches / oldest.name).exists()


def test_an_item_larger_than_a_batch_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path, quota=64 << 10)
    mint = IdMinter()
    assert not store.append(SHA_A, _line(mint, size=8192)[1]).stored
    assert store.append(SHA_A, b"x" * (store.max_batch_bytes() - BODY_OVERHEAD - 1)).stored
    assert store.pending() == []


def test_a_crashed_agents_journal_is_sealed_once_without_its_torn_line(tmp_path: Path) -> None:
    store = _store(tmp_path)
    mint = IdMinter()
    ids = []
    for _ in range(5):
        iid, line = _line(mint)
        ids.append(iid)
        store.append(SHA_A, line)
    store.flush()
    # The process dies here (no seal, no close); a power cut tore the last write in half.
    with open(tmp_path / JOURNAL, "ab") as fh:
        fh.write(_line(mint)[1][:40])
    again = _store(tmp_path)
    assert again.recovered == 5 and not (tmp_path / JOURNAL).exists()
    assert _ids(again) == ids
    assert _store(tmp_path).recovered == 0 and _ids(_store(tmp_path)) == ids


def test_a_journal_whose_batch_was_sealed_already_is_not_sealed_twice(tmp_path: Path) -> None:
    """A crash between writing the batch file and deleting the journal."""
    store = _store(tmp_path)
    mint = IdMinter()
    for _ in range(3):
        store.append(SHA_A, _line(mint)[1])
    store.flush()
    journal = (tmp_path / JOURNAL).read_bytes()
    store.seal()
    (tmp_path / JOURNAL).write_bytes(journal)  # as if its deletion never happened
    again = _store(tmp_path)
    assert len(again.pending()) == 1 and len(_ids(again)) == 3
    assert not (tmp_path / JOURNAL).exists()


def test_the_policy_survives_a_restart_and_a_damaged_file_is_no_policy(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.load_policy() == PolicyState()
    policy = Capture("http://fleet/api/v1/captures", sample_rate=0.5, keep="inputs", quota_bytes=1 << 20)
    store.save_policy(PolicyState(policy, policy.upload_url))
    assert _store(tmp_path).load_policy() == PolicyState(policy, policy.upload_url)
    (tmp_path / "policy.json").write_text('{"capture": {"upload_url": 3}}')
    assert _store(tmp_path).load_policy() == PolicyState()


def test_offering_never_blocks_a_full_queue_skips(tmp_path: Path) -> None:
    store = _store(tmp_path / "c")
    telemetry = Telemetry("cam-1", BatchStore(tmp_path / "t.db"))
    capturer = Capturer(store, telemetry, Metrics())  # no policy: no writer thread drains the queue
    x = np.zeros((1, 4), np.float32)
    mint = IdMinter()
    assert all(capturer.offer(mint(), SHA_A, "input", x, [x]) for _ in range(QUEUE))
    assert not capturer.offer(mint(), SHA_A, "input", x, [x])


def test_what_an_answer_to_an_upload_means() -> None:
    assert [outcome(s) for s in (200, 201)] == [Outcome.DELIVERED] * 2
    refused = (400, 401, 403, 404, 409, 413, 422)
    assert [outcome(s) for s in refused] == [Outcome.REFUSED] * len(refused)
    retried = (None, 408, 429, 500, 502, 503, 504)
    assert [outcome(s) for s in retried] == [Outcome.RETRY] * len(retried)
    assert batch_url("http://h/api/v1/captures/", "cam-1", "b") == "http://h/api/v1/captures/cam-1/b"
