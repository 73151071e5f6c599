"""The rule of one worker per GPU: a file lock next to a SQLite database, a session advisory
lock on PostgreSQL."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from executor.errors import DatabaseError, LockedError
from executor.paths import PRIVATE_FILE, private_dir
from executor.store.db import Database


def lock_path(sqlite_path: Path) -> Path:
    """The worker lock of a SQLite database: a file next to it."""
    return sqlite_path.with_name(sqlite_path.name + ".lock")


@contextmanager
def worker_lock(db: Database, identity: str) -> Iterator[None]:
    """Hold the worker lock for the whole run; a second worker gets LockedError at once.

    SQLite: one worker per database file (SQLite is the single-machine store). PostgreSQL:
    one worker per identity (host + GPU), so that many hosts and GPUs share one queue.
    """
    if db.is_sqlite:
        assert db.sqlite_path is not None, "in-memory SQLite databases are refused on open"
        with _file_lock(lock_path(db.sqlite_path)):
            yield
    else:
        with _advisory_lock(db, identity):
            yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock. The kernel drops it when its holder dies, even by SIGKILL, so a
    stale lock file never blocks the next run; the file is left in place (deleting it would
    race with a new holder)."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        os.fchmod(fd, PRIVATE_FILE)  # the umask filters os.open's mode
    except OSError as exc:
        raise DatabaseError(
            f"cannot open the worker lock {path} ({exc.strerror or exc})",
            hint="check the folder's permissions and free space",
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise LockedError(
            f"another executor run is already working on this database ({holder})",
            hint=f"wait for it, or stop it; the lock is {path}",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def _advisory_lock(db: Database, identity: str) -> Iterator[None]:
    """A session-level pg_advisory_lock on a connection kept for the run: PostgreSQL drops
    it when the connection ends, so a killed worker's lock goes with it."""
    key = int(hashlib.sha256(identity.encode()).hexdigest()[:15], 16)
    conn = db.engine.connect()
    try:
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
        conn.commit()
        if not got:
            raise LockedError(
                f"another executor run is already working as {identity} (one worker per GPU "
                "per host)",
                hint="stop it, or give this one another GPU with --gpu",
            )
        yield
    finally:
        conn.close()
