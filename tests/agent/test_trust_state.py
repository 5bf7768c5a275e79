"""The trust state file is written when the state moved, and only then."""

from __future__ import annotations

import json
from pathlib import Path

from device_agent.trust_state import TrustStore
from signing.keyring import KeyDir


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
