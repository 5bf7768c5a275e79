"""Database engine and sessions for SQLite (default, WAL) and PostgreSQL.

The schema is Alembic's (``fleet_server/migrations``), applied at startup.
SQLite is for one server process; several replicas need PostgreSQL (the
engine's leader lock and row locks are PostgreSQL features).

Each thread (request handler, MQTT ingest worker, engine ticker) opens its own
short-lived ``Session``; only the thread-safe ``Engine`` is shared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, create_engine

from fleet_server import models  # noqa: F401 - registers the tables on SQLModel.metadata
from fleet_server.migrate import upgrade
from fleet_server.settings import ServerSettings

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(settings: ServerSettings, migrate: bool = True) -> Engine:
    """Create the engine and (unless ``migrate`` is False: ingest workers, whose parent
    migrated) bring the schema to the newest Alembic revision."""
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    if migrate:
        until_reachable(lambda: upgrade(engine), settings.startup_retry_seconds)
    return engine


def until_reachable(
    step: Callable[[], None], budget_s: float, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Run ``step``, retrying while the database refuses connections, for up to ``budget_s``.

    A deployment starts the database and the server together; the server waits for it (with
    backoff, one log line per attempt) instead of exiting. Anything but an unreachable database
    (bad credentials are reachable and refused; a failing migration) ends it at once, and so
    does the budget: the last error is raised for the caller to report.
    """
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            step()
            return
        except OperationalError as exc:
            left = deadline - time.monotonic()
            if left <= 0 or not unreachable(exc):
                raise
            wait = min(delay, left)
            log.warning("database not reachable (%s); retrying in %.1fs", first_line(exc), wait)
            sleep(wait)
            delay = min(delay * 2, 5.0)


def unreachable(exc: OperationalError) -> bool:
    """Whether the database could not be reached at all (as opposed to refusing us or failing)."""
    text = str(exc.orig or exc).lower()
    return any(
        s in text
        for s in ("connection refused", "could not connect", "timeout expired", "no route to host",
                  "the database system is starting up", "name or service not known",
                  "failed to resolve host", "temporary failure in name resolution")
    )  # fmt: skip


def first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


ASSIGNMENT_LOCK = 0x6566_6173  # "efas": PostgreSQL advisory lock key of device assignment


def hold_assignment_lock(session: Session) -> None:
    """Hold, until ``session``'s transaction ends, the lock every transaction takes before it
    reads which devices are free and gives some to a rollout or an experiment. A transaction
    that locks rows first takes it before them (``assignment_lock_first``).

    "One active rollout or experiment per device" is a read (who is busy) followed by a write (the
    new rows), and nothing in the schema forbids a device's second row: two such transactions side
    by side (two operators creating rollouts, a creation and the ticker enrolling joiners) would
    each find a device free and both take it. On PostgreSQL this is a transaction advisory lock; on
    SQLite it is the database's write lock, taken at once by a write that changes nothing (the
    driver opens a transaction for it), so the reads after it see every commit before it.
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ASSIGNMENT_LOCK})
    else:
        conn.execute(text("UPDATE rollout SET id = id WHERE 0 = 1"))


def assignment_lock_first(session: Session) -> None:
    """The assignment lock now, for a transaction that locks rows and may then give devices out
    (an experiment's stop or evaluation may promote), where the database also has row locks:
    PostgreSQL. Taken later, a holder of the assignment lock
    could wait for a row whose holder waits for the assignment lock. SQLite has no row locks to
    order against, and its write lock taken this early would stop every other writer (the
    ingest) for the whole transaction: there the assignment takes it when it comes."""
    if session.connection().dialect.name == "postgresql":
        hold_assignment_lock(session)


def new_session(engine: Engine) -> Session:
    # expire_on_commit=False: rows read in a transaction stay usable after it (for responses).
    return Session(engine, expire_on_commit=False)
