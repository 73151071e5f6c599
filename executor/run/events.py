"""What a run reports as it goes: the job a worker is on, counted in items and in tokens as
they are generated, and the events the command line renders (a bar or log lines)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class JobCounts:
    """The job a worker is on: its items so far, and this run's pace on it, counted in
    tokens as they are generated (a wave of 60 sequences finishes nothing for a while)."""

    job_id: int
    label: str
    total: int
    done: int  # finished items, those of earlier runs included
    failed: int = 0  # failed in this run
    items: int = 0  # finished in this run
    tokens: int = 0  # completion tokens of this run's finished items
    live_tokens: int = 0  # tokens generated so far by the items in flight
    live_items: float = 0.0  # the items in flight, each counted as generated / max_tokens
    started: float = field(default_factory=time.monotonic)

    def add(self, tokens: int, *, failed: bool = False) -> None:
        self.done += 1
        self.items += 1
        self.failed += int(failed)
        self.tokens += tokens

    @property
    def all_tokens(self) -> int:
        """Completion tokens this run has generated on the job, in flight included."""
        return self.tokens + self.live_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.all_tokens / max(time.monotonic() - self.started, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this run's pace: items finished plus the fractions of those in
        flight against their budgets; None before anything has been generated."""
        progress = self.items + self.live_items
        if progress <= 0:
            return None
        left = max(self.total - self.done - self.live_items, 0.0)
        return left * (time.monotonic() - self.started) / progress


class RunEvents(Protocol):
    """What a run reports as it goes (the CLI draws a bar or writes log lines from it)."""

    def job_started(self, job: JobCounts) -> None: ...

    def item_finished(self, job: JobCounts) -> None: ...

    def tick(self, job: JobCounts | None) -> None:
        """Nothing finished for a while (a second or so)."""
        ...

    def job_ended(self, job: JobCounts) -> None: ...


class NoEvents:
    """RunEvents that show nothing."""

    def job_started(self, job: JobCounts) -> None:
        pass

    def item_finished(self, job: JobCounts) -> None:
        pass

    def tick(self, job: JobCounts | None) -> None:
        pass

    def job_ended(self, job: JobCounts) -> None:
        pass
