"""The trust state: written when it moved and only then, and safe to share between the event loop
and the worker threads that check releases against the TUF repository."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from device_agent.delivery import refresh_root, verify_release
from device_agent.trust_state import TrustStore
from device_agent.wire import ModelRef
from signing.keyring import KeyDir

from .harness import HW, TufServer, make_bundle


def test_a_check_that_moved_nothing_leaves_the_file_alone_and_any_move_is_written(
    keydir: KeyDir, tmp_path: Path
) -> None:
    store = TrustStore(tmp_path / "trust", keydir.tuf_root())
    store.advance(floors={"tiny": 2}, repository_url="http://mirror")
    inode = store.path.stat().st_ino  # every write replaces the file (temp + rename)

    store.advance(floors={"tiny": 1}, repository_url="http://mirror")  # below the floor: nothing moved
    assert store.path.stat().st_ino == inode

    again = TrustStore(tmp_path / "trust", keydir.tuf_root())  # as after a reboot
    again.advance(floors={"tiny": 2}, repository_url="http://mirror")
    assert store.path.stat().st_ino == inode

    again.advance(seq=7)
    assert store.path.stat().st_ino != inode
    assert json.loads(store.path.read_text())["last_seq"] == 7
    assert TrustStore(tmp_path / "trust", keydir.tuf_root()).state.floors == {"tiny": 2}


def test_a_state_the_file_never_got_is_written_by_the_next_advance(keydir: KeyDir, tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust", keydir.tuf_root())
    store.state.floors = {"tiny": 3}  # moved in memory, the write lost (a full disk raised)
    store.advance(floors={"tiny": 3})
    assert TrustStore(tmp_path / "trust", keydir.tuf_root()).state.floors == {"tiny": 3}


def _at_once(n: int, work: Callable[[int], object]) -> list[BaseException]:
    """Run ``work(i)`` for i < n on n threads released together; what they raised."""
    start, errors = threading.Barrier(n), []

    def run(i: int) -> None:
        start.wait()
        try:
            work(i)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_checks_and_root_walks_at_the_same_time_share_the_cache_safely(
    keydir: KeyDir, tmp_path: Path
) -> None:
    """An install's release check and a root walk (a directive by an unknown key) can run at once,
    each in a worker thread, on the one TUF cache: python-tuf's Updater replaces the cache's
    root.json link when it opens it, so two at once raced ("File exists") and the install failed."""
    tuf = TufServer(tmp_path / "www", keydir)
    try:
        bundle = make_bundle(tmp_path / "bundles", keydir.key("release"))
        tuf.release(bundle)
        store = TrustStore(tmp_path / "trust", keydir.tuf_root())
        ref = ModelRef(
            "tiny", "1", 1, "arm64-cpu", bundle.sha256, bundle.length, f"{tuf.url}/m", f"{tuf.url}/e"
        )

        def check_or_walk(i: int) -> None:
            for _ in range(6):
                if i % 2:
                    assert refresh_root(store, tuf.url) is None
                else:
                    assert verify_release(store, tuf.url, ref, HW).sha256 == bundle.sha256

        assert _at_once(8, check_or_walk) == []
        assert store.state.repository_url == tuf.url
    finally:
        tuf.close()


def test_seqs_accepted_while_a_check_advances_the_state_are_all_kept(keydir: KeyDir, tmp_path: Path) -> None:
    """The event loop persists each accepted seq while a worker thread persists floors: one file,
    written through one temporary name, so each write waits for the one before."""
    store = TrustStore(tmp_path / "trust", keydir.tuf_root())

    def advance(i: int) -> None:
        for k in range(40):
            if i % 2:
                store.advance(floors={f"family-{i}": k + 1})
            else:
                store.advance(seq=i * 100 + k)

    assert _at_once(6, advance) == []
    stored = TrustStore(tmp_path / "trust", keydir.tuf_root()).state
    assert stored.last_seq == 439 and stored.floors == {f"family-{i}": 40 for i in (1, 3, 5)}
