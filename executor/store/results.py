"""Reading what jobs produced: counts and token totals per job, the export's rows in input
order, the token timeline. Reads only; the queue (queue.py) writes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.queue import UNFINISHED, Job
from executor.store.schema import ItemStatus, items, loads, results


@dataclass(frozen=True)
class JobProgress:
    """Counts and token totals of one job, for status and progress."""

    job: Job
    counts: dict[ItemStatus, int]
    prompt_tokens: int
    completion_tokens: int
    last_result_at: datetime | None

    @property
    def finished(self) -> int:
        return sum(n for s, n in self.counts.items() if s not in UNFINISHED)

    @property
    def remaining(self) -> int:
        return sum(self.counts.get(s, 0) for s in UNFINISHED)


def progress(db: Database, job_list: list[Job]) -> list[JobProgress]:
    """Item counts per status and token totals for each job."""
    ids = [job.id for job in job_list]
    counts: dict[int, dict[ItemStatus, int]] = {i: {} for i in ids}
    tokens: dict[int, tuple[int, int, datetime | None]] = {}
    with db.read() as conn:
        for job_id, status, n in conn.execute(
            sa.select(items.c.job_id, items.c.status, sa.func.count())
            .where(items.c.job_id.in_(ids))
            .group_by(items.c.job_id, items.c.status)
        ):
            counts[job_id][ItemStatus(status)] = n
        for job_id, p, c, last in conn.execute(
            sa.select(
                items.c.job_id,
                sa.func.coalesce(sa.func.sum(results.c.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(results.c.completion_tokens), 0),
                sa.func.max(results.c.created_at),
            )
            .join(results, results.c.item_id == items.c.id)
            .where(items.c.job_id.in_(ids))
            .group_by(items.c.job_id)
        ):
            tokens[job_id] = (p, c, last)
    return [JobProgress(job, counts[job.id], *tokens.get(job.id, (0, 0, None))) for job in job_list]


def export_rows(db: Database, job_id: int, statuses: Iterable[ItemStatus]) -> Iterator[sa.Row[Any]]:
    """Items of a job with their results and the load they ran under, in input order,
    streamed in chunks."""
    query = (
        sa.select(
            items.c.line,
            items.c.custom_id,
            items.c.status,
            items.c.error,
            items.c.error_code,
            items.c.request,
            results.c.output,
            results.c.finish_reason,
            results.c.prompt_tokens,
            results.c.completion_tokens,
            results.c.prompt_ms,
            results.c.generation_ms,
            results.c.total_ms,
            results.c.model_sha256,
            results.c.params,
            results.c.created_at,
            results.c.load_id,
            loads.c.n_gpu_layers,
            loads.c.parallel,
            loads.c.n_ctx,
            loads.c.vram_cap,
            loads.c.n_ubatch,
            loads.c.tensor_overrides,
            loads.c.gpu_name,
            loads.c.predicted_vram,
            loads.c.measured_vram,
        )
        .outerjoin(results, results.c.item_id == items.c.id)
        .outerjoin(loads, loads.c.id == results.c.load_id)
        .where(items.c.job_id == job_id, items.c.status.in_(list(statuses)))
        .order_by(items.c.line)
    )
    with db.engine.connect() as conn:
        yield from conn.execution_options(yield_per=1000).execute(query)


def token_timeline(db: Database, job_id: int, last: int = 5000) -> list[tuple[datetime, int]]:
    """(finished at, completion tokens) of the job's latest `last` results, oldest first."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(results.c.created_at, results.c.completion_tokens)
            .join(items, items.c.id == results.c.item_id)
            .where(items.c.job_id == job_id)
            .order_by(results.c.id.desc())
            .limit(last)
        ).all()
    return [(r[0], r[1]) for r in reversed(rows)]
