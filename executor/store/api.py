"""Files and batches of `executor serve` (OpenAI's Files and Batch APIs): their rows.

A batch is a row here until its input validates; then it points at the job that runs it
and its state is read from the job's (executor.serve.batches maps the two).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.schema import api_batches, api_files, utcnow


@dataclass(frozen=True)
class ApiFile:
    id: int  # names the bytes on disk; never shown
    public_id: str
    filename: str
    purpose: str
    bytes: int
    created_at: datetime


@dataclass(frozen=True)
class ApiBatch:
    id: int
    public_id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    job_id: int | None
    state: str  # validating, failed, submitted, cancelling
    errors: list[dict[str, Any]] | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: datetime
    failed_at: datetime | None
    cancelling_at: datetime | None
    finalizing_at: datetime | None


def new_id(prefix: str) -> str:
    """An opaque id (`file-…`, `batch_…`): random, so nothing can be guessed from it."""
    return prefix + secrets.token_hex(12)


def reserve_file(db: Database, *, filename: str, purpose: str) -> ApiFile:
    """A row for an upload about to be written (bytes 0 until `finish_file`)."""
    now = utcnow()
    public_id = new_id("file-")
    with db.write() as conn:
        row_id = conn.execute(
            sa.insert(api_files)
            .values(
                public_id=public_id, filename=filename, purpose=purpose, bytes=-1, created_at=now
            )
            .returning(api_files.c.id)
        ).scalar_one()
    return ApiFile(row_id, public_id, filename, purpose, -1, now)


def finish_file(db: Database, row_id: int, size: int) -> None:
    with db.write() as conn:
        conn.execute(sa.update(api_files).where(api_files.c.id == row_id).values(bytes=size))


def drop_file(db: Database, row_id: int) -> None:
    """Forget a file whose upload did not complete."""
    with db.write() as conn:
        conn.execute(sa.delete(api_files).where(api_files.c.id == row_id))


def get_file(db: Database, public_id: str) -> ApiFile | None:
    with db.read() as conn:
        row = conn.execute(
            sa.select(api_files).where(
                api_files.c.public_id == public_id, ~api_files.c.deleted, api_files.c.bytes >= 0
            )
        ).first()
    return _file(row) if row else None


def list_files(
    db: Database, *, purpose: str | None, limit: int, after: str | None, newest_first: bool
) -> list[ApiFile]:
    query = sa.select(api_files).where(~api_files.c.deleted, api_files.c.bytes >= 0)
    if purpose:
        query = query.where(api_files.c.purpose == purpose)
    with db.read() as conn:
        rows = _page(conn, query, api_files, after, limit, newest_first)
    return [_file(r) for r in rows]


def delete_file(db: Database, public_id: str) -> ApiFile | None:
    """Mark a file deleted; the caller removes its bytes. None if there was none."""
    with db.write() as conn:
        row = conn.execute(
            sa.update(api_files)
            .where(api_files.c.public_id == public_id, ~api_files.c.deleted)
            .values(deleted=True)
            .returning(*api_files.c)
        ).first()
    return _file(row) if row else None


def create_batch(
    db: Database,
    *,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
) -> ApiBatch:
    with db.write() as conn:
        row = conn.execute(
            sa.insert(api_batches)
            .values(
                public_id=new_id("batch_"),
                input_file_id=input_file_id,
                endpoint=endpoint,
                completion_window=completion_window,
                metadata=metadata,
                state="validating",
                created_at=utcnow(),
            )
            .returning(*api_batches.c)
        ).one()
    return _batch(row)


def get_batch(db: Database, public_id: str) -> ApiBatch | None:
    with db.read() as conn:
        row = conn.execute(sa.select(api_batches).where(api_batches.c.public_id == public_id))
        found = row.first()
    return _batch(found) if found else None


def list_batches(db: Database, *, limit: int, after: str | None) -> list[ApiBatch]:
    """Newest first, as OpenAI lists them; `after`: the last id of the previous page."""
    with db.read() as conn:
        rows = _page(conn, sa.select(api_batches), api_batches, after, limit, newest_first=True)
    return [_batch(r) for r in rows]


def batches_in_state(db: Database, *states: str) -> list[ApiBatch]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(api_batches).where(api_batches.c.state.in_(states)).order_by(api_batches.c.id)
        ).all()
    return [_batch(r) for r in rows]


def batches_to_finalize(db: Database, finished_job_ids: list[int]) -> list[ApiBatch]:
    """Batches whose job has finished and whose output file is not written yet."""
    if not finished_job_ids:
        return []
    with db.read() as conn:
        rows = conn.execute(
            sa.select(api_batches).where(
                api_batches.c.job_id.in_(finished_job_ids),
                api_batches.c.finalizing_at.is_(None),
            )
        ).all()
    return [_batch(r) for r in rows]


def update_batch(
    db: Database, row_id: int, *, only_state: str | None = None, **values: Any
) -> bool:
    """Set columns of a batch; with `only_state`, only if it is still in that state (two
    requests racing to cancel change it once). True if a row changed."""
    query = sa.update(api_batches).where(api_batches.c.id == row_id)
    if only_state is not None:
        query = query.where(api_batches.c.state == only_state)
    with db.write() as conn:
        return conn.execute(query.values(**values)).rowcount > 0


def _page(
    conn: sa.Connection,
    query: sa.Select[Any],
    table: sa.Table,
    after: str | None,
    limit: int,
    newest_first: bool,
) -> list[sa.Row[Any]]:
    """One page of a cursor list: the rows past `after` (a public id) in id order."""
    if after:
        anchor = conn.execute(sa.select(table.c.id).where(table.c.public_id == after)).scalar()
        if anchor is not None:
            query = query.where(table.c.id < anchor if newest_first else table.c.id > anchor)
    order = table.c.id.desc() if newest_first else table.c.id.asc()
    return list(conn.execute(query.order_by(order).limit(limit)).all())


def _file(row: sa.Row[Any]) -> ApiFile:
    m = row._mapping
    return ApiFile(
        m["id"], m["public_id"], m["filename"], m["purpose"], m["bytes"], m["created_at"]
    )


def _batch(row: sa.Row[Any]) -> ApiBatch:
    return ApiBatch(**dict(row._mapping))


def rename_file(db: Database, row_id: int, filename: str) -> None:
    with db.write() as conn:
        conn.execute(sa.update(api_files).where(api_files.c.id == row_id).values(filename=filename))
