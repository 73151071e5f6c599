"""The worker registry: who runs where, on which GPU, doing what, alive when."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.notify import announce
from executor.store.schema import pauses, rate_samples, utcnow, workers
from executor.store.upsert import insert_if_absent


def register(
    db: Database,
    worker_id: str,
    *,
    host: str,
    gpu_uuid: str,
    gpu_name: str | None,
    vram_total: int | None,
    pid: int,
    scheduler: str | None = None,
) -> None:
    """Record that this worker (host + GPU) has started (replacing its last run's row)."""
    now = utcnow()
    with db.write() as conn:
        conn.execute(sa.delete(workers).where(workers.c.id == worker_id))
        conn.execute(
            sa.insert(workers).values(
                id=worker_id,
                host=host,
                gpu_uuid=gpu_uuid,
                gpu_name=gpu_name,
                vram_total=vram_total,
                pid=pid,
                scheduler=scheduler,
                state="starting",
                started_at=now,
                heartbeat_at=now,
            )
        )


def heartbeat(
    db: Database, worker_id: str, *, sample: tuple[int, int] | None = None, **state: Any
) -> None:
    """I am alive; `state`: model, job_id, tokens_per_s, tokens and items in flight as they
    are now; `sample`: (job id, completion tokens this run has generated on it so far)."""
    now = utcnow()
    with db.write() as conn:
        conn.execute(
            sa.update(workers).where(workers.c.id == worker_id).values(heartbeat_at=now, **state)
        )
        if sample is not None:
            job_id, tokens = sample
            conn.execute(
                sa.insert(rate_samples).values(
                    job_id=job_id, worker_id=worker_id, at=now, tokens=tokens
                )
            )


def stopped(db: Database, worker_id: str) -> None:
    with db.write() as conn:
        conn.execute(
            sa.update(workers)
            .where(workers.c.id == worker_id)
            .values(
                stopped_at=utcnow(),
                heartbeat_at=utcnow(),
                model=None,
                job_id=None,
                tokens_in_flight=None,
                items_in_flight=None,
                state="stopped",
                resumes_at=None,
            )
        )


def listing(db: Database, alive_within: float) -> list[dict[str, Any]]:
    """Every worker, live ones first; live = a heartbeat within `alive_within` seconds."""
    now = utcnow()
    with db.read() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(sa.select(workers).order_by(workers.c.heartbeat_at.desc()))
        ]
    for row in rows:
        beat: datetime = row["heartbeat_at"]
        row["alive"] = row["stopped_at"] is None and now - beat < timedelta(seconds=alive_within)
        row["heartbeat_age_s"] = round((now - beat).total_seconds(), 1)
    return sorted(rows, key=lambda r: not r["alive"])


def in_flight(db: Database, alive_within: float = 60.0) -> dict[int, tuple[int, float]]:
    """Per job, what live workers have in flight now: (tokens generated, items' worth)."""
    since = utcnow() - timedelta(seconds=alive_within)
    with db.read() as conn:
        rows = conn.execute(
            sa.select(
                workers.c.job_id, workers.c.tokens_in_flight, workers.c.items_in_flight
            ).where(
                workers.c.stopped_at.is_(None),
                workers.c.heartbeat_at >= since,
                workers.c.job_id.is_not(None),
            )
        ).all()
    live: dict[int, tuple[int, float]] = {}
    for job_id, tokens, items in rows:
        before = live.get(job_id, (0, 0.0))
        live[job_id] = (before[0] + (tokens or 0), before[1] + (items or 0.0))
    return live


def rate_samples_of(db: Database, job_id: int, last: int = 5000) -> list[tuple[str, datetime, int]]:
    """(worker, when, tokens that worker's run had generated on the job) of its latest
    `last` samples, oldest first."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(rate_samples.c.worker_id, rate_samples.c.at, rate_samples.c.tokens)
            .where(rate_samples.c.job_id == job_id)
            .order_by(rate_samples.c.id.desc())
            .limit(last)
        ).all()
    return [(r[0], r[1], r[2]) for r in reversed(rows)]


def pause(db: Database, target: str) -> bool:
    """Pause the workers `target` names ("*": every one; a worker id; a host). False if it
    was paused already."""
    with db.write() as conn:
        return insert_if_absent(conn, pauses, {"target": target, "paused_at": utcnow()})


def resume(db: Database, target: str | None) -> int:
    """Lift the pause of `target` (None: every pause); how many were lifted."""
    query = sa.delete(pauses)
    if target is not None:
        query = query.where(pauses.c.target == target)
    with db.write() as conn:
        lifted = conn.execute(query).rowcount
        if lifted:
            announce(conn)  # paused workers wait for work: they go on at once
    return lifted


def paused(db: Database, worker_id: str, host: str) -> str | None:
    """The pause that applies to this worker (its target), or None."""
    with db.read() as conn:
        return conn.execute(
            sa.select(pauses.c.target)
            .where(pauses.c.target.in_(["*", worker_id, host]))
            .order_by(pauses.c.paused_at)
        ).scalar()


def pause_list(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(pauses).order_by(pauses.c.target))]
