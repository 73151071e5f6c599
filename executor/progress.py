"""Progress of a run: a bar with tokens/s and ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from executor.logs import StatusLine

log = logging.getLogger("executor.progress")


def format_duration(seconds: float | None) -> str:
    """`1h02m`, `3m05s`, `42s`; `?` when unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass
class Rate:
    """Throughput of this run on one job: items and completion tokens per second of work."""

    started: float = field(default_factory=time.monotonic)
    items: int = 0
    tokens: int = 0

    def add(self, tokens: int) -> None:
        self.items += 1
        self.tokens += tokens

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed

    def eta(self, remaining: int) -> float | None:
        if not self.items:
            return None
        return remaining * self.elapsed / self.items


class Progress:
    """Counts finished items of the current job and reports them at a steady pace."""

    def __init__(self, status: StatusLine | None, interval: float = 10.0) -> None:
        self.status = status
        self.interval = interval if status is None else 0.25
        self.job_id: int | None = None
        self.label = ""
        self.total = 0
        self.done = 0
        self.failed = 0
        self.rate = Rate()
        self._last = 0.0

    def begin_job(self, job_id: int, label: str, total: int, finished: int) -> None:
        """Start counting a job that has `finished` of `total` items behind it already."""
        if self.job_id == job_id:
            return
        self.end_job()
        self.job_id, self.label, self.total = job_id, label, total
        self.done, self.failed = finished, 0
        self.rate = Rate()
        self._last = 0.0

    def item_finished(self, completion_tokens: int, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        self.rate.add(completion_tokens)
        self.tick()

    def tick(self, force: bool = False) -> None:
        """Render if the interval has passed (the bar redraws often, log lines rarely)."""
        if self.job_id is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        remaining = max(self.total - self.done, 0)
        eta = self.rate.eta(remaining)
        if self.status is not None:
            self.status.show(self._bar(eta))
        else:
            log.info(
                "progress job %s: %d/%d items, %d failed, %.1f tok/s, ETA %s",
                self.job_id,
                self.done,
                self.total,
                self.failed,
                self.rate.tokens_per_s,
                format_duration(eta),
                extra={
                    "job": self.job_id,
                    "done": self.done,
                    "total": self.total,
                    "failed": self.failed,
                    "tokens_per_s": round(self.rate.tokens_per_s, 2),
                    "eta_s": None if eta is None else round(eta),
                },
            )

    def end_job(self) -> None:
        if self.job_id is None:
            return
        self.tick(force=True)
        if self.status is not None:
            self.status.clear()
        self.job_id = None

    def _bar(self, eta: float | None, width: int = 24) -> str:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * width)
        bar = "█" * filled + "░" * (width - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.label} {bar} {self.done}/{self.total}{failed}  "
            f"{self.rate.tokens_per_s:.1f} tok/s  ETA {format_duration(eta)}"
        )
