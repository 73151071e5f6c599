"""Alembic environment: runs on the connection the application hands over (or the URL)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from executor.store.schema import metadata

config = context.config


def run_migrations() -> None:
    """Migrate on `config.attributes['connection']` when given (the app), else on the URL."""
    connection = config.attributes.get("connection")
    if connection is None:
        engine = sa.create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
        return
    _run(connection)


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds tables
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
