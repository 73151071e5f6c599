"""Queue operations: the only module that writes jobs, items and results.

Every statement is portable SQLAlchemy Core (SQLite and PostgreSQL); every write runs in
`Database.write()` (BEGIN IMMEDIATE on SQLite) and is short, so a checkpoint is one commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from executor.errors import NotFoundError, UnstorableResult
from executor.outcomes import FailCode, ResultRecord
from executor.store.db import Database
from executor.store.notify import announce
from executor.store.schema import (
    ItemStatus,
    JobStatus,
    items,
    jobs,
    results,
    utcnow,
)

INSERT_CHUNK = 1000
UNFINISHED = (ItemStatus.QUEUED, ItemStatus.RUNNING)


@dataclass(frozen=True)
class Job:
    id: int
    name: str | None
    model: str
    params: dict[str, Any]
    input_path: str
    input_sha256: str
    fingerprint: str
    status: JobStatus
    item_count: int
    min_vram: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    energy_mj: int | None = None  # what the device used working on it (None: unknown)
    energy_source: str | None = None
    priority: int = 0  # higher runs first
    window: str | None = None  # the hours it may run in (None: any)

    @property
    def failed(self) -> bool:
        """The job failed as a whole (e.g. its model would not load at all)."""
        return self.status == JobStatus.FAILED


@dataclass(frozen=True)
class ClaimedItem:
    id: int
    job_id: int
    line: int
    custom_id: str
    request: dict[str, Any]
    attempts: int


# The columns a ClaimedItem is built from, in its fields' order.
CLAIMED_COLUMNS = (
    items.c.id,
    items.c.job_id,
    items.c.line,
    items.c.custom_id,
    items.c.request,
    items.c.attempts,
)


@dataclass(frozen=True)
class NewItem:
    line: int
    custom_id: str
    request: dict[str, Any]
    status: ItemStatus = ItemStatus.QUEUED
    error: str | None = None
    error_code: FailCode | None = None


# --- jobs ------------------------------------------------------------------------------------


def create_job(
    db: Database,
    *,
    name: str | None,
    model: str,
    params: dict[str, Any],
    input_path: str,
    input_sha256: str,
    fingerprint: str,
    new_items: Iterable[NewItem],
    min_vram: int | None = None,
    reuse: bool = True,
    priority: int = 0,
    window: str | None = None,
) -> tuple[Job, bool]:
    """Insert a job and all its items in one transaction (all or nothing). With `reuse`, a
    job of the same fingerprint is returned instead, found in the same transaction (SQLite:
    under the write lock; PostgreSQL: under an advisory lock on the fingerprint), so that
    concurrent twins queue one job. Returns (job, created)."""
    now = utcnow()
    with db.write() as conn:
        if reuse:
            if not db.is_sqlite:
                key = int(fingerprint[:15], 16)
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            row = conn.execute(
                sa.select(jobs)
                .where(jobs.c.fingerprint == fingerprint)
                .order_by(jobs.c.id.desc())
                .limit(1)
            ).first()
            if row is not None:
                return _job(row), False
        job_id = conn.execute(
            sa.insert(jobs)
            .values(
                name=name,
                model=model,
                params=params,
                input_path=input_path,
                input_sha256=input_sha256,
                fingerprint=fingerprint,
                status=JobStatus.QUEUED,
                item_count=0,
                min_vram=min_vram,
                priority=priority,
                window=window,
                created_at=now,
            )
            .returning(jobs.c.id)
        ).scalar_one()
        count = 0
        chunk: list[dict[str, Any]] = []
        for item in new_items:
            chunk.append(
                {
                    "job_id": job_id,
                    "line": item.line,
                    "custom_id": item.custom_id,
                    "request": item.request,
                    "status": item.status,
                    "error": item.error,
                    "error_code": item.error_code,
                    "attempts": 0,
                    "updated_at": now,
                }
            )
            if len(chunk) >= INSERT_CHUNK:
                conn.execute(sa.insert(items), chunk)
                count += len(chunk)
                chunk.clear()
        if chunk:
            conn.execute(sa.insert(items), chunk)
            count += len(chunk)
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(item_count=count))
        _finish_job_if_complete(conn, job_id, now)
        announce(conn)  # idle workers claim at once (PostgreSQL)
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
    return _job(row), True


MAX_ID = 2**63 - 1  # the largest id either database stores


def get_job(db: Database, job_id: int) -> Job | None:
    if not 0 < job_id <= MAX_ID:  # no such job; asking would overflow the driver
        return None
    with db.read() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    return _job(row) if row else None


def require_job(db: Database, job_id: int) -> Job:
    """The job, or NotFoundError (exit 5) naming it."""
    job = get_job(db, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}", hint="`executor status` lists the jobs")
    return job


def list_jobs(db: Database, *, job_id: int | None = None, limit: int = 50) -> list[Job]:
    query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
    if job_id is not None:
        query = query.where(jobs.c.id == job_id)
    with db.read() as conn:
        return [_job(row) for row in conn.execute(query)]


def waiting_items(db: Database, job_id: int | None = None) -> int:
    """Items queued or running (of one job): the work left."""
    query = sa.select(sa.func.count()).where(items.c.status.in_(UNFINISHED))
    if job_id is not None:
        query = query.where(items.c.job_id == job_id)
    with db.read() as conn:
        return conn.execute(query).scalar_one()


def running_items(db: Database, job_id: int | None = None, owner: str | None = None) -> int:
    """Items leased (by one worker, of one job): work that may still come back."""
    query = sa.select(sa.func.count()).where(items.c.status == ItemStatus.RUNNING)
    if job_id is not None:
        query = query.where(items.c.job_id == job_id)
    if owner is not None:
        query = query.where(items.c.lease_owner == owner)
    with db.read() as conn:
        return conn.execute(query).scalar_one()


def cancel_job(db: Database, job_id: int) -> int:
    """Cancel a job: its unfinished items are cancelled (a running item's result is dropped).
    Returns how many; NotFoundError if there is no such job."""
    require_job(db, job_id)
    now = utcnow()
    with db.write() as conn:
        n = conn.execute(
            sa.update(items)
            .where(items.c.job_id == job_id, items.c.status.in_(UNFINISHED))
            .values(status=ItemStatus.CANCELLED, lease_owner=None, lease_until=None, updated_at=now)
        ).rowcount
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id)
            .values(status=JobStatus.CANCELLED, finished_at=now)
        )
    return n


def retry_job(db: Database, job_id: int) -> int:
    """Put failed and cancelled items back in the queue (invalid input lines stay failed).
    Returns how many; NotFoundError if there is no such job."""
    require_job(db, job_id)
    now = utcnow()
    with db.write() as conn:
        n = conn.execute(
            sa.update(items)
            .where(
                items.c.job_id == job_id,
                items.c.status.in_([ItemStatus.FAILED, ItemStatus.CANCELLED]),
            )
            .values(
                status=ItemStatus.QUEUED, attempts=0, error=None, error_code=None, updated_at=now
            )
        ).rowcount
        if n:
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(status=JobStatus.QUEUED, error=None, finished_at=None)
            )
            announce(conn)
    return n


def fail_job(db: Database, job_id: int, reason: str) -> int:
    """The job cannot run at all (e.g. its model does not load): fail it and its open items.
    Returns how many items it failed."""
    now = utcnow()
    with db.write() as conn:
        failed = conn.execute(
            sa.update(items)
            .where(items.c.job_id == job_id, items.c.status.in_(UNFINISHED))
            .values(
                status=ItemStatus.FAILED,
                error=reason,
                error_code=FailCode.MODEL_FAILED,
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            )
        ).rowcount
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id)
            .values(status=JobStatus.FAILED, error=reason, finished_at=now)
        )
    return failed


# --- items: claim, heartbeat, checkpoint -------------------------------------------------------


def claim(
    db: Database,
    job_id: int,
    *,
    limit: int,
    owner: str,
    lease_seconds: float,
    suspects: bool = False,
) -> list[ClaimedItem]:
    """Atomically lease up to `limit` queued items of a job, in input order.

    `suspects` picks only items that were in flight when the model process crashed (so they
    can run one at a time: a crash then blames only the item that caused it); otherwise only
    items that never crashed it.
    """
    now = utcnow()
    crashed = items.c.attempts > 0 if suspects else items.c.attempts == 0
    pick = (
        sa.select(items.c.id)
        .where(items.c.job_id == job_id, items.c.status == ItemStatus.QUEUED, crashed)
        .order_by(items.c.line)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite's IMMEDIATE lock serializes
    )
    with db.write() as conn:
        rows = conn.execute(
            sa.update(items)
            .where(items.c.id.in_(pick.scalar_subquery()))
            .values(
                status=ItemStatus.RUNNING,
                lease_owner=owner,
                lease_until=now + timedelta(seconds=lease_seconds),
                updated_at=now,
            )
            .returning(*CLAIMED_COLUMNS)
        ).all()
        if rows:
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.RUNNING, started_at=sa.func.coalesce(jobs.c.started_at, now)
                )
            )
    return sorted((ClaimedItem(*row) for row in rows), key=lambda item: item.line)


def renew_leases(db: Database, item_ids: Iterable[int], *, owner: str, lease_seconds: float) -> int:
    """Heartbeat: extend the leases this worker still holds."""
    ids = list(item_ids)
    if not ids:
        return 0
    with db.write() as conn:
        return conn.execute(
            sa.update(items)
            .where(
                items.c.id.in_(ids),
                items.c.lease_owner == owner,
                items.c.status == ItemStatus.RUNNING,
            )
            .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        ).rowcount


def complete(
    db: Database,
    item_id: int,
    *,
    owner: str,
    result: ResultRecord,
    model_sha256: str,
    load_id: int | None = None,
    params: dict[str, Any] | None = None,
) -> bool:
    """Checkpoint one finished item; False if its lease was lost (cancelled, reclaimed).
    UnstorableResult if the output holds what no database can store (nothing is written)."""
    _check_storable(result.output)
    now = utcnow()
    with db.write() as conn:
        job_id = _close_item(conn, item_id, owner, ItemStatus.DONE, None, now)
        if job_id is None:
            return False
        conn.execute(
            sa.insert(results).values(
                item_id=item_id,
                output=result.output,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                prompt_ms=result.prompt_ms,
                generation_ms=result.generation_ms,
                total_ms=result.total_ms,
                model_sha256=model_sha256,
                worker_id=owner,
                load_id=load_id,
                params=params,
                created_at=now,
            )
        )
        _finish_job_if_complete(conn, job_id, now)
    return True


def fail_item(
    db: Database, item_id: int, *, owner: str, error: str, code: FailCode = FailCode.FAILED
) -> bool:
    """Record that one item failed (its own fault, e.g. too long); the queue goes on."""
    now = utcnow()
    with db.write() as conn:
        job_id = _close_item(conn, item_id, owner, ItemStatus.FAILED, error, now, code)
        if job_id is None:
            return False
        _finish_job_if_complete(conn, job_id, now)
    return True


def release(
    db: Database,
    item_ids: Iterable[int],
    *,
    owner: str,
    error: str | None = None,
    count_attempt: bool = False,
    max_attempts: int = 3,
) -> list[int]:
    """Give leased items back to the queue; return the ids that failed as poison instead.

    With `count_attempt` (the model process crashed while these items were in flight) each gets
    an attempt; an item that reaches `max_attempts` is failed so that it cannot stall the queue.
    """
    ids = list(item_ids)
    if not ids:
        return []
    now = utcnow()
    mine = sa.and_(
        items.c.id.in_(ids), items.c.lease_owner == owner, items.c.status == ItemStatus.RUNNING
    )
    cleared = {"lease_owner": None, "lease_until": None, "updated_at": now}
    with db.write() as conn:
        poisoned: list[int] = []
        if count_attempt:
            conn.execute(sa.update(items).where(mine).values(attempts=items.c.attempts + 1))
            poisoned = list(
                conn.execute(
                    sa.select(items.c.id).where(mine, items.c.attempts >= max_attempts)
                ).scalars()
            )
            if poisoned:
                conn.execute(
                    sa.update(items)
                    .where(items.c.id.in_(poisoned))
                    .values(
                        status=ItemStatus.FAILED,
                        error=f"crashed the worker {max_attempts} times; last: {error}",
                        error_code=FailCode.CRASHED,
                        **cleared,
                    )
                )
        if conn.execute(
            sa.update(items).where(mine).values(status=ItemStatus.QUEUED, error=error, **cleared)
        ).rowcount:
            announce(conn)
        for job_id in {
            r for r in conn.execute(sa.select(items.c.job_id).where(items.c.id.in_(ids))).scalars()
        }:
            _finish_job_if_complete(conn, job_id, now)
    return poisoned


def reclaim_stale(db: Database, *, everything: bool = False, owner: str | None = None) -> int:
    """Return expired leases to the queue; with `everything`, every running item; with
    `owner`, also every lease of that worker identity.

    `everything` is for a worker that holds the single-worker lock of a SQLite database: no
    other worker can be alive, so every lease is left over from a dead one. `owner` is for a
    worker that holds its identity's lock: leases under its name are from its dead self.
    """
    now = utcnow()
    stale = items.c.status == ItemStatus.RUNNING
    if not everything:
        expired = items.c.lease_until < now
        if owner is not None:
            expired = sa.or_(expired, items.c.lease_owner == owner)
        stale = sa.and_(stale, expired)
    with db.write() as conn:
        returned = conn.execute(
            sa.update(items)
            .where(stale)
            .values(status=ItemStatus.QUEUED, lease_owner=None, lease_until=None, updated_at=now)
        ).rowcount
        if returned:
            announce(conn)
    return returned


def _check_storable(text: str) -> None:
    """NUL characters (PostgreSQL) and lone UTF-16 surrogates (no UTF-8 for them) cannot be
    stored in a text column; the same result must fail the same way on both backends."""
    if "\x00" in text:
        raise UnstorableResult("the answer holds a NUL character, which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnstorableResult(
            f"the answer holds {text[exc.start]!r} at {exc.start}, which is not valid Unicode "
            "and cannot be stored"
        ) from None


def _close_item(
    conn: sa.Connection,
    item_id: int,
    owner: str,
    status: ItemStatus,
    error: str | None,
    now: datetime,
    code: FailCode | None = None,
) -> int | None:
    """Move a leased item to a final status; the job id, or None if the lease was not ours."""
    return conn.execute(
        sa.update(items)
        .where(
            items.c.id == item_id,
            items.c.lease_owner == owner,
            items.c.status == ItemStatus.RUNNING,
        )
        .values(
            status=status,
            error=error,
            error_code=code,
            lease_owner=None,
            lease_until=None,
            updated_at=now,
        )
        .returning(items.c.job_id)
    ).scalar()


def _finish_job_if_complete(conn: sa.Connection, job_id: int, now: datetime) -> None:
    open_items = (
        sa.select(items.c.id)
        .where(items.c.job_id == job_id, items.c.status.in_(UNFINISHED))
        .exists()
    )
    conn.execute(
        sa.update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            ~open_items,
        )
        .values(status=JobStatus.DONE, finished_at=now)
    )


def add_energy(db: Database, job_id: int, millijoules: int, source: str) -> None:
    """Add what one stretch of work on the job cost (a worker's batch)."""
    with db.write() as conn:
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id)
            .values(energy_mj=sa.func.coalesce(jobs.c.energy_mj, 0) + millijoules,
                    energy_source=source)
        )  # fmt: skip


def _job(row: sa.Row[Any]) -> Job:
    data = dict(row._mapping)
    data["status"] = JobStatus(data["status"])
    return Job(**data)
