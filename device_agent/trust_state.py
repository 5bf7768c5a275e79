"""The device's trust state: the newest verified TUF root, the last directive seq, the floors.

Kept in ``<data_dir>/trust/state.json``, outside the model slots, and replaced
atomically (temp, fsync, rename, fsync dir), so a power cut leaves the old or
the new state, never a mix. The root only moves forward along a verified chain
(python-tuf walks it); floors only rise; the seq only rises. The provisioned
root (``AgentConfig.tuf_root_path``) is the anchor the first time, and stays
the fallback should this file be lost: a device can always re-walk the chain.

Shared between threads: the event loop persists each accepted seq while worker threads check
releases and walk the root chain. ``advance`` is serialized (one file, one temporary name), and
``cache_lock`` is held by whoever opens python-tuf on ``cache_dir`` (see ``device_agent.delivery``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.slots import atomic_write
from signing.agreement import merge_floors
from signing.keys import PublicKey
from signing.tuf_release import fleet_keys_of, release_keys_of, root_version

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class TrustState:
    root: bytes
    last_seq: int = 0
    floors: dict[str, int] = field(default_factory=dict)
    repository_url: str = ""  # the last repository a verified directive pointed at

    @property
    def root_version(self) -> int:
        return root_version(self.root)


class TrustStore:
    """Load, advance and persist the trust state; derive the fleet and release keys from the root."""

    def __init__(self, directory: Path, provisioned_root: bytes) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / STATE_FILE
        self.cache_dir = self.directory / "tuf-cache"
        # python-tuf's Updater is one per metadata directory: opening one replaces the directory's
        # root.json link (remove, then symlink), so a second opened meanwhile fails ("File exists").
        # Held across a whole check or root walk, in the worker thread that runs it.
        self.cache_lock = threading.Lock()
        self._lock = threading.RLock()  # the state and its file: advance() from any thread
        self._written: tuple[object, ...] | None = None  # what the file holds, as last read or written
        self.state = self._load(provisioned_root)
        self._keys_for = b""
        self._fleet: dict[str, PublicKey] = {}
        self._release: dict[str, PublicKey] = {}

    def _load(self, provisioned: bytes) -> TrustState:
        base = TrustState(root=provisioned)
        if not self.path.exists():
            return base
        try:
            data = json.loads(self.path.read_text())
            stored = TrustState(
                root=str(data["root"]).encode(),
                last_seq=int(data.get("last_seq", 0)),
                floors={str(k): int(v) for k, v in dict(data.get("floors") or {}).items()},
                repository_url=str(data.get("repository_url", "")),
            )
            if stored.root_version < base.root_version:  # reprovisioned with a newer root
                stored.root = provisioned
            else:
                self._written = _persisted(stored)
            return stored
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("trust state %s unreadable (%s); starting from the provisioned root", self.path, exc)
            return base

    def save(self) -> None:
        with self._lock:
            s = self.state
            body = {
                "root": s.root.decode(),
                "root_version": s.root_version,
                "last_seq": s.last_seq,
                "floors": s.floors,
                "repository_url": s.repository_url,
            }
            atomic_write(self.path, json.dumps(body, indent=1, sort_keys=True).encode())
            self._written = _persisted(s)

    def advance(
        self,
        *,
        root: bytes | None = None,
        floors: Mapping[str, int] | None = None,
        seq: int | None = None,
        repository_url: str | None = None,
    ) -> None:
        """Move forward only (newer root, higher floors, higher seq) and persist once.

        When the file already holds exactly this state (an install of a release whose floors
        and root the device already knows), it is not written again: each write is two
        fsyncs, and this runs once per install.
        """
        with self._lock:
            s = self.state
            if root is not None and root_version(root) > s.root_version:
                s.root = root
            if floors:
                s.floors = merge_floors(s.floors, floors)
            if seq is not None and seq > s.last_seq:
                s.last_seq = seq
            if repository_url:
                s.repository_url = repository_url
            if self._written != _persisted(s):
                self.save()

    def _refresh_keys(self) -> None:
        with self._lock:
            if self._keys_for != self.state.root:
                self._fleet = {k.keyid: k for k in fleet_keys_of(self.state.root)}
                self._release = {k.keyid: k for k in release_keys_of(self.state.root)}
                self._keys_for = self.state.root

    @property
    def fleet_keys(self) -> dict[str, PublicKey]:
        self._refresh_keys()
        return dict(self._fleet)

    @property
    def release_keys(self) -> dict[str, PublicKey]:
        self._refresh_keys()
        return dict(self._release)


def _persisted(s: TrustState) -> tuple[object, ...]:
    """The state as the file holds it, compared by value."""
    return (s.root, tuple(sorted(s.floors.items())), s.last_seq, s.repository_url)


__all__ = ["TrustState", "TrustStore"]
