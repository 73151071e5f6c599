"""The worker registry: who runs where, on which GPU, doing what, alive when."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.schema import utcnow, workers


def register(
    db: Database,
    worker_id: str,
    *,
    host: str,
    gpu_uuid: str,
    gpu_name: str | None,
    vram_total: int | None,
    pid: int,
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
                started_at=now,
                heartbeat_at=now,
            )
        )


def heartbeat(db: Database, worker_id: str, **state: Any) -> None:
    """I am alive; `state`: model, job_id, tokens_per_s as they are now."""
    with db.write() as conn:
        conn.execute(
            sa.update(workers)
            .where(workers.c.id == worker_id)
            .values(heartbeat_at=utcnow(), **state)
        )


def stopped(db: Database, worker_id: str) -> None:
    with db.write() as conn:
        conn.execute(
            sa.update(workers)
            .where(workers.c.id == worker_id)
            .values(stopped_at=utcnow(), heartbeat_at=utcnow(), model=None, job_id=None)
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
