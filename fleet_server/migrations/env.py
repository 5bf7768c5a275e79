"""Alembic environment: the URL comes from ``ServerSettings`` (or a connection handed in by the server).

The server runs ``upgrade head`` itself at startup (``fleet_server.migrate``),
passing its own connection in ``config.attributes["connection"]``; the
``alembic`` command line works too (``alembic -c fleet_server/migrations/alembic.ini
upgrade head``) and reads ``EDGEFLEET_DATABASE_URL`` / ``EDGEFLEET_DATA_DIR``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlmodel import SQLModel

from fleet_server import models  # noqa: F401 - registers the tables
from fleet_server.settings import ServerSettings

config = context.config
target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER on SQLite needs table copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or ServerSettings().resolved_database_url()
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or ServerSettings().resolved_database_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
