"""Database engine and sessions for SQLite (default, WAL) and PostgreSQL.

The schema is Alembic's (``fleet_server/migrations``), applied at startup.
SQLite is for one server process; several replicas need PostgreSQL (the
engine's leader lock and row locks are PostgreSQL features).

Each thread (request handler, MQTT ingest worker, engine ticker) opens its own
short-lived ``Session``; only the thread-safe ``Engine`` is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlmodel import Session, create_engine

from fleet_server import models  # noqa: F401 - registers the tables on SQLModel.metadata
from fleet_server.migrate import upgrade
from fleet_server.settings import ServerSettings


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
        upgrade(engine)
    return engine


def new_session(engine: Engine) -> Session:
    # expire_on_commit=False: rows read in a transaction stay usable after it (for responses).
    return Session(engine, expire_on_commit=False)
