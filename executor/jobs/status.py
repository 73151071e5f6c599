"""`executor status`: per job counts, tokens, tokens/s and ETA (report.py draws the table)."""

from __future__ import annotations

from typing import Any

from executor.machine import energy
from executor.planning.estimate import Estimator
from executor.store import Database, queue, results
from executor.store import workers as registry
from executor.store.schema import ItemStatus, JobStatus, utcnow


def job_rows(
    db: Database,
    job_id: int | None = None,
    limit: int = 50,
    estimator: Estimator | None = None,
) -> list[dict[str, Any]]:
    """One dict per job (newest first), the same data `--json` prints. With an `estimator`,
    a job that has not started yet gets its estimated time (planning/estimate.py) as its
    ETA; a running one's ETA comes from its live pace."""
    if job_id is not None:
        queue.require_job(db, job_id)
    jobs = queue.list_jobs(db, job_id=job_id, limit=limit)
    live = registry.in_flight(db)
    now = utcnow()
    rows = []
    for state in results.progress(db, jobs):
        job = state.job
        counts = {s.value: state.counts.get(s, 0) for s in ItemStatus}
        tokens, items = live.get(job.id, (0, 0.0)) if job.status == JobStatus.RUNNING else (0, 0)
        # Progress in items' worth: those finished, plus the items in flight as far as they
        # have come against their max_tokens (the first wave of a job finishes nothing for
        # a while, but its tokens count from the first step).
        processed = counts["done"] + counts["failed"] + items
        generated = state.completion_tokens + tokens
        # Rate over the job's working time so far: first claim to the latest result, or to
        # now while a live worker generates (a stopped worker does not make it decay).
        end = now if items else state.last_result_at
        elapsed = None
        if job.started_at is not None and end is not None:
            elapsed = max((end - job.started_at).total_seconds(), 1e-3)
        tokens_per_s = generated / elapsed if elapsed and processed else None
        eta = None
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING) and elapsed and processed:
            eta = max(state.remaining - items, 0) * elapsed / processed
        guess = None
        if estimator is not None and eta is None and job.status == JobStatus.QUEUED:
            guess = estimator.estimate(job)
            eta = (
                guess.seconds_expected if guess.seconds_expected is not None else guess.seconds_most
            )
        rows.append(
            {
                "id": job.id,
                "name": job.name,
                "status": job.status.value,
                "model": job.model,
                "items": job.item_count,
                "counts": counts,
                "prompt_tokens": state.prompt_tokens,
                "completion_tokens": state.completion_tokens,
                "tokens_in_flight": tokens,
                "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 2),
                "eta_s": None if eta is None else round(eta),
                "estimate": guess.as_dict() if guess is not None else None,
                "priority": job.priority,
                "window": job.window,
                "created_at": job.created_at.isoformat() + "Z",
                "started_at": job.started_at.isoformat() + "Z" if job.started_at else None,
                "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
                "error": job.error,
                # Energy while the job was worked on ("unknown" where nothing can read it).
                **energy.describe(job.energy_mj, state.completion_tokens),
                "energy_source": job.energy_source or "unknown",
            }
        )
    return rows
