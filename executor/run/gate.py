"""Whether a worker may use the card now, and if not, why and until when.

Four things close the gate, looked at in this order:
  0. a scheduler's time limit (Slurm's): the worker stops in time and exits (run/scheduler.py);
  1. a pause (`executor pause`, through the store: it reaches workers on other hosts),
     lifted by `executor resume`;
  2. the worker's time window (`--window 22:00-07:00`), outside which it runs nothing;
  3. with `--yield-gpu`, another process using the card: NVML's compute and graphics
     process lists show a process that is not this worker's (nor its model process's)
     holding at least `yield_gpu_min`; the worker resumes once the card has been free of
     such processes for `yield_gpu_quiet` seconds.
When the gate closes, the worker stops claiming, lets the items in flight finish (at most
`stop_timeout`), puts the rest back and unloads the model: the card's memory is the owner's
again. The clock is injectable, so that tests of windows take seconds, not nights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from executor.config import Settings
from executor.machine import gpu
from executor.run.scheduler import MARGIN_SECONDS
from executor.store import Database
from executor.store import workers as registry
from executor.units import format_bytes
from executor.windows import Window, local


@dataclass(frozen=True)
class Closed:
    """Why the gate is closed: `kind` paused, window or gpu; `until`: when it opens, if
    known (a pause lasts until it is lifted)."""

    kind: str
    reason: str
    until: datetime | None = None


class Clock(Protocol):
    def now(self) -> datetime:
        """Now, timezone-aware."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class Gate:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        worker_id: str,
        host: str,
        *,
        clock: Clock | None = None,
        card_uuid: str | None = None,
        nvml: Any | None = None,
        model_pid: Callable[[], int | None] = lambda: None,
        every: float = 1.0,
        ends_at: datetime | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.worker_id = worker_id
        self.host = host
        self.clock = clock or SystemClock()
        self.window = Window.parse(settings.window) if settings.window else None
        self.card_uuid = card_uuid if settings.yield_gpu else None
        self.nvml = nvml
        self.model_pid = model_pid
        self.every = every
        self._checked = -1e9
        self._last: Closed | None = None
        self._busy_until: datetime | None = None  # the card was in use: quiet until then
        # A scheduler's time limit: stop claiming early enough that the items in flight
        # finish (stop_timeout) before it.
        self.ends_at = ends_at
        self.stop_by = (
            ends_at - timedelta(seconds=settings.stop_timeout + MARGIN_SECONDS) if ends_at else None
        )

    def check(self, *, now: bool = False) -> Closed | None:
        """The gate as it is (looked at most once per `every` seconds unless `now`)."""
        if not now and time.monotonic() - self._checked < self.every:
            return self._last
        self._checked = time.monotonic()
        self._last = (
            self._time_limit() or self._paused() or self._outside_window() or self._card_in_use()
        )
        return self._last

    def _time_limit(self) -> Closed | None:
        if self.stop_by is None or self.clock.now() < self.stop_by:
            return None
        return Closed(
            "deadline",
            f"the scheduler ends this job at {local(self.ends_at, seconds=True)}: stopping in time "
            "(its items in flight finish, the rest stay queued)",
        )

    def _paused(self) -> Closed | None:
        target = registry.paused(self.db, self.worker_id, self.host)
        if target is None:
            return None
        who = "every worker" if target == "*" else target
        return Closed("paused", f"paused (executor pause: {who}; `executor resume` lifts it)")

    def _outside_window(self) -> Closed | None:
        if self.window is None:
            return None
        at = self.clock.now()
        if self.window.is_open(at):
            return None
        opens = self.window.opens_at(at)
        return Closed(
            "window", f"outside its window ({self.window.text}) until {local(opens)}", opens
        )

    def _card_in_use(self) -> Closed | None:
        if self.card_uuid is None:
            return None
        at = self.clock.now()
        ours = {os.getpid(), self.model_pid()}
        others = [
            (pid, used)
            for pid, used in gpu.card_processes(self.card_uuid, self.nvml)
            if pid not in ours and not _descends_from(pid, os.getpid())
            and used >= self.settings.yield_gpu_min
        ]  # fmt: skip
        if others:
            self._busy_until = at + timedelta(seconds=self.settings.yield_gpu_quiet)
            pid, used = max(others, key=lambda p: p[1])
            return Closed(
                "gpu", f"yielding the GPU to pid {pid} ({format_bytes(used)})", self._busy_until
            )
        if self._busy_until is not None and at < self._busy_until:
            return Closed(
                "gpu",
                f"the GPU was in use until a moment ago; resuming at {local(self._busy_until)} "
                f"if it stays free",
                self._busy_until,
            )
        self._busy_until = None
        return None


def _descends_from(pid: int, ancestor: int, depth: int = 6) -> bool:
    """Whether `pid` is a child (grandchild, …) of `ancestor`: a dry run or a spare model
    process of this worker is its own, not the owner's."""
    for _ in range(depth):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False
