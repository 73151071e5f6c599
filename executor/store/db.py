"""Opening the database: engine factory with SQLite pragmas, write transactions, migrations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from executor.errors import DatabaseError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK = 720_001  # PostgreSQL advisory lock key held while migrating


class Database:
    """A SQLAlchemy engine plus the two ways to use it: `read()` and `write()` transactions."""

    def __init__(self, url: str) -> None:
        self.url = sa.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine = _create_engine(self.url)

    @property
    def display_url(self) -> str:
        """The URL with its password masked, for messages."""
        return self.url.render_as_string(hide_password=True)

    @property
    def sqlite_path(self) -> Path | None:
        """The database file, for SQLite databases on disk."""
        if self.is_sqlite and self.url.database not in (None, "", ":memory:"):
            return Path(self.url.database)
        return None

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only transaction (deferred on SQLite: takes no write lock)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A write transaction; on SQLite `BEGIN IMMEDIATE`, so it waits for the lock up front.

        A deferred transaction that reads and then writes can fail with SQLITE_BUSY at the write
        despite busy_timeout; taking the lock at BEGIN makes the timeout apply.
        """
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                yield conn

    def upgrade(self) -> None:
        """Apply Alembic migrations up to head (a no-op when already there)."""
        cfg = alembic_config(str(self.url))
        with self.engine.connect() as conn:
            if self.is_sqlite:
                # Batch migrations rebuild tables; with foreign keys on, dropping the old table
                # would cascade deletes. The pragma only changes outside a transaction.
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            try:
                conn.execution_options(sqlite_immediate=True)
                with conn.begin():
                    if not self.is_sqlite:
                        # Workers starting together must not migrate at the same time.
                        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
            finally:
                if self.is_sqlite:
                    conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")

    def revision(self) -> str | None:
        """The schema revision the database is at (None for a blank database)."""
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()


def migrations_dir() -> Path:
    """Where the Alembic scripts are, in a source checkout and in an installed wheel alike."""
    return Path(str(resources.files("executor.migrations")))


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our scripts, without needing an alembic.ini on disk."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision the code knows."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def revisions(url: str) -> tuple[str | None, str]:
    """(the database's schema revision, the newest the code knows), without migrating."""
    db = Database(url)
    try:
        return db.revision(), head_revision()
    finally:
        db.dispose()


def open_database(url: str, *, upgrade: bool = True) -> Database:
    """Open (creating if needed) the database at `url` and bring its schema to head."""
    db = Database(url)
    try:
        if upgrade:
            db.upgrade()
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot open database {db.url!r}: {exc.orig}") from None
    return db


def _create_engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        # In WAL mode NORMAL is durable against process crashes (kill -9), which is our model;
        # only an OS crash can roll back the last commits, and those items then simply re-run.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
