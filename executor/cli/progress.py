"""Showing a run's progress (the worker's RunEvents): a bar with tokens/s and ETA on a terminal,
plain or JSON log lines otherwise."""

from __future__ import annotations

import logging
import time

from executor.cli.logs import StatusLine
from executor.redact import printable
from executor.run.events import JobCounts
from executor.units import format_duration

log = logging.getLogger("executor.cli.progress")


class ProgressDisplay:
    """Renders the job a worker is on at a steady pace: the bar often, log lines rarely."""

    def __init__(self, status: StatusLine | None, interval: float = 10.0) -> None:
        self.status = status
        self.interval = interval if status is None else 0.25
        self._last = 0.0

    def job_started(self, job: JobCounts) -> None:
        self._last = 0.0

    def item_finished(self, job: JobCounts) -> None:
        self.tick(job)

    def tick(self, job: JobCounts | None) -> None:
        if job is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self._show(job)

    def job_ended(self, job: JobCounts) -> None:
        self._show(job)
        if self.status is not None:
            self.status.clear()

    def _show(self, job: JobCounts) -> None:
        eta = job.eta_s
        if self.status is not None:
            self.status.show(bar(job))
            return
        # Items in flight count as far as they have come: "0/60 items (+12.4 in flight)".
        live = f" (+{job.live_items:.1f} in flight)" if job.live_items >= 0.05 else ""
        log.info(
            "progress job %s: %d/%d items%s, %d failed, %.1f tok/s, ETA %s",
            job.job_id,
            job.done,
            job.total,
            live,
            job.failed,
            job.tokens_per_s,
            format_duration(eta),
            extra={
                "job": job.job_id,
                "done": job.done,
                "total": job.total,
                "in_flight": round(job.live_items, 2),
                "failed": job.failed,
                "tokens": job.all_tokens,
                "tokens_per_s": round(job.tokens_per_s, 2),
                "eta_s": None if eta is None else round(eta),
            },
        )


def bar(job: JobCounts, width: int = 24) -> str:
    """`job 3 (nightly) ████████░░░░ 120/300, 2 failed  41.3 tok/s  ETA 4m10s`: the bar
    counts the items in flight as far as they have come."""
    fraction = min((job.done + job.live_items) / job.total, 1.0) if job.total else 1.0
    filled = int(fraction * width)
    failed = f", {job.failed} failed" if job.failed else ""
    return (
        f"{printable(job.label)} {'█' * filled}{'░' * (width - filled)} "
        f"{job.done}/{job.total}{failed}  "
        f"{job.tokens_per_s:.1f} tok/s  ETA {format_duration(job.eta_s)}"
    )
