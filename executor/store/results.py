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
from executor.store.schema import ItemStatus, items, jobs, loads, results


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


@dataclass(frozen=True)
class PastJob:
    """What an earlier job of a model took on one host: its span from first claim to last
    result, its tokens, the budgets its answers had, the sequences it ran at, its energy."""

    job_id: int
    seconds: float
    items: int
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int  # the done items' budgets
    parallel: int | None  # the load most of its results ran under
    energy_mj: int | None
    requests: tuple[dict[str, Any], ...] = ()  # its done items' requests, in line order


def past_jobs(
    db: Database, model: str, host: str, *, before: int | None = None, last: int = 20
) -> list[PastJob]:
    """Finished jobs of `model` whose results a worker on `host` made, newest first (at most
    `last`; only jobs before job `before` when given)."""
    query = (
        sa.select(jobs.c.id, jobs.c.started_at, jobs.c.energy_mj)
        .where(jobs.c.model == model, jobs.c.started_at.is_not(None))
        .order_by(jobs.c.id.desc())
        .limit(last)
    )
    if before is not None:
        query = query.where(jobs.c.id < before)
    out = []
    with db.read() as conn:
        for job_id, started_at, energy_mj in conn.execute(query).all():
            rows = conn.execute(
                sa.select(
                    results.c.created_at,
                    results.c.prompt_tokens,
                    results.c.completion_tokens,
                    results.c.params,
                    results.c.worker_id,
                    loads.c.parallel,
                    items.c.request,
                )
                .join(items, items.c.id == results.c.item_id)
                .outerjoin(loads, loads.c.id == results.c.load_id)
                .where(items.c.job_id == job_id)
                .order_by(items.c.line)
            ).all()
            rows = [r for r in rows if (r.worker_id or "").split(":", 1)[0] == host]
            if not rows:
                continue
            seconds = (max(r.created_at for r in rows) - started_at).total_seconds()
            parallels = [r.parallel for r in rows if r.parallel]
            out.append(
                PastJob(
                    job_id=job_id,
                    seconds=max(seconds, 1e-3),
                    items=len(rows),
                    prompt_tokens=sum(r.prompt_tokens for r in rows),
                    completion_tokens=sum(r.completion_tokens for r in rows),
                    max_tokens=sum(int((r.params or {}).get("max_tokens", 0)) for r in rows),
                    parallel=max(set(parallels), key=parallels.count) if parallels else None,
                    energy_mj=energy_mj,
                    requests=tuple(r.request for r in rows),
                )
            )
    return out


def unfinished_work(db: Database, job_id: int) -> list[tuple[dict[str, Any], int | None]]:
    """The request and counted context need of every unfinished item of a job."""
    with db.read() as conn:
        return [
            (row.request, row.context_need)
            for row in conn.execute(
                sa.select(items.c.request, items.c.context_need).where(
                    items.c.job_id == job_id, items.c.status.in_(UNFINISHED)
                )
            )
        ]
