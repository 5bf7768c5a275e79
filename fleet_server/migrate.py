"""Bring the database schema to ``alembic upgrade head`` at startup, on SQLite and PostgreSQL.

Several replicas may start at once against one PostgreSQL: the upgrade runs
under a session advisory lock, so one migrates and the others find the schema
at head. A database made by ``create_all`` before migrations existed (tables but no
``alembic_version``) is stamped at the first revision, then upgraded.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

MIGRATIONS = Path(__file__).parent / "migrations"
SKELETON_REVISION = "0001"
MIGRATION_LOCK = 0x6566_6D69  # "efmi": advisory lock key held while migrating


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations on ``engine``'s database (idempotent; safe with concurrent replicas)."""
    cfg = alembic_config()
    with engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
        else:
            # SQLite ALTERs copy tables ("batch" mode); with foreign keys enforced the copy of a
            # referenced table fails. The pragma only works outside a transaction, hence here.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            tables = set(inspect(conn).get_table_names())
            if "device" in tables and "alembic_version" not in tables:
                command.stamp(cfg, SKELETON_REVISION)
                conn.commit()
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            else:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
