"""The server's side of TUF delivery: serve the repository, accept release-signed targets, stay fresh.

The server holds the online fleet key only. Targets metadata (what a release
is: hash, length, hardware ids, release counter; the revocation floors) is
signed by a release key on the release host (``edgefleet models push`` /
``models revoke``) and uploaded; the server checks it against the root's
release role (``signing.tuf_release.verify_targets_update``), installs it, and
signs a new snapshot + timestamp with the fleet key. A keeper thread re-signs
the timestamp (and the snapshot) well before they expire, so a quiet fleet
does not freeze itself out, while a server that stops does (freeze protection).

The repository is ``<data_dir>/tuf`` (consistent snapshots), served read-only
to devices at ``/tuf/metadata/...`` and ``/tuf/targets/...``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from fleet_server.mirror import Publisher
from signing.keyring import KeyDir
from signing.keys import KeyPair
from signing.tuf_release import timestamp_due
from signing.tuf_repo import TufRepository

log = logging.getLogger(__name__)


class TufService:
    """One repository directory, the fleet key that keeps it fresh, and a lock around writes."""

    def __init__(
        self,
        path: Path,
        keys_dir: Path,
        fleet_key: KeyPair,
        *,
        timestamp_expiry: timedelta = timedelta(days=1),
        snapshot_expiry: timedelta = timedelta(days=7),
        publisher: Publisher | None = None,
    ) -> None:
        self.repo = TufRepository.open_served(Path(path), KeyDir(Path(keys_dir)).tuf_root_chain())
        self.publisher = publisher  # static delivery: told after every change, retried by the keeper
        self.fleet_key = fleet_key
        self.timestamp_expiry = timestamp_expiry
        self.snapshot_expiry = snapshot_expiry
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.repo.path

    def targets_bytes(self) -> bytes | None:
        return self.repo.targets_bytes()

    def accept(self, targets: bytes, files: Mapping[str, Path]) -> int:
        """Install release-signed targets metadata (+ target bytes), publish; return the snapshot version."""
        with self.lock:
            self.repo.accept_targets(targets, files)
            version = self._publish()
        self._mirror()
        return version

    def _mirror(self) -> None:
        if self.publisher is not None:
            self.publisher.publish_quietly()

    def _publish(self) -> int:
        return self.repo.publish(
            self.fleet_key, snapshot_expiry=self.snapshot_expiry, timestamp_expiry=self.timestamp_expiry
        )

    def refresh_if_due(self) -> str | None:
        """Re-sign what expires within half its lifetime; return which role was refreshed."""
        with self.lock:
            meta = self.repo.metadata_dir
            if not (meta / "timestamp.json").exists():
                return None  # nothing released yet: nothing to keep fresh
            if timestamp_due((meta / "snapshot.json").read_bytes(), self.snapshot_expiry / 2):
                self._publish()
                return "snapshot"
            if timestamp_due((meta / "timestamp.json").read_bytes(), self.timestamp_expiry / 2):
                self.repo.refresh_timestamp(self.fleet_key, self.timestamp_expiry)
                return "timestamp"
        return None

    def start(self, interval: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(interval,), name="ef-tuf-keeper", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        first = True  # at start, publish to the mirror at once: it may have missed changes while down
        while first or not self._stop.wait(interval):
            first = False
            self.keep_fresh()

    def keep_fresh(self) -> str | None:
        """One round of the keeper: re-sign what is due, then publish to the mirror if anything
        changed or the last publish failed (a mirror is as fresh as its last publish)."""
        try:
            refreshed = self.refresh_if_due()
            if refreshed:
                log.info("re-signed the TUF %s", refreshed)
        except Exception:  # keep trying: a stale timestamp freezes the whole fleet
            log.exception("refreshing the TUF timestamp failed")
            refreshed = None
        if self.publisher is not None and (refreshed or self.publisher.dirty):
            self._mirror()
        return refreshed

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


__all__ = ["TufService"]
