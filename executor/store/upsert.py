"""Writing a row keyed by its primary key in one statement, so that two writers at once do not
collide.

"Delete the old row, insert the new one" is correct on SQLite, whose writers take turns, but
on PostgreSQL two transactions at READ COMMITTED both delete nothing and the second insert
fails on the key: four workers that hash the same model file at once, or two CPU workers of
one host that store their decode rates together. INSERT … ON CONFLICT is one atomic step on
both (SQLite ≥ 3.24).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def upsert(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> None:
    """Insert `values`, or replace the other columns of the row with the same primary key."""
    keys = [c.name for c in table.primary_key.columns]
    statement = _insert(conn, table).values(**values)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=keys,
            set_={k: statement.excluded[k] for k in values if k not in keys},
        )
    )


def insert_if_absent(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> bool:
    """Insert `values` unless a row with the same primary key is there; True if inserted."""
    # RETURNING says whether it did: rowcount is -1 (unknown) for this statement on psycopg.
    statement = (
        _insert(conn, table)
        .values(**values)
        .on_conflict_do_nothing()
        .returning(*table.primary_key.columns)
    )
    return conn.execute(statement).first() is not None
