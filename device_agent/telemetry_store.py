"""Store-and-forward queue of encoded telemetry batches in SQLite on the device's disk.

Batches are written here the moment a window closes and deleted only after
the broker acknowledged them (QoS 1 PUBACK), so a power cut or a long outage
loses nothing that fits. The queue has a size cap in bytes: when a new batch
does not fit, the OLDEST batches go first (recent data is worth more to the
rollout gates), and how many were dropped travels in the next batch's
``dropped_batches`` so the loss itself is reported. A dropped batch that
carried such a count passes its count on, so the total stays exact.

A full disk is the same loss by other means: a batch SQLite cannot write
(``SQLITE_FULL``, or an I/O error writing the journal) is dropped and counted in
memory, and that count rides on the first batch that can be written again, so
the agent never crashes on it and the server still learns how much it missed.
(Until then ``dropped_total`` includes it; a restart before that forgets it.)
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
_SQLITE_FULL, _SQLITE_IOERR = 13, 10


def _store_unwritable(exc: sqlite3.Error) -> bool:
    """SQLite could not write: the disk (or its quota) is full, or the write itself failed."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR)
    return "full" in str(exc) or "disk I/O" in str(exc)


SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL UNIQUE,
    dropped INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class BatchStore:
    """A bounded FIFO of (batch_id, payload) rows; thread-safe (one connection, one lock)."""

    def __init__(self, path: Path | str, max_bytes: int = 8 << 20) -> None:
        if max_bytes <= 0:
            raise ValueError("telemetry queue cap must be > 0 bytes")
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._unsaved_dropped = 0  # batches lost because the disk was full; not yet in ``meta``
        # set by close(): what dropped_total, len() and size_bytes answer afterwards (a stopped
        # agent's figures stay readable; nothing writes to the queue once it is closed)
        self._final_dropped: int | None = None
        self._final_count = 0
        self._final_size = 0
        # ``meta.pending_dropped`` as last committed through this connection (None: read it). It is
        # 0 after almost every put, and only this store writes the file (one connection, under the
        # lock), so a put reads and rewrites it only when it is, or is about to become, non-zero.
        self._pending_saved: int | None = None
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        self._db.executescript(SCHEMA)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def pending_dropped(self) -> int:
        """Drops not yet carried by any queued batch."""
        with self._lock:
            return self._meta("pending_dropped") + self._unsaved_dropped

    @property
    def dropped_total(self) -> int:
        with self._lock:
            if self._final_dropped is not None:  # closed (agent stopped or aborted): last known
                return self._final_dropped
            return self._meta("dropped_total") + self._unsaved_dropped

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back by itself (SQLITE_FULL)
            self._db.execute("ROLLBACK")

    def put(self, batch_id: str, encode: Callable[[int], bytes]) -> int:
        """Queue the batch ``encode(dropped)`` builds, evicting the oldest to fit; return drops now.

        ``encode`` is called with the number of dropped batches the new batch must
        report (it may be called again if evictions change that number).
        """
        with self._lock:
            try:
                return self._put(batch_id, encode)
            except sqlite3.Error as exc:
                if not _store_unwritable(exc):
                    raise
                self._rollback()
                self._unsaved_dropped += 1
                log.warning(
                    "telemetry queue %s not writable (%s): batch dropped (%d so far)",
                    self.path,
                    exc,
                    self._unsaved_dropped,
                )
                return 1

    def _put(self, batch_id: str, encode: Callable[[int], bytes]) -> int:
        """One transaction; the caller holds the lock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            unsaved = self._unsaved_dropped
            saved = self._pending_saved
            if saved is None:
                saved = self._meta("pending_dropped")
            pending = saved + unsaved
            total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]
            evicted = 0
            while True:
                payload = encode(pending)
                if total + len(payload) <= self.max_bytes:
                    break
                row = self._db.execute("SELECT id, dropped, size FROM batches ORDER BY id LIMIT 1").fetchone()
                if row is None:  # the new batch alone exceeds the cap: it is the one dropped
                    self._set_meta("pending_dropped", pending + 1)
                    self._set_meta("dropped_total", self._meta("dropped_total") + unsaved + evicted + 1)
                    self._db.execute("COMMIT")
                    self._pending_saved = pending + 1
                    self._unsaved_dropped -= unsaved
                    return evicted + 1
                self._db.execute("DELETE FROM batches WHERE id = ?", (row[0],))
                pending += 1 + int(row[1])
                total -= int(row[2])
                evicted += 1
            self._db.execute(
                "INSERT INTO batches (batch_id, dropped, size, payload) VALUES (?, ?, ?, ?)",
                (batch_id, pending, len(payload), payload),
            )
            if saved:
                self._set_meta("pending_dropped", 0)
            if evicted or unsaved:
                self._set_meta("dropped_total", self._meta("dropped_total") + evicted + unsaved)
            self._db.execute("COMMIT")
            self._pending_saved = 0
            self._unsaved_dropped -= unsaved
        except BaseException:
            self._pending_saved = None  # rolled back, or not: read it again
            self._rollback()
            raise
        return evicted

    def oldest(self, limit: int = 20) -> list[tuple[int, str, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, batch_id, payload FROM batches ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def delete(self, row_id: int) -> bool:
        """Forget a batch the broker acknowledged; False if the disk is too full to (it is sent
        again later, and the server dedupes it on ``batch_id``)."""
        return self.delete_many([row_id]) is not None

    def delete_many(self, row_ids: list[int]) -> int | None:
        """:meth:`delete` for several acknowledged batches in one statement (one WAL commit
        instead of one per batch). Returns how many were still queued (a batch sent twice is
        forgotten once), None if the disk is too full to forget them."""
        gone = 0
        with self._lock:
            try:
                for i in range(0, len(row_ids), 500):  # below SQLite's limit on parameters
                    chunk = row_ids[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    gone += self._db.execute(f"DELETE FROM batches WHERE id IN ({marks})", chunk).rowcount
            except sqlite3.Error as exc:
                if not _store_unwritable(exc):
                    raise
                self._rollback()
                return None
        return gone

    def __len__(self) -> int:
        with self._lock:
            if self._final_dropped is not None:
                return self._final_count
            return int(self._db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])

    @property
    def size_bytes(self) -> int:
        with self._lock:
            if self._final_dropped is not None:
                return self._final_size
            return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0])

    def close(self) -> None:
        """Close the database (idempotent); the counts stay readable at their last values."""
        with self._lock:
            if self._final_dropped is not None:
                return
            self._final_dropped = self._unsaved_dropped
            with contextlib.suppress(sqlite3.Error):
                self._final_dropped += self._meta("dropped_total")
                count, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM batches"
                ).fetchone()
                self._final_count, self._final_size = int(count), int(size)
            self._db.close()
