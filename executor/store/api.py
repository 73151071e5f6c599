"""Files and batches of `executor serve` (OpenAI's Files and Batch APIs): their rows.

A batch is a row here until its input validates; then it points at the job that runs it
and its state is read from the job's (executor.serve.batches maps the two).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
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
    state: str  # validating, failed, submitted, cancelling, cancelled
    errors: list[dict[str, Any]] | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: datetime
    failed_at: datetime | None
    cancelling_at: datetime | None
    finalizing_at: datetime | None
    lease_until: datetime | None  # a server is validating or finalizing it until then


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
    lease_seconds: float,
) -> ApiBatch:
    """A new batch, `validating`, held by its creator for `lease_seconds` (it validates it
    at once; if it dies doing so, another round takes it up once the lease is over)."""
    now = utcnow()
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
                created_at=now,
                lease_until=now + timedelta(seconds=lease_seconds),
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


def batches_in_state(db: Database, *states: str, free: bool = False) -> list[ApiBatch]:
    """Batches in these states, oldest first; `free`: only those no server holds now."""
    query = sa.select(api_batches).where(api_batches.c.state.in_(states))
    if free:
        query = query.where(_free())
    with db.read() as conn:
        rows = conn.execute(query.order_by(api_batches.c.id)).all()
    return [_batch(r) for r in rows]


def batches_to_finalize(db: Database, finished_job_ids: list[int]) -> list[ApiBatch]:
    """Batches whose job has finished, whose output is not written yet, and which no
    server is finalizing now."""
    if not finished_job_ids:
        return []
    with db.read() as conn:
        rows = conn.execute(
            sa.select(api_batches).where(
                api_batches.c.job_id.in_(finished_job_ids),
                api_batches.c.output_file_id.is_(None),
                _free(),
            )
        ).all()
    return [_batch(r) for r in rows]


def take_batch(
    db: Database, row_id: int, *, states: tuple[str, ...], lease_seconds: float, **values: Any
) -> bool:
    """Hold a batch for one step (validating, finalizing) if it is in `states`, its output
    is not written and no server holds it: one conditional update, so of two servers one
    wins. `values` are set with it (finalizing_at, ...). True if this call holds it now."""
    now = utcnow()
    with db.write() as conn:
        return (
            conn.execute(
                sa.update(api_batches)
                .where(
                    api_batches.c.id == row_id,
                    api_batches.c.state.in_(states),
                    api_batches.c.output_file_id.is_(None),
                    _free(now),
                )
                .values(lease_until=now + timedelta(seconds=lease_seconds), **values)
            ).rowcount
            > 0
        )


def finish_batch_files(
    db: Database, row_id: int, output: tuple[int, int], errors: tuple[int, int] | None
) -> bool:
    """Make a finalized batch's files visible and point the batch at them, in one
    transaction: (file row id, bytes) of the output and of the error file (None: there
    was none). False, and nothing changed, if another server finished it first."""
    with db.write() as conn:
        ids = {
            row: conn.execute(
                sa.select(api_files.c.public_id).where(api_files.c.id == row)
            ).scalar_one()
            for row in [output[0], *([errors[0]] if errors else [])]
        }
        changed = conn.execute(
            sa.update(api_batches)
            .where(api_batches.c.id == row_id, api_batches.c.output_file_id.is_(None))
            .values(
                output_file_id=ids[output[0]],
                error_file_id=ids[errors[0]] if errors else None,
                lease_until=None,
            )
        ).rowcount
        if not changed:
            return False
        for row, size in [output, *([errors] if errors else [])]:
            conn.execute(sa.update(api_files).where(api_files.c.id == row).values(bytes=size))
    return True


def stale_reservations(db: Database, purpose: str, older_than: float) -> list[int]:
    """Forget file rows of `purpose` reserved more than `older_than` seconds ago and never
    finished (a server stopped while writing them); their row ids, whose bytes go too."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    with db.write() as conn:
        return list(
            conn.execute(
                sa.delete(api_files)
                .where(
                    api_files.c.bytes < 0,
                    api_files.c.purpose == purpose,
                    api_files.c.created_at < cutoff,
                )
                .returning(api_files.c.id)
            ).scalars()
        )


def _free(now: datetime | None = None) -> sa.ColumnElement[bool]:
    """No server holds the batch: no lease, or one that has run out."""
    return sa.or_(
        api_batches.c.lease_until.is_(None), api_batches.c.lease_until < (now or utcnow())
    )


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
