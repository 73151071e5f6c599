"""The order a worker takes jobs, written once: priority, then the loaded model (unless
another model's job has waited too long), then age; and changing a job's priority."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from executor.errors import UsageError
from executor.store.db import Database
from executor.store.queue import Job, _job, require_job
from executor.store.schema import ItemStatus, JobStatus, items, jobs, utcnow


def next_job(
    db: Database,
    *,
    job_id: int | None = None,
    prefer_model: str | None = None,
    vram: int | None = None,
    max_model_wait: float = 7200.0,
    exclude: Iterable[int] = (),
) -> Job | None:
    """The job to work on next, by the one order every worker follows:

    1. higher priority first;
    2. among equals, jobs of the loaded model (`prefer_model`: a reload of a 60 GB model
       costs minutes), and jobs of other models that have waited longer than
       `max_model_wait` seconds (a model is not starved by a busy one);
    3. then the oldest.
    Only jobs with queued items, and not asking for more GPU memory than `vram` (None: the
    worker has no GPU); `exclude`: jobs the worker cannot take now (their windows are
    closed)."""
    query = _waiting(vram)
    if job_id is not None:
        query = query.where(jobs.c.id == job_id)
    excluded = list(exclude)
    if excluded:
        query = query.where(jobs.c.id.not_in(excluded))
    order: list[Any] = [jobs.c.priority.desc()]
    if prefer_model is not None:
        overdue = utcnow() - timedelta(seconds=max_model_wait)
        order.append(
            sa.case(
                (sa.or_(jobs.c.model == prefer_model, jobs.c.created_at <= overdue), 0), else_=1
            )
        )
    order.append(jobs.c.id)
    with db.read() as conn:
        row = conn.execute(query.order_by(*order).limit(1)).first()
    return _job(row) if row else None


def outranked(db: Database, job: Job, *, vram: int | None = None) -> bool:
    """Whether a job of higher priority than `job` waits: the worker then switches after
    the current batch (never mid-sequence)."""
    query = _waiting(vram).where(jobs.c.priority > job.priority).limit(1)
    with db.read() as conn:
        return conn.execute(query).first() is not None


def _waiting(vram: int | None) -> sa.Select[Any]:
    has_queued = (
        sa.select(items.c.id)
        .where(items.c.job_id == jobs.c.id, items.c.status == ItemStatus.QUEUED)
        .exists()
    )
    return sa.select(jobs).where(
        jobs.c.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        has_queued,
        sa.or_(jobs.c.min_vram.is_(None), jobs.c.min_vram <= (vram or 0)),
    )


def set_priority(db: Database, job_id: int, priority: int) -> Job:
    """Change an unfinished job's priority; NotFoundError if there is no such job, UsageError
    if it has finished."""
    job = require_job(db, job_id)
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise UsageError(f"job {job_id} is {job.status.value}: its priority no longer matters")
    with db.write() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(priority=priority))
    return require_job(db, job_id)
