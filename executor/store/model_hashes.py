"""The cache of model file hashes (path, size, mtime → sha256)."""

from __future__ import annotations

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.schema import model_files, utcnow
from executor.store.upsert import upsert


def cached_sha256(db: Database, path: str, size: int, mtime_ns: int) -> str | None:
    """The sha256 recorded for this exact file version, if any."""
    with db.read() as conn:
        return conn.execute(
            sa.select(model_files.c.sha256).where(
                model_files.c.path == path,
                model_files.c.size == size,
                model_files.c.mtime_ns == mtime_ns,
            )
        ).scalar()


def remember_sha256(db: Database, path: str, size: int, mtime_ns: int, sha256: str) -> None:
    """Record (or replace) the hash of a model file version."""
    with db.write() as conn:
        row = {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": sha256}
        upsert(conn, model_files, {**row, "hashed_at": utcnow()})
