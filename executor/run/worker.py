"""The worker: claim a batch → generate in the model process → checkpoint each result.

Signal handlers only count signals; the loop looks at the count between events. One signal:
stop claiming, let the item in flight finish (up to the stop timeout), release the rest. Two:
stop now, releasing everything. The worker knows no screen: it reports its progress through
`RunEvents`, which the CLI renders (a bar on a terminal, log lines under cron).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from executor.config import Settings, xdg_dir
from executor.errors import DatabaseGone, ModelError, WouldSwapError
from executor.machine import energy, gpu
from executor.planning.gather import card_for
from executor.planning.job_settings import job_load
from executor.planning.workload import context_for, job_context_need
from executor.run import scheduler
from executor.run.batch import BatchRun
from executor.run.events import JobCounts, NoEvents, RunEvents
from executor.run.gate import Clock, Closed, Gate, SystemClock
from executor.run.loader import Loaded, ModelLoader
from executor.store import Database, queue, results, schedule
from executor.store import workers as registry
from executor.store.locks import worker_lock
from executor.store.notify import Waiter
from executor.store.queue import Job
from executor.windows import Window, local

log = logging.getLogger(__name__)

BEAT_SECONDS = 5.0  # registry heartbeats: what `workers` and the page show is this fresh
OUTRANK_SECONDS = 2.0  # how often a running batch looks for a job of higher priority


@dataclass(frozen=True)
class RunOptions:
    until_empty: bool = False
    job_id: int | None = None
    max_items: int | None = None
    stop_timeout: float = 30.0


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0  # items, those of jobs that failed as a whole included
    completion_tokens: int = 0
    released: int = 0
    stopped_by_signal: bool = False
    failed_jobs: dict[int, str] = field(default_factory=dict)  # job → why it failed whole


def engine_log_path(db: Database) -> Path:
    """Where the model process writes (llama.cpp's log included), one file per database."""
    tag = hashlib.sha256(str(db.url).encode()).hexdigest()[:10]
    return xdg_dir("state") / f"engine-{tag}.log"


class Worker:
    """Drains the queue with one model process, loading each model once."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        options: RunOptions,
        events: RunEvents,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.options = options
        self.events = events
        self.card = card_for(settings, gpu.probe())
        self.host = socket.gethostname()
        # The worker's identity, and the owner of its leases: one worker per GPU per host.
        # Without a GPU, a scheduler's allocation tells workers on one host apart.
        self.scheduled = scheduler.label()
        tag = scheduler.allocation()
        self.id = f"{self.host}:{self.card.uuid}" if self.card else f"{self.host}:cpu"
        if self.card is None and tag:
            self.id += f":{tag}"
        self.signals = 0
        self.summary = RunSummary()
        self.loader = ModelLoader(
            settings, db, self.id, engine_log_path(db), stopping=lambda: self.stopping
        )
        self.loaded: Loaded | None = None
        self.job: Job | None = None
        self.counts: JobCounts | None = None
        self._beat_at = 0.0  # last registry heartbeat
        self._reclaimed_at = 0.0  # last return of others' expired leases
        self.meter = energy.meter(
            gpu.load_nvml() if self.card else None, self.card.uuid if self.card else None
        )
        self.clock = clock or SystemClock()
        self.gate = Gate(
            settings, db, self.id, self.host, clock=self.clock,
            card_uuid=self.card.uuid if self.card else None,
            model_pid=lambda: self.loaded.proc.pid if self.loaded else None,
            ends_at=scheduler.end_time() if self.scheduled else None,
        )  # fmt: skip
        self.closed: Closed | None = None  # why the worker does not work now
        self.waiter = Waiter(db, listen=settings.wake_on_notify)  # idle: woken by new work
        self._windows: dict[str, Window] = {}  # job windows, parsed once
        self._outranked_at = 0.0  # last look for a job of higher priority

    # Signal handlers only count; everything else happens in the loop.
    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    @property
    def stopping(self) -> bool:
        return self.signals > 0

    def run(self) -> RunSummary:
        """Work until the queue is empty (--until-empty), --max-items, or a signal."""
        with worker_lock(self.db, self.id):
            # Holding the lock means no other worker runs as us: our old leases are stale
            # (and on SQLite, the only worker, every lease is).
            reclaimed = queue.reclaim_stale(self.db, everything=self.db.is_sqlite, owner=self.id)
            if reclaimed:
                log.info("returned %d items left running by a dead worker to the queue", reclaimed)
            registry.register(
                self.db,
                self.id,
                host=self.host,
                gpu_uuid=self.card.uuid if self.card else "cpu",
                gpu_name=self.card.name if self.card else None,
                vram_total=self.card.total if self.card else None,
                pid=os.getpid(),
                scheduler=self.scheduled,
            )
            if self.gate.ends_at is not None:
                log.info("the scheduler ends this job at %s: claiming stops at %s",
                         local(self.gate.ends_at, seconds=True),
                         local(self.gate.stop_by, seconds=True))  # fmt: skip
            try:
                self._loop()
            except DatabaseGone:
                self.kill()  # nothing more is written: the database is not ours any more
                raise
            finally:
                self.waiter.close()
                if not self.db.gone:
                    self._end_job()
                    self._unload()
                    registry.stopped(self.db, self.id)
            self.db.check_file()  # before reporting work a replaced file no longer holds
        self.summary.stopped_by_signal = self.stopping
        return self.summary

    def _loop(self) -> None:
        while not self.stopping and not self.reached_max():
            self.housekeeping()
            closed = self.gate.check(now=True)
            if closed is not None:
                if self._closed(closed):
                    continue
                return
            if self.closed is not None:
                log.info("working again (%s no more)", self.closed.kind)
                self.closed = None
            job, waiting = self._next_job()
            self.job = job
            if job is None:
                # Other workers' leases may still come back (a dead worker's expire): drain
                # means nothing queued and nothing leased anywhere.
                if self.options.until_empty and not queue.running_items(
                    self.db, self.options.job_id
                ):
                    for job_id, opens in waiting.items():
                        log.info("job %s waits for its window: it opens at %s", job_id,
                                 local(opens), extra={"job": job_id})  # fmt: skip
                    return
                self._end_job()
                # Draining: other workers' last items finish any moment; look again soon.
                self._sleep(
                    min(self.settings.poll_seconds, 1.0)
                    if self.options.until_empty
                    else self.settings.poll_seconds
                )
                continue
            if not self._ensure_model(job):
                continue
            assert self.loaded is not None
            # Enough items to keep every parallel slot busy through most of the batch.
            limit = self.settings.batch_size or max(16, 4 * self.loaded.parallel)
            if self.options.max_items is not None:
                limit = min(limit, self.options.max_items - self.finished())
            # Items that were in flight when the model process crashed run alone, so that
            # the next crash blames only the item that causes it, not its batch mates.
            batch = queue.claim(
                self.db,
                job.id,
                limit=1,
                owner=self.id,
                suspects=True,
                lease_seconds=self.settings.lease_seconds,
            )
            refill = 0 if batch else limit  # a suspect runs alone: nothing is added to it
            if not batch:
                batch = queue.claim(
                    self.db,
                    job.id,
                    limit=limit,
                    owner=self.id,
                    lease_seconds=self.settings.lease_seconds,
                )
            if batch:
                self._begin_job(job)
                before = self.meter.read() if self.meter else None
                try:
                    BatchRun(self, job, refill).run(batch)
                finally:
                    if not self.db.gone:
                        self._add_energy(job, before)

    def _next_job(self) -> tuple[Job | None, dict[int, datetime]]:
        """The job to work on (store/schedule.py's order), skipping jobs whose own window is
        closed now; and those skipped, with when their windows open."""
        waiting: dict[int, datetime] = {}
        while True:
            job = schedule.next_job(
                self.db,
                job_id=self.options.job_id,
                prefer_model=self.loaded.model_path if self.loaded else None,
                vram=self.card.total if self.card else None,
                max_model_wait=self.settings.max_model_wait,
                exclude=waiting,
            )
            if job is None or self._job_window_open(job):
                return job, waiting
            waiting[job.id] = self._window(job.window).opens_at(self.clock.now())  # type: ignore[arg-type]

    def _window(self, text: str) -> Window:
        if text not in self._windows:
            self._windows[text] = Window.parse(text)
        return self._windows[text]

    def _job_window_open(self, job: Job) -> bool:
        return job.window is None or self._window(job.window).is_open(self.clock.now())

    def _closed(self, closed: Closed) -> bool:
        """The gate is closed: unload (the card is the owner's again), say why and what is
        left, and wait; False when the run should end (--until-empty)."""
        if self.closed is None or self.closed.reason != closed.reason:
            left = queue.waiting_items(self.db, self.options.job_id)
            resumes = f"; work resumes at {local(closed.until)}" if closed.until else ""
            log.info("%s: %d items wait%s", closed.reason, left, resumes,
                     extra={"cause": closed.kind})  # fmt: skip
        self.closed = closed
        self._end_job()
        if self.loaded is not None:
            # Say why first: status and the page show it before the card is free, not after.
            self.housekeeping(now=True)
            log.info("unloading the model: %s", closed.reason)
            self._unload()
        self.job = None
        self.housekeeping(now=True)
        if self.options.until_empty or closed.kind == "deadline":
            return False
        wait = self.settings.poll_seconds
        if closed.until is not None:
            wait = min(wait, max((closed.until - self.clock.now()).total_seconds(), 0.05))
        self._sleep(wait)
        return True

    def halt(self, job: Job) -> str | None:
        """Why the batch of `job` must stop claiming and wind down now, if it must."""
        if self.stopping:
            return "stopping"
        closed = self.gate.check()
        if closed is not None:
            return closed.reason
        if not self._job_window_open(job):
            return f"job {job.id}'s window ({job.window}) closed"
        return None

    def _add_energy(self, job: Job, before: int | None) -> None:
        """What the device used during one batch goes to the job (a batch is one job's)."""
        after = self.meter.read() if self.meter else None
        if self.meter and before is not None and after is not None and after >= before:
            queue.add_energy(self.db, job.id, after - before, self.meter.source)

    def outranked(self, job: Job) -> bool:
        """A job of higher priority waits (looked at every few seconds): this batch takes
        no more items, so the worker switches once its sequences end."""
        clock = time.monotonic()
        if clock - self._outranked_at < OUTRANK_SECONDS:
            return False
        self._outranked_at = clock
        if schedule.outranked(self.db, job, vram=self.card.total if self.card else None):
            log.info("a job of higher priority than job %s waits: switching after this batch",
                     job.id, extra={"job": job.id})  # fmt: skip
            return True
        return False

    def housekeeping(self, *, now: bool = False) -> None:
        """A heartbeat in the registry every few seconds (`now`: at once, e.g. when a model
        has loaded), with what the worker is doing: its model, job, tok/s, the tokens in
        flight; and every third of a lease, return expired leases of dead workers to the
        queue (on PostgreSQL, where several workers share it)."""
        clock = time.monotonic()
        if now or clock - self._beat_at >= min(BEAT_SECONDS, self.settings.lease_seconds / 3):
            self._beat_at = clock
            self.db.check_file()  # deleted or replaced under us: stop before writing more
            counts = self.counts
            registry.heartbeat(
                self.db,
                self.id,
                model=self.loaded.model_path if self.loaded else None,
                job_id=self.job.id if self.job else None,
                tokens_per_s=round(counts.tokens_per_s, 2) if counts else None,
                tokens_in_flight=counts.live_tokens if counts else None,
                items_in_flight=round(counts.live_items, 3) if counts else None,
                sample=(counts.job_id, counts.all_tokens) if counts and counts.all_tokens else None,
                state=self.closed.reason if self.closed else ("working" if counts else "idle"),
                resumes_at=_naive_utc(self.closed.until) if self.closed else None,
            )
        if not self.db.is_sqlite and clock - self._reclaimed_at >= self.settings.lease_seconds / 3:
            self._reclaimed_at = clock
            reclaimed = queue.reclaim_stale(self.db)
            if reclaimed:
                log.info("returned %d items with expired leases to the queue", reclaimed)

    def _ensure_model(self, job: Job) -> bool:
        """Have the job's model loaded with a context its items fit in; if it cannot load at
        all, the job fails with why. A loaded model serves every job of its file and load
        settings: only a job that needs a longer context makes it reload."""
        try:
            if (
                self.loaded is not None
                and self.loaded.model_path == job.model
                and self.loaded.job_load == job_load(job)
                and self._context_fits(job)
            ):
                return True
            self._unload()
            self.loaded = self.loader.load(job.model, job)
            self.housekeeping(now=True)  # the registry shows the model from now on
        except WouldSwapError as exc:
            # This machine cannot hold the load as configured (its flags, its RAM): the
            # worker's problem, not the job's. Nothing is claimed; the items stay queued
            # for a worker that can, and this one stops (exit 8).
            raise WouldSwapError(
                f"job {job.id}'s model does not fit this worker: {exc}; its items stay queued",
                hint=exc.hint,
            ) from None
        except ModelError as exc:
            if self.stopping:
                return False
            reason = str(exc) + (f" ({exc.hint})" if exc.hint else "")
            log.error("job %s: %s", job.id, reason, extra={"job": job.id, "cause": "load"})
            self.summary.failed += queue.fail_job(self.db, job.id, reason)
            self.summary.failed_jobs[job.id] = reason
            return False
        return True

    def _context_fits(self, job: Job) -> bool:
        """Whether the loaded context holds this job's longest item (ctx auto)."""
        assert self.loaded is not None
        if self.loaded.settings.ctx != "auto":
            return True
        need = job_context_need(self.db, job, self.settings.engine)
        ctx = context_for(need, self.loaded.report.model.n_ctx_train)
        if ctx is not None and ctx > self.loaded.n_ctx:
            log.info(
                "job %s needs a context of %d (loaded: %d): reloading",
                job.id,
                ctx,
                self.loaded.n_ctx,
                extra={"job": job.id},
            )
            return False
        return True

    def _unload(self) -> None:
        """Stop the model process after its current item (normal end, or a model switch)."""
        if self.loaded is not None:
            self.loaded.proc.stop()
            self.loader.closed(self.loaded)
            self.loaded = None

    def kill(self) -> None:
        """End the model process now (a second signal, or the stop timeout ran out)."""
        if self.loaded is not None:
            self.loaded.proc.kill()
            self.loader.closed(self.loaded)
            self.loaded = None

    def _begin_job(self, job: Job) -> None:
        if self.counts is not None and self.counts.job_id == job.id:
            return
        self._end_job()
        (state,) = results.progress(self.db, [job])
        label = f"job {job.id}" + (f" ({job.name})" if job.name else "")
        self.counts = JobCounts(job.id, label, job.item_count, state.finished)
        self.events.job_started(self.counts)
        self.housekeeping(now=True)

    def item_finished(self, tokens: int, *, failed: bool = False) -> None:
        if self.counts is not None:
            self.counts.add(tokens, failed=failed)
            self.events.item_finished(self.counts)

    def _end_job(self) -> None:
        if self.counts is not None:
            self.events.job_ended(self.counts)
            self.counts = None

    def finished(self) -> int:
        return self.summary.done + self.summary.failed

    def reached_max(self) -> bool:
        return self.options.max_items is not None and self.finished() >= self.options.max_items

    def _sleep(self, seconds: float) -> None:
        """Wait up to `seconds`: less when work is queued meanwhile (PostgreSQL's NOTIFY) or
        a signal comes."""
        self.waiter.wait(seconds, stop=lambda: self.stopping)


def run_worker(
    settings: Settings, db: Database, options: RunOptions, events: RunEvents | None = None
) -> RunSummary:
    """Run a worker with SIGTERM/SIGINT handlers installed for its duration."""
    worker = Worker(settings, db, options, events or NoEvents())
    previous = {s: signal.signal(s, worker.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _naive_utc(moment: datetime | None) -> datetime | None:
    """The store keeps naive UTC times."""
    return None if moment is None else moment.astimezone(UTC).replace(tzinfo=None)
