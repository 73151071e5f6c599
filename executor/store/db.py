"""Opening the database: engine factory with SQLite pragmas, write transactions, migrations.

Every SQLAlchemy error that leaves this package becomes a DatabaseError in one line, without
SQL text or parameters (they can hold prompts) and with passwords masked.
"""

from __future__ import annotations

import errno
import logging
import os
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from executor.errors import (
    DatabaseError,
    DatabaseGone,
    DiskError,
    ExecutorError,
    NoDatabaseError,
    UsageError,
)
from executor.paths import PRIVATE_FILE, private_dir
from executor.redact import mask_url, redact

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK = 720_001  # PostgreSQL advisory lock key held while migrating
# The newest migration (tests/test_store.py checks it is Alembic's head): a database already
# there opens without importing Alembic, a tenth of a second off every command.
HEAD_REVISION = "0009"


class Database:
    """A SQLAlchemy engine plus the two ways to use it: `read()` and `write()` transactions."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = _checked_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        path = self.sqlite_path
        if path is not None and not path.exists():
            if not create:
                raise NoDatabaseError(
                    f"no database at {path}",
                    hint="check --db / EXECUTOR_DB; `executor submit` creates one",
                )
            _create_private(path)
        # The file this database is (device, inode): a path that later names another file,
        # or none, means everything written from then on would be lost (check_file).
        self._identity = _identity(path) if path is not None else None
        self.gone: str | None = None
        self.engine = _create_engine(self.url)

    def check_file(self) -> None:
        """DatabaseGone if the SQLite file this was opened on is no longer at its path (it
        was deleted, or another file was moved there): nothing may be written after."""
        path = self.sqlite_path
        if self._identity is None or path is None or self.gone:
            return
        try:
            now = _identity(path)
        except FileNotFoundError:
            now = None
        if now == self._identity:
            return
        what = "was deleted" if now is None else "was replaced by another file"
        self.gone = f"the database {path} {what} while this process used it"
        raise DatabaseGone(
            self.gone,
            hint="everything since is lost with the old file; put the database back and run "
            "again (the work it holds resumes where it stopped)",
        )

    @property
    def display_url(self) -> str:
        """The URL with its password masked, for messages."""
        return redact(self.url.render_as_string(hide_password=True))

    @property
    def sqlite_path(self) -> Path | None:
        """The database file, for SQLite databases on disk."""
        if not self.is_sqlite or self.url.database in (None, "", ":memory:"):
            return None
        name = self.url.database
        if self.url.query.get("uri") == "true" and name.startswith("file:"):
            # A SQLite URI filename (file:PATH?mode=ro): the file is PATH, not "file:PATH".
            name = urllib.parse.unquote(urllib.parse.urlsplit(name).path)
            if not name or name == ":memory:":
                return None
        return Path(name)

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only transaction (deferred on SQLite: takes no write lock)."""
        with self.errors(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def errors(self) -> Iterator[None]:
        """SQLAlchemy's errors as one-line DatabaseErrors (no SQL, no parameters)."""
        if self.gone:
            raise DatabaseGone(self.gone)
        try:
            yield
        except sa.exc.SQLAlchemyError as exc:
            raise database_error(exc, self) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise _disk_full(self.display_url, exc.strerror or str(exc)) from None
            raise

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A write transaction; on SQLite `BEGIN IMMEDIATE`, so it waits for the lock up front.

        A deferred transaction that reads and then writes can fail with SQLITE_BUSY at the write
        despite busy_timeout; taking the lock at BEGIN makes the timeout apply.
        """
        with self.errors(), self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                yield conn

    def upgrade(self) -> None:
        """Apply Alembic migrations up to head (a no-op when already there)."""
        from alembic import command

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
        with self.errors(), self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
            return rows[0][0] if rows else None

    def dispose(self) -> None:
        self.engine.dispose()


def migrations_dir() -> Path:
    """Where the Alembic scripts are, in a source checkout and in an installed wheel alike."""
    return Path(str(resources.files("executor.store.migrations")))


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our scripts, without needing an alembic.ini on disk."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision the code knows, as Alembic reads it from the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def revisions(url: str) -> tuple[str | None, str]:
    """(the database's schema revision, the newest the code knows), without migrating."""
    db = Database(url, create=False)
    try:
        return db.revision(), head_revision()
    finally:
        db.dispose()


def open_database(url: str, *, upgrade: bool = True, create: bool = True) -> Database:
    """Open the database at `url` (creating a SQLite file if `create`) and bring its schema
    to head. DatabaseError (exit 7) in one line when it cannot: unreachable, not a database,
    read-only, full, or from a newer executor."""
    from_alembic: tuple[type[Exception], ...] = ()
    db = Database(url, create=create)
    try:
        if upgrade and (current := db.revision()) != HEAD_REVISION:
            from alembic.util import CommandError

            from_alembic = (CommandError,)
            if current is not None and current not in _known_revisions():
                raise DatabaseError(
                    f"{db.display_url} is at schema revision {current}, which this executor "
                    f"does not know (it knows up to {head_revision()})",
                    hint="it was written by a newer executor: upgrade executor",
                )
            db.upgrade()
    except sa.exc.SQLAlchemyError as exc:
        raise database_error(exc, db) from None
    except from_alembic as exc:
        raise DatabaseError(f"{db.display_url}: cannot migrate: {exc}") from None
    return db


def _identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _disk_full(where: str, detail: str) -> DiskError:
    return DiskError(
        f"{where}: cannot write ({detail}): the disk is full, or a file size limit "
        "(ulimit -f) was reached",
        hint="free some space (or raise the limit) and run again; nothing was lost",
    )


def database_error(exc: Exception, db: Database | None = None) -> ExecutorError:
    """One line for a SQLAlchemy error: what went wrong, where, and what to do. A full disk
    is exit 10 like every full disk; everything else about the database is exit 7."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
    where = db.display_url if db is not None else "the database"
    lower = text.lower()
    if "readonly" in lower or "read-only" in lower:
        return DatabaseError(
            f"{where} is read-only ({text})",
            hint="give this user write access to the file and its folder",
        )
    if "disk is full" in lower or "no space" in lower or "disk i/o error" in lower:
        return _disk_full(where, text)
    if "not a database" in lower or "malformed" in lower:
        return DatabaseError(
            f"{where} is not a SQLite database, or it is damaged ({text})",
            hint="point --db / EXECUTOR_DB at the right file",
        )
    if "unable to open" in lower:
        return DatabaseError(
            f"cannot open {where} ({text})", hint="check the path and its permissions"
        )
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return DatabaseError(f"cannot reach {where}: {redact(text)}")
    return DatabaseError(f"{where}: {type(orig).__name__}: {redact(text)}")


def _checked_url(url: str) -> sa.URL:
    """A SQLite file or a PostgreSQL server; anything else is a usage error."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        if "://" in url and "@" in url.split("://", 1)[1]:
            raise _unreadable(url) from None
        raise UsageError(
            f"not a database: {redact(url)!r}",
            hint="give a file path (SQLite) or postgresql+psycopg://user@host/name",
        ) from None
    host = parsed.host or ""
    if "@" in host or (host and "@" in (parsed.database or "")):
        # An @ in the password, with a / after it or not: what reads as the host or the
        # database is the password's tail and the real host.
        raise _unreadable(url)
    try:
        host.encode("idna")
    except UnicodeError:
        raise UsageError(
            f"the database URL {mask_url(url)!r} names a host that cannot be one",
            hint="check the host name (after the last @), and percent-encode the password",
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise UsageError(
            f"unsupported database {redact(url)!r}: executor works with SQLite (a path) or "
            "PostgreSQL (postgresql+psycopg://…)"
        )
    database = parsed.database or ""
    if backend == "sqlite" and (
        database in ("", ":memory:")
        or Path(database).name == ":memory:"  # EXECUTOR_DB=:memory: is a path to SQLite
        or parsed.query.get("mode") == "memory"
        or "mode=memory" in database
    ):
        raise UsageError(
            "an in-memory SQLite database lives only as long as one command: queued jobs "
            "would vanish",
            hint="give a file path (the default is $XDG_DATA_HOME/executor/executor.db)",
        )
    if (
        backend == "sqlite"
        and Path(database).name.startswith("file:")
        and (parsed.query.get("uri") != "true")
    ):
        raise UsageError(
            f"{redact(url)!r} is a SQLite URI name given as a path: it would create a file "
            "named like it",
            hint="give a plain file path (e.g. ~/jobs/executor.db), or write the URI out: "
            "sqlite:///file:PATH?mode=ro&uri=true",
        )
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver we ship
    return parsed


def _unreadable(url: str) -> UsageError:
    return UsageError(
        f"the database URL {mask_url(url)!r} cannot be read (its password or user "
        "name holds a character that ends a URL part: @ : / ? # or %)",
        hint="percent-encode them in the URL: @ → %40, : → %3A, / → %2F, ? → %3F, "
        "# → %23, % → %25, a space → %20 (python3 -c 'import urllib.parse, sys; "
        'print(urllib.parse.quote(sys.argv[1], safe=""))\' PASSWORD)',
    )


def _create_private(path: Path) -> None:
    """The database file, created readable by this user only (its WAL and SHM files take
    the same mode), in a folder only this user can enter when it is ours to create."""
    try:
        private_dir(path.parent)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE)
        os.fchmod(fd, PRIVATE_FILE)
        os.close(fd)
    except OSError as exc:
        raise DatabaseError(
            f"cannot create the database {path} ({exc.strerror or exc})",
            hint="check the folder's permissions and free space",
        ) from None


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return {rev.revision for rev in script.walk_revisions()}


def _create_engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
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
