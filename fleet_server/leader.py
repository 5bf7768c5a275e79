"""Exactly one server replica drives the rollout engine: a PostgreSQL session advisory lock.

The lock is held on one dedicated connection for as long as the replica leads.
When the leader dies, PostgreSQL ends its session and frees the lock, and the
next replica's ``pg_try_advisory_lock`` (tried every tick) succeeds: that is
the whole failover, no lease clock to tune. Every replica keeps serving the API
and ingesting telemetry; only the ticker waits for the lock.

On SQLite there is no such lock: one server process per database is the rule
(docs/rollouts.md), and ``LeaderLock`` always says yes.
"""

from __future__ import annotations

import contextlib
import logging

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

LEADER_LOCK = 0x6566_6C64  # "efld"


class LeaderLock:
    def __init__(self, engine: Engine, key: int = LEADER_LOCK) -> None:
        self.engine = engine
        self.key = key
        self._conn: Connection | None = None
        self.is_leader = engine.dialect.name != "postgresql"

    def acquire(self) -> bool:
        """True while this replica holds the lock; tries to take it when it does not."""
        if self.engine.dialect.name != "postgresql":
            return True
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                self._conn.commit()
                return True
            except SQLAlchemyError:
                log.warning("lost the leader connection; the engine lock is gone")
                self._drop()
        conn: Connection | None = None
        try:
            conn = self.engine.connect()
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            conn.commit()
        except SQLAlchemyError:
            log.exception("could not try the leader lock")
            if conn is not None:
                conn.invalidate()
            return False
        if got:
            self._conn, self.is_leader = conn, True
            log.info("this replica now drives the rollout engine")
            return True
        conn.close()
        return False

    def release(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(SQLAlchemyError):
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.commit()
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.invalidate()  # never hand a lock-holding session back to the pool
            self._conn.close()
        self._conn, self.is_leader = None, False
